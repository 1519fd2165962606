"""`make demo`: build a repository, serve it with a real Triton server, lip-sync a still portrait to speech.

    latentsync-demo                       # tiny RANDOM weights (the lips do not follow speech)
    latentsync-demo --weights DIR         # official LatentSync weights folder (or WEIGHTS=DIR)

The portrait is a sample photo shipped in the `insightface` wheel (t1.jpg, a group photo: the largest face is
synced, upstream's rule; `pip install --no-deps insightface` is enough, only the image is used) unless --image
is given; the speech is synthesized with espeak-ng. The result goes through the same path as a user's:
latentsync-export -> latentsync-serve -> latentsync-client.
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

from latentsync_client.cli import main as client_main
from latentsync_export.export import ExportOptions, build_repository
from latentsync_serving.serve import TritonServer

DEFAULT_TEXT = "Hello from LatentSync on Triton."
SAMPLE_IMAGE = ("data", "images", "t1.jpg")


def sample_portrait() -> Path:
    """The insightface wheel's sample photo, found without importing insightface (its deps are not needed)."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("demo: no portrait: `pip install --no-deps insightface` (its sample photos are used) "
                         "or pass --image PHOTO")
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
    print("\n" + "#" * width + "\n" + "\n".join(f"# {line.ljust(width - 4)} #" for line in lines)
          + "\n" + "#" * width + "\n", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latentsync-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=os.environ.get("WEIGHTS") or None,
                   help="LatentSync weights folder (default: env WEIGHTS; none = tiny random weights)")
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
        banner(["RANDOM WEIGHTS: tiny seeded test weights (latentsync-export --tiny).",
                "The pipeline runs for real, but the lips will NOT follow the speech.",
                "Run `make demo WEIGHTS=DIR` with the official checkpoints for a real result."])
    image = a.image or sample_portrait()
    a.work.mkdir(parents=True, exist_ok=True)
    audio = a.audio or synthesize_speech(a.text, a.work / "speech.wav")

    repo = a.work / "repository"
    print(f"[1/3] building the model repository {repo} ...", flush=True)
    weights = {} if random_weights else {a.variant: Path(a.weights)}
    manifest = build_repository(ExportOptions(out=repo, tiny=random_weights, weights=weights, force=True,
                                              variants=(a.variant,)))
    if manifest["random_weights"] and not random_weights:
        banner([f"{a.weights} holds RANDOM test weights (TINY_RANDOM_WEIGHTS marker): output is not lip-synced."])

    print("[2/3] starting Triton (loads every model; a minute on a small CPU) ...", flush=True)
    with TritonServer(repo, log_path=a.work / "tritonserver.log") as server:
        print(f"      ready: gRPC {server.grpc_url}, metrics {server.metrics_url}", flush=True)
        print(f"[3/3] lip-syncing {image} to {audio} ({steps} steps, variant {a.variant}) ...", flush=True)
        started = time.monotonic()
        code = client_main([str(image), str(audio), "-o", str(a.out), "--url", server.grpc_url,
                            "--steps", str(steps), "--variant", a.variant])
    if code == 0:
        print(f"wrote {a.out} in {time.monotonic() - started:.0f} s"
              + ("  (RANDOM weights: not lip-synced)" if manifest["random_weights"] else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
