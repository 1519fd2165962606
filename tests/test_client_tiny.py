"""latentsync-client against the real product: the tiny repository (`latentsync-export --tiny`, random
weights, every model a Python-backend model) served by tritonserver. Output content is meaningless (random
weights); the contract is what is checked: frame count from the audio, 25 fps, duration, audio track."""

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from helpers import FAST, assert_synced_output, cut_audio, run_cli, write_clip

from latentsync_client import NoFaceError


@pytest.fixture(scope="module")
def tiny_server(triton_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("tiny") / "repo"
    export = Path(sys.executable).with_name("latentsync-export")
    r = subprocess.run([str(export), "--out", str(repo), "--tiny"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return triton_server(repo, timeout=300)


def clip_30fps(media: Path, tmp_path: Path) -> Path:
    with av.open(str(media / "retalking_face2.mp4")) as c:
        frames = [f.to_ndarray(width=320, height=320, format="rgb24") for _, f in zip(range(20), c.decode(video=0))]
    return write_clip(tmp_path / "clip30.mp4", len(frames), fps=30, size=(320, 320), frames=frames)


@pytest.mark.parametrize("video", ["retalking_face1.mp4", "demo1_video.mp4", "30fps"])
def test_cli_on_tiny_repository(tiny_server, shared_dir, tmp_path, video):
    """22 fps h264, 25 fps HEVC portrait and 30 fps inputs all come back at 25 fps with the audio's length."""
    media = shared_dir / "media"
    source = clip_30fps(media, tmp_path) if video == "30fps" else media / video
    audio = cut_audio(media / "demo1_audio.wav", tmp_path / "voice.wav", 0.3)  # part of one window
    out = tmp_path / "out.mp4"
    r = run_cli(
        source, audio, "-o", out, "--url", tiny_server.grpc_url, "--steps", "1", "--allow-no-face", *FAST, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert_synced_output(out, audio, tmp_path)


def test_allow_no_face_writes_the_passed_through_frames(tiny_server, shared_dir, tmp_path):
    """The real service ends a stream in which no frame had a face with its `no face found` error, after the
    (unchanged) frames came back: exit 4 by default; with --allow-no-face the output is written and exit 0."""
    photo = tmp_path / "wall.png"
    av.VideoFrame.from_ndarray(np.full((64, 64, 3), 90, np.uint8), format="rgb24").to_image().save(photo)
    audio = cut_audio(shared_dir / "media" / "demo1_audio.wav", tmp_path / "voice.wav", 0.3)
    out = tmp_path / "out.mp4"
    r = run_cli(photo, audio, "-o", out, "--url", tiny_server.grpc_url, "--steps", "1", *FAST, timeout=600)
    assert r.returncode == NoFaceError.exit_code and "no face found" in r.stderr and not out.exists(), r.stderr
    r = run_cli(
        photo,
        audio,
        "-o",
        out,
        "--url",
        tiny_server.grpc_url,
        "--steps",
        "1",
        "--allow-no-face",
        "--preset",
        "ultrafast",
        timeout=600,
    )
    assert r.returncode == 0 and "without a face (passed through)" in r.stderr, r.stderr
    info = assert_synced_output(out, audio, tmp_path)
    assert np.abs(info["frames"][0].astype(int) - 90).mean() < 3  # the photo itself


def test_locust_load_test_streams_through_the_tiny_repository(tiny_server, shared_dir, tmp_path):
    """`latentsync-locust` (load/latentsync_load/locustfile.py, gevent + raw gRPC streams) against the real
    server: two users' streams each come back whole, and the summary and CSV say so."""
    import json

    locust = Path(sys.executable).with_name("latentsync-locust")
    summary = tmp_path / "summary.json"
    r = subprocess.run(
        [str(locust), "--headless", "-u", "2", "-r", "2", "--host", tiny_server.grpc_url,
         "--clip", str(shared_dir / "media" / "retalking_face2.mp4"), "--clip-seconds", "0.5", "--steps", "1",
         "--streams-per-user", "1", "--csv", str(tmp_path / "locust"), "--summary-json", str(summary)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(summary.read_text())
    assert report["streams"] == 2 and report["errors"] == 0
    expected = 14  # 0.5 s of audio: 8000 samples -> 8000 // 640 + 2 frames (PROTOCOL.md)
    assert [s["frames"] for s in report["results"]] == [expected, expected]
    stats = (tmp_path / "locust_stats.csv").read_text()
    assert "first_frame" in stats and "stream" in stats
