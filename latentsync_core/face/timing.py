"""Time face alignment and paste-back on a golden align_restore frame (milliseconds, median and min of N runs).

    python -m latentsync_core.face.timing [CASE_DIR] [--runs N] [--threads 1 2]

CASE_DIR holds frame.png, inputs.npz and outputs.npz (default $LATENTSYNC_SHARED/golden/align_restore). Per
resolution: `align` (affine, window-local warp, Lanczos resize), `paste_region` (the box-sized face into its
window, paste_window included), their sum `align+paste`, `paste_region after align` (the paste timed alone, each
after an untimed alignment: what the alignment leaves in the caches costs the paste), `paste_faces` (the same
from an R x R face, its resize to the box included), `paste_faces x16` (a window's 16 faces in one call, as the
in-process pipeline pastes them) and `paste_back` (whole frame in and out, the frame copy included).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from .align import FaceAligner, box_hw, landmarks_to_points
from .restore import paste_back, paste_faces, paste_region, paste_window


def time_ms(fn, runs: int, warmup: int = 3, before=None) -> tuple[float, float]:
    """(median, min) wall-clock milliseconds of `fn()` over `runs` calls after `warmup` calls; `before()`, if given,
    runs untimed ahead of each call."""
    times = []
    for k in range(warmup + runs):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        if k >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3, float(np.min(times)) * 1e3


def stages(frame: np.ndarray, points: np.ndarray, face_box: torch.Tensor, affine: np.ndarray, res: int) -> dict:
    """The timed calls at resolution `res`: align the frame's face, paste `face_box` through the golden `affine`. A
    value is a call, or a (call, before) pair whose `before` runs untimed ahead of each call."""
    aligner = FaceAligner(res)
    frame_hw = frame.shape[:2]
    face_r = torch.from_numpy(aligner.align(frame, points, smooth=False).face).permute(2, 0, 1)[None] / 127.5 - 1
    y0, y1, x0, x1 = paste_window(affine, box_hw(res), frame_hw)

    def align():
        return aligner.align(frame, points, smooth=False)

    def paste():
        window = paste_window(affine, box_hw(res), frame_hw)
        return paste_region(frame[y0:y1, x0:x1], face_box, affine, window, frame_hw)

    def paste_from_r(n: int = 1):
        window = paste_window(affine, box_hw(res), frame_hw)
        return paste_faces(
            [frame[y0:y1, x0:x1]] * n, face_r.expand(n, -1, -1, -1), affine[None].repeat(n, 0), [window] * n, frame_hw
        )

    return {
        "align": align,
        "paste_region": paste,
        "align+paste": lambda: (align(), paste()),
        "paste_region after align": (paste, align),  # the paste alone, each after an untimed alignment (caches)
        "paste_faces": paste_from_r,
        "paste_faces x16": lambda: paste_from_r(16),
        "paste_back": lambda: paste_back(frame, face_box, affine),
    }


def measure(case_dir: Path, runs: int) -> dict[int, dict[str, tuple[float, float]]]:
    """{resolution: {stage: (median ms, min ms)}} on the case's frame, landmarks, restore faces and affines."""
    case = json.loads((case_dir / "case.json").read_text())
    frame = cv2.cvtColor(cv2.imread(str(case_dir / "frame.png")), cv2.COLOR_BGR2RGB)
    inputs, outputs = np.load(case_dir / "inputs.npz"), np.load(case_dir / "outputs.npz")
    points = landmarks_to_points(inputs["landmark_2d_106"])
    results = {}
    for res in case["config"]["resolutions"]:
        face_box = torch.from_numpy(inputs[f"r{res}_restore_face"])
        calls = stages(frame, points, face_box, outputs[f"r{res}_affine_matrix"][0], res)
        results[res] = {
            name: time_ms(call[0], runs, before=call[1]) if isinstance(call, tuple) else time_ms(call, runs)
            for name, call in calls.items()
        }
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(os.environ.get("LATENTSYNC_SHARED", "shared")) / "golden" / "align_restore"
    parser.add_argument("case_dir", nargs="?", type=Path, default=default)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    for threads in args.threads:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        for res, stages in measure(args.case_dir, args.runs).items():
            cells = "  ".join(f"{name} {med:.2f} (min {low:.2f})" for name, (med, low) in stages.items())
            print(f"threads {threads}  R {res}:  {cells}")


if __name__ == "__main__":
    main()
