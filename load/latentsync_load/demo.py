"""`make demo`: build a repository, serve it with a real Triton server, lip-sync a still portrait to speech.

    latentsync-demo                       # tiny RANDOM weights (the lips do not follow speech)
    latentsync-demo --weights DIR         # official LatentSync weights folder (or WEIGHTS=DIR)

The portrait is a sample photo shipped in the `insightface` wheel (t1.jpg, a group photo; `pip install --no-deps
insightface` is enough, only the image is used), cut around its largest clearly frontal face (a frontal template
does not fit a turned head; upstream would sync the largest face, which there is turned away), unless --image is
given; the speech is synthesized with espeak-ng. The result goes through the same path as a user's:
latentsync-export -> latentsync-serve -> latentsync-client. Beside the video, a picture of what each stage did
to one frame (latentsync-inspect) shows where the mouth patch went and why: OUT with the extension .png.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from latentsync_client.cli import main as client_main
from latentsync_core.face.detect import create_detector
from latentsync_core.face.pose import frontal_crop
from latentsync_core.face.stages import save_picture
from latentsync_export.export import ExportOptions, build_repository
from latentsync_serving.serve import TritonServer

from .inspect_stages import main as inspect_main

DEFAULT_TEXT = "Hello from LatentSync on Triton."
SAMPLE_IMAGE = ("data", "images", "t1.jpg")


def sample_portrait() -> Path:
    """The insightface wheel's sample photo, found without importing insightface (its deps are not needed)."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "demo: no portrait: `pip install --no-deps insightface` (its sample photos are used) or pass --image PHOTO"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*SAMPLE_IMAGE)
    if not path.is_file():
        raise SystemExit(f"demo: {path} is missing from the installed insightface; pass --image PHOTO")
    return path


def synthesize_speech(text: str, out: Path, voice: str = "en-us") -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise SystemExit("demo: espeak-ng not found: `apt-get install espeak-ng` (Debian/Ubuntu), or pass --audio")
    subprocess.run([espeak, "-v", voice, "-s", "150", "-w", str(out), text], check=True)
    return out


def banner(lines: Sequence[str]) -> None:
    width = max(map(len, lines)) + 4
    print(
        "\n"
        + "#" * width
        + "\n"
        + "\n".join(f"# {line.ljust(width - 4)} #" for line in lines)
        + "\n"
        + "#" * width
        + "\n",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latentsync-demo", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--weights",
        default=os.environ.get("WEIGHTS") or None,
        help="LatentSync weights folder (default: env WEIGHTS; none = tiny random weights)",
    )
    p.add_argument("--variant", choices=("1.5", "1.6"), default="1.5", help="variant of --weights")
    p.add_argument("--image", type=Path, help="portrait photo or video (default: insightface's t1.jpg)")
    p.add_argument("--audio", type=Path, help="speech file (default: espeak-ng reading --text)")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--steps", type=int, help="DDIM steps (default 20; 3 with random weights, to be quick)")
    p.add_argument("--out", type=Path, default=Path("out/demo.mp4"))
    p.add_argument("--work", type=Path, default=Path("out/demo"), help="folder for the repository and speech")
    a = p.parse_args(argv)

    random_weights = a.weights is None
    steps = a.steps or (3 if random_weights else 20)
    if random_weights:
        banner(
            [
                "RANDOM WEIGHTS: tiny seeded test weights (latentsync-export --tiny).",
                "The pipeline runs for real, but the lips will NOT follow the speech.",
                "Run `make demo WEIGHTS=DIR` with the official checkpoints for a real result.",
            ]
        )
    a.work.mkdir(parents=True, exist_ok=True)
    image = a.image or frontal_portrait(sample_portrait(), a.work / "portrait.png")
    audio = a.audio or synthesize_speech(a.text, a.work / "speech.wav")

    repo = a.work / "repository"
    print(f"[1/3] building the model repository {repo} ...", flush=True)
    weights = {} if random_weights else {a.variant: Path(a.weights)}
    manifest = build_repository(
        ExportOptions(out=repo, tiny=random_weights, weights=weights, force=True, variants=(a.variant,))
    )
    if manifest["random_weights"] and not random_weights:
        banner([f"{a.weights} holds RANDOM test weights (TINY_RANDOM_WEIGHTS marker): output is not lip-synced."])

    print("[2/3] starting Triton (loads every model; a minute on a small CPU) ...", flush=True)
    server = TritonServer(repo, log_path=a.work / "tritonserver.log").start()
    with server:  # stopped on the way out, also when it never became ready
        server.wait_ready(timeout=900)  # a minute on an idle 2-core machine, several on a busy one
        print(f"      ready: gRPC {server.grpc_url}, metrics {server.metrics_url}", flush=True)
        print(f"[3/3] lip-syncing {image} to {audio} ({steps} steps, variant {a.variant}) ...", flush=True)
        started = time.monotonic()
        code = client_main(
            [
                str(image),
                str(audio),
                "-o",
                str(a.out),
                "--url",
                server.grpc_url,
                "--steps",
                str(steps),
                "--variant",
                a.variant,
            ]
        )
    if code != 0:
        return code
    print(
        f"wrote {a.out} in {time.monotonic() - started:.0f} s"
        + ("  (RANDOM weights: not lip-synced)" if manifest["random_weights"] else "")
    )
    picture = a.out.with_suffix(".png")
    inspect_main(
        [
            str(repo),
            str(image),
            str(audio),
            "-o",
            str(picture),
            "--frame",
            "0",
            "--steps",
            str(steps),
            "--variant",
            a.variant,
        ]
    )
    return 0


def frontal_portrait(photo: Path, out: Path) -> Path:
    """The photo cut around its largest frontal face (PNG, lossless), so the server's largest-face rule picks it."""
    image = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
    cut = frontal_crop(image, create_detector("mediapipe"))
    print(
        f"      portrait: {photo.name}, face {cut.chosen} of {len(cut.yaw)} (yaw {cut.yaw[cut.chosen]:+.0f} deg; "
        f"the largest face's is {cut.yaw[np.argmax(np.prod(cut.boxes[:, 2:] - cut.boxes[:, :2], 1))]:+.0f})",
        flush=True,
    )
    return save_picture(out, cut.image)


if __name__ == "__main__":
    sys.exit(main())
