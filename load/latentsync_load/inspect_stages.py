"""`latentsync-inspect REPO VIDEO AUDIO -o stages.png`: a picture of what each stage did to one frame.

    latentsync-inspect build/repo face.mp4 voice.wav --frame 40 -o stages.png

"Why is my mouth patch there?": the input frame with the detected box and the three alignment points, the
detection zoomed, the aligned face crop (with the template's points), the mouth mask over it, the generated
face and the frame after paste-back. It runs the in-process pipeline on the weights a repository built by
latentsync-export serves (the same numerics as the server), on the window holding --frame, and needs no
server: a user with a repository folder can ask it about any input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from latentsync_client.errors import ClientError
from latentsync_client.media import audio_chunks, frames_for_audio
from latentsync_contract import WINDOW, num_frames_for_audio
from latentsync_core.face.stages import render_stages, save_picture
from latentsync_core.pipeline import LipSyncStream
from latentsync_export.manifest import load_reference


def stage_picture(stream: LipSyncStream, frames: Sequence[np.ndarray], frame: int) -> np.ndarray:
    """Run `stream` (audio set) window by window up to the window holding `frame`; its stages as one picture."""
    start = frame // WINDOW * WINDOW
    for i in range(0, start + 1, WINDOW):
        source = np.stack(frames[i : i + WINDOW])
        window = stream.prepare(source)
        if i < start:  # earlier windows: for the aligner's smoothing and the RNG's draws
            continue
        result = stream.finish(window, stream.denoise(window))
        result.apply(source.copy())
        j = frame - start
        if not window.found[j]:
            why = "its face is turned past max_yaw" if window.detections.found[j] else "no face was found"
            raise ValueError(f"frame {frame} was passed through unchanged: {why}")
        k = int(np.flatnonzero(window.found).tolist().index(j))  # the frame's row among the synced faces
        return render_stages(
            source[j],
            window.detections.boxes[j],
            window.detections.points[j],
            face_image(window.reference[k]),
            stream.mask,
            face_image(window.synced[k]),
            result.frames[j],
        )
    raise AssertionError("unreachable")


def face_image(face: torch.Tensor) -> np.ndarray:
    """(3, R, R) float in [-1, 1] -> (R, R, 3) uint8."""
    return ((face.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="latentsync-inspect",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("repository", type=Path, help="a repository built by latentsync-export (cpu target weights)")
    p.add_argument("video", help="video or still image")
    p.add_argument("audio", help="any file with an audio track")
    p.add_argument("-o", "--output", type=Path, default=Path("stages.png"), help="picture to write (PNG)")
    p.add_argument("--frame", type=int, default=0, help="frame index (at 25 fps) to show")
    p.add_argument("--variant", help="default: the repository's first")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1247)
    p.add_argument("--max-yaw", type=float, default=0.0, help="the stream option of the same name")
    a = p.parse_args(argv)
    try:
        samples = np.concatenate(list(audio_chunks(a.audio)))
        n = num_frames_for_audio(len(samples))
        if not 0 <= a.frame < n:
            raise ValueError(f"--frame must be in 0..{n - 1} (the audio covers {n} frames)")
        frames = []
        for frame in frames_for_audio(a.video, n):
            frames.append(frame)
            if len(frames) == (a.frame // WINDOW + 1) * WINDOW:
                break
        stream = load_reference(a.repository, a.variant).stream(steps=a.steps, seed=a.seed, max_yaw=a.max_yaw)
        stream.set_audio(samples)
        save_picture(a.output, stage_picture(stream, frames, a.frame))
    except (ValueError, OSError, ClientError) as e:
        print(f"latentsync-inspect: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
