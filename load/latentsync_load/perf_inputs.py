"""perf_analyzer input data (--input-data JSON) for every model of a repository built by latentsync-export.

    python -m latentsync_load.perf_inputs --repo REPO --clip FACE.mp4 --out DIR [--variant 1.5] [--streams 4]

Writes DIR/<model>.json, tensors base64-encoded with explicit shapes:
  lipsync          one data stream per sequence (perf_analyzer replays each on its own correlation id): the
                   clip's audio first (FRAMES left out), then its frames, 16 per request (AUDIO left out),
                   exactly as many as the audio needs (docs/PROTOCOL.md); run with --streaming
  face_detector    real frames of the clip                       (batch 1 entries; send -b 16)
  restorer         the paste window of a real frame, a synthetic face and a plausible crop affine   (-b 16)
  vae_encoder      uint8 faces and the mouth mask's keep levels   (-b 16: one window)
  vae_decoder      latents                                       (-b 16)
  denoiser_<variant> one window's latents and conditioning (decoupled: run with --streaming; the whole DDIM
                   loop of the window per request, upstream's 20 steps and guidance 1.5 by default)
  audio_encoder    a log-mel segment of the clip's audio         (-b 1)
and DIR/models.json: for each model the perf_analyzer flags that go with its file (batch, streaming).
Sizes, counts and the variant come from the command line and the repository, not from this file.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np

WINDOW = 16


def tensor(x: np.ndarray) -> dict:
    x = np.ascontiguousarray(x)
    return {"content": {"b64": base64.b64encode(x.tobytes()).decode("ascii")}, "shape": list(x.shape)}


def write(path: Path, data) -> None:
    path.write_text(json.dumps({"data": data}))


def load_clip(clip: Path, seconds: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames (n, H, W, 3) uint8 for `seconds` of the clip's audio (ping-pong looped) and that audio."""
    import cv2

    from latentsync_client import audio_chunks, frames_for_audio, num_frames_for_audio

    audio = np.concatenate(list(audio_chunks(clip)))[: int(seconds * 16000)].astype(np.float32)
    frames = list(frames_for_audio(clip, num_frames_for_audio(len(audio))))
    h, w = frames[0].shape[:2]
    if size and max(h, w) != size:
        s = size / max(h, w)
        frames = [
            cv2.resize(f, (round(w * s) // 2 * 2, round(h * s) // 2 * 2), interpolation=cv2.INTER_AREA) for f in frames
        ]
    return np.stack(frames), audio


def lipsync_streams(frames: np.ndarray, audio: np.ndarray, streams: int) -> list[list[dict]]:
    """The empty tensor of each request is left out (both inputs are optional): perf_analyzer 2.60 crashes on
    zero-sized tensors."""
    one = [{"AUDIO": tensor(audio)}] + [
        {"FRAMES": tensor(frames[i : i + WINDOW])} for i in range(0, len(frames), WINDOW)
    ]
    return [one] * streams


def crop_affine(h: int, w: int, resolution: int) -> np.ndarray:
    """Frame -> face crop affine of a centred face filling 60% of the shorter side (the restorer inverts it)."""
    scale = resolution / (0.6 * min(h, w))
    return np.array(
        [[scale, 0, resolution / 2 - scale * w / 2], [0, scale, resolution / 2 - scale * h / 2]], np.float32
    )


def restorer_entry(frame: np.ndarray, resolution: int, rng: np.random.Generator) -> dict:
    """The restorer's inputs as lipsync sends them: only the face's paste window of the frame travels."""
    from latentsync_core.face.align import box_hw
    from latentsync_core.face.restore import paste_window

    h, w = frame.shape[:2]
    affine = crop_affine(h, w, resolution)
    y0, y1, x0, x1 = window = paste_window(affine, box_hw(resolution), (h, w))
    return {
        "REGIONS": tensor(frame[y0:y1, x0:x1]),
        "FACES": tensor(rng.uniform(-1, 1, (3, resolution, resolution)).astype(np.float32)),
        "AFFINES": tensor(affine),
        "WINDOWS": tensor(np.array(window, np.int32)),
        "FRAME_HW": tensor(np.array([h, w], np.int32)),
    }


def generate(
    repo: Path,
    clip: Path,
    out: Path,
    variant: str | None = None,
    streams: int = 4,
    seconds: float = 1.2,
    size: int = 256,
    entries: int = 4,
) -> dict:
    from latentsync_core.audio import log_mel_spectrogram, mel_segments
    from latentsync_core.configs import get_variant
    from latentsync_core.face.mask import keep_levels, mouth_mask

    manifest = json.loads((repo / "repository.json").read_text())
    variant = variant or manifest["variants"][0]
    resolution = get_variant(variant).resolution
    latent = resolution // 8
    rng = np.random.default_rng(0)
    frames, audio = load_clip(clip, seconds, size)
    h, w = frames.shape[1:3]
    out.mkdir(parents=True, exist_ok=True)
    picks = np.linspace(0, len(frames) - 1, entries).astype(int)
    mel = mel_segments(log_mel_spectrogram(audio))[0].numpy()  # one zero-padded 30 s whisper segment

    models = {
        "lipsync": (lipsync_streams(frames, audio, streams), {"streaming": True, "batch": None}),
        "face_detector": ([{"FRAMES": tensor(frames[i])} for i in picks], {"batch": WINDOW}),
        "restorer": ([restorer_entry(frames[i], resolution, rng) for i in picks], {"batch": WINDOW}),
        "vae_encoder": (
            [
                {
                    "FACES": tensor(rng.integers(0, 256, (3, resolution, resolution), np.uint8)),
                    "KEEP": tensor(keep_levels(mouth_mask(resolution)).numpy()[None]),
                }
                for _ in range(entries)
            ],
            {"batch": WINDOW},
        ),
        "vae_decoder": (
            [{"LATENTS": tensor(rng.standard_normal((4, latent, latent)).astype(np.float32))} for _ in range(entries)],
            {"batch": WINDOW},
        ),
        f"denoiser_{variant}": (
            [
                {
                    "LATENTS": tensor(rng.standard_normal((4, WINDOW, latent, latent)).astype(np.float32)),
                    "MASK": tensor((rng.uniform(size=(1, WINDOW, latent, latent)) > 0.5).astype(np.float32)),
                    "MASKED": tensor(rng.standard_normal((4, WINDOW, latent, latent)).astype(np.float32)),
                    "REFERENCE": tensor(rng.standard_normal((4, WINDOW, latent, latent)).astype(np.float32)),
                    "AUDIO": tensor(0.1 * rng.standard_normal((WINDOW, 50, 384)).astype(np.float32)),
                }
            ],
            {"streaming": True, "batch": None},
        ),
        "audio_encoder": ([{"MEL": tensor(mel)}], {"batch": 1}),
    }
    index = {}
    for name, (data, flags) in models.items():
        if not (repo / name).is_dir():
            continue
        write(out / f"{name}.json", data)
        index[name] = {"input_data": str(out / f"{name}.json"), **flags}
    index["_meta"] = {
        "variant": variant,
        "frames_per_stream": int(len(frames)),
        "frame_size": [int(h), int(w)],
        "streams": streams,
        "clip": str(clip),
    }
    (out / "models.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--clip", type=Path, required=True, help="a video with a face and an audio track")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant")
    p.add_argument("--streams", type=int, default=4, help="lipsync data streams (>= the highest concurrency)")
    p.add_argument("--seconds", type=float, default=1.2, help="audio seconds per lipsync stream")
    p.add_argument("--size", type=int, default=256, help="frames resized to this longer side (0: keep)")
    a = p.parse_args(argv)
    index = generate(a.repo, a.clip, a.out, a.variant, a.streams, a.seconds, a.size)
    print(json.dumps(index, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
