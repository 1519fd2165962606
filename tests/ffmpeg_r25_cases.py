"""Clips whose 25 fps frames are checked against `ffmpeg -r 25` (upstream's re-encode), and the recorder of
FFmpeg's answers (tests/data/ffmpeg_r25.json; test_client_media.py compares frames_25fps with them).

    python tests/ffmpeg_r25_cases.py     # needs the ffmpeg command (recorded with Debian 12's FFmpeg 5.1.9)

Each clip's frame i is index-coded (helpers.write_clip); FFmpeg re-encodes it losslessly with upstream's video
options (`-r 25`, mp4), and each output frame is matched to the source frame it is, byte for byte in YUV.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).parent))
from helpers import write_clip  # noqa: E402

RECORDED = Path(__file__).parent / "data" / "ffmpeg_r25.json"
REAL_CLIP = "retalking_face1.mp4"  # ../shared/media: 22 fps on average, variable rate, video starts at 33 ms


def _variable_times(seed: int = 7, n: int = 36) -> list[Fraction]:
    rng, times = random.Random(seed), [Fraction(0)]
    steps = [Fraction(1, 30), Fraction(1, 30), Fraction(1, 15), Fraction(1, 60), Fraction(1, 20)]
    while len(times) < n:
        times.append(times[-1] + rng.choice(steps))
    return times


# name -> write_clip options (36 frames each)
CASES: dict[str, dict] = {
    "30fps": dict(fps=30),
    "22fps": dict(fps=22),
    "29.97fps": dict(fps=Fraction(30000, 1001)),
    "50fps": dict(fps=50),
    "12fps": dict(fps=12),
    "22fps, video 100 ms after the audio": dict(
        fps=22, times=[Fraction(1, 10) + Fraction(i, 22) for i in range(36)], audio=True
    ),
    "30fps, video 70 ms after the audio": dict(
        fps=30, times=[Fraction(7, 100) + Fraction(i, 30) for i in range(36)], audio=True
    ),
    "variable rate": dict(fps=30, times=_variable_times()),
    "variable rate, video 33 ms after the audio": dict(
        fps=30, times=[t + Fraction(1, 30) for t in _variable_times()], audio=True
    ),
}


def write_case(name: str, directory: Path) -> Path:
    return write_clip(directory / f"{hashlib.md5(name.encode()).hexdigest()[:12]}.mp4", 36, **CASES[name])


def ffmpeg_frames(clip: Path, work: Path) -> list[int]:
    """The source frame index of each frame that `ffmpeg -i clip -r 25 out.mp4` writes."""
    out = work / "r25.mp4"
    command = ["ffmpeg", "-loglevel", "error", "-y", "-nostdin", "-i", str(clip), "-r", "25"]
    subprocess.run([*command, "-c:v", "libx264", "-qp", "0", "-preset", "ultrafast", str(out)], check=True)

    def hashes(path: Path) -> list[str]:
        with av.open(str(path)) as c:
            return [hashlib.md5(f.to_ndarray(format="yuv420p").tobytes()).hexdigest() for f in c.decode(video=0)]

    index: dict[str, int] = {}
    for i, h in enumerate(hashes(clip)):
        index.setdefault(h, i)
    return [index[h] for h in hashes(out)]


def record(media_dir: Path) -> None:
    version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    frames = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            frames[name] = ffmpeg_frames(write_case(name, Path(tmp)), Path(tmp))
        frames[REAL_CLIP] = ffmpeg_frames(media_dir / REAL_CLIP, Path(tmp))
    RECORDED.parent.mkdir(exist_ok=True)
    RECORDED.write_text(json.dumps({"ffmpeg": version, "frames": frames}, indent=None) + "\n")
    print(f"{RECORDED}: {len(frames)} clips, {version}")


if __name__ == "__main__":
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1].parent / "shared" / "media")
