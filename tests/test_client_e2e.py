"""latentsync-client end to end against a real Triton server (tritonserver from the pytriton wheel).

The server's `lipsync` model here is tests/models/protocol_echo: a PROTOCOL CONFORMANCE DOUBLE (not the
product) that enforces docs/PROTOCOL.md and echoes frames back per 16-frame window, so the client's decode,
streaming, backpressure, error handling and encode are tested with real gRPC streams.
"""
import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from helpers import (
    CLI,
    FAST,
    assert_synced_output,
    audio_samples,
    cut_audio,
    echo_repository,
    run_cli,
    write_clip,
    write_wav,
)

from latentsync_client import (
    InputError,
    LipsyncClient,
    ServerError,
    StreamParams,
    audio_chunks,
    frames_25fps,
    num_frames_for_audio,
)
from latentsync_client.errors import Interrupted, NoFaceError, ServerUnreachable
from latentsync_serving.serve import free_port


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory):
    return triton_server(echo_repository(tmp_path_factory.mktemp("echo")))


@pytest.fixture(scope="module")
def slow_server(triton_server, tmp_path_factory):
    """Echo that takes 0.3 s per window and only has variant 1.5, for mid-stream and server-error tests."""
    return triton_server(echo_repository(tmp_path_factory.mktemp("slow"), window_delay_s=0.3, variants="1.5"))


@pytest.fixture(scope="module")
def media_dir(shared_dir):
    return shared_dir / "media"


# ------------------------------------------------------------------------------------------------ happy paths
def test_hevc_portrait_clip(server, media_dir, tmp_path):
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 2.5)
    out = tmp_path / "out.mp4"
    r = run_cli(media_dir / "demo1_video.mp4", audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == 0, r.stderr
    info = assert_synced_output(out, audio, tmp_path)
    assert info["size"] == (1920, 1080)
    source = next(frames_25fps(media_dir / "demo1_video.mp4"))          # the echo returns the input frames
    assert np.abs(info["frames"][0].astype(int) - source).mean() < 3


@pytest.mark.parametrize("video, audio", [
    ("retalking_face1.mp4", "retalking_face1.mp4"),     # 22 fps h264, its own audio track (AAC 44.1 kHz)
    ("retalking_face2.mp4", "demo1_audio.wav"),         # audio longer than the video: ping-pong loop
])
def test_media_clips(server, media_dir, tmp_path, video, audio):
    out = tmp_path / "out.mp4"
    r = run_cli(media_dir / video, media_dir / audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == 0, r.stderr
    assert_synced_output(out, media_dir / audio, tmp_path)


def test_30fps_input_comes_out_at_25fps(server, media_dir, tmp_path):
    with av.open(str(media_dir / "retalking_face2.mp4")) as c:
        frames = [f.to_ndarray(width=160, height=160, format="rgb24") for _, f in zip(range(45), c.decode(video=0))]
    clip = write_clip(tmp_path / "clip30.mp4", len(frames), fps=30, size=(160, 160), frames=frames)
    audio = cut_audio(media_dir / "demo2_audio.wav", tmp_path / "voice.wav", 4.0)
    out = tmp_path / "out.mp4"
    r = run_cli(clip, audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == 0, r.stderr
    assert_synced_output(out, audio, tmp_path)


def test_rotated_clip_and_still_photo(server, media_dir, tmp_path):
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 1.5)
    gradient = np.broadcast_to(np.arange(96, dtype=np.uint8)[None, :, None] * 2, (48, 96, 3))
    rotated = write_clip(tmp_path / "rotated.mp4", 10, size=(48, 96), rotation=90, frames=[gradient] * 10)
    out = tmp_path / "rot.mp4"
    r = run_cli(rotated, audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == 0, r.stderr
    info = assert_synced_output(out, audio, tmp_path)
    assert info["size"] == (96, 48)                            # shown upright: turned a quarter
    assert np.abs(info["frames"][0].astype(int) - np.rot90(gradient)).mean() < 3

    photo = tmp_path / "photo.png"
    with av.open(str(media_dir / "retalking_face2.mp4")) as c:
        next(c.decode(video=0)).to_image().resize((120, 90)).save(photo)
    out = tmp_path / "photo.mp4"
    r = run_cli(photo, audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == 0, r.stderr
    info = assert_synced_output(out, audio, tmp_path)
    assert info["size"] == (90, 120)
    assert np.abs(info["frames"][-1].astype(int) - info["frames"][0]).mean() < 2     # a still stays still


def test_library_stream_backpressure_and_order(server):
    """`LipsyncClient.stream` yields every frame in order, and never has more than its bound in flight."""
    client = LipsyncClient(server.grpc_url, max_inflight_frames=24, frames_per_request=4)
    audio = np.zeros(16000 * 4, np.float32)
    n = num_frames_for_audio(len(audio))
    pulled = []

    def frames(count):
        assert count == n
        for i in range(count):
            pulled.append(i)
            yield np.full((8, 8, 3), i % 251, np.uint8)

    most_in_flight = 0
    for k, synced in enumerate(client.stream([audio[:30000], audio[30000:]], frames, StreamParams(steps=3))):
        most_in_flight = max(most_in_flight, len(pulled) - k)
        assert synced.index == k and synced.face_found is False          # uniform frames: "no face"
        assert synced.frame.shape == (8, 8, 3) and synced.frame[0, 0, 0] == k % 251
    assert k + 1 == n and len(pulled) == n
    assert most_in_flight <= 24 + 4


# ------------------------------------------------------------------------------------------------ memory
# Runs the CLI in a fresh interpreter and reports its own high-water mark: VmHWM belongs to the process image
# after exec (a child's ru_maxrss would include the fork of this big pytest process).
PEAK_WRAPPER = """
import sys
from latentsync_client.cli import main
code = main(sys.argv[1:])
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print("VmHWM", hwm, file=sys.stderr)
sys.exit(code)
"""


def peak_rss_mb(args) -> tuple[int, float, str]:
    """Run the CLI; its exit code, peak resident memory in MB, and stderr."""
    r = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    hwm = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("VmHWM")]
    return r.returncode, int(hwm[0]) / 1024 if hwm else float("nan"), r.stderr


def test_peak_memory_does_not_grow_with_length(server, media_dir, tmp_path):
    """A 2-minute and a 4-minute sync (a 2 s clip looped ping-pong) peak at the same memory.

    Small frames keep the constant in-flight budget (and its timing noise) small, so that holding on to
    anything per frame (~12 KB each, 6000 more frames) or to the audio track (+7.7 MB) would show.
    """
    with av.open(str(media_dir / "retalking_face2.mp4")) as c:
        frames = [f.to_ndarray(width=64, height=64, format="rgb24") for _, f in zip(range(50), c.decode(video=0))]
    clip = write_clip(tmp_path / "clip.mp4", len(frames), size=(64, 64), frames=frames)
    voice = np.concatenate(list(audio_chunks(media_dir / "demo1_audio.wav")))
    repeats = {"2 min": int(np.ceil(120 * 16000 / len(voice)))}
    repeats["4 min"] = 2 * repeats["2 min"]
    peaks = {}
    for name, n in repeats.items():
        audio, out = write_wav(tmp_path / "voice.wav", np.tile(voice, n)), tmp_path / "out.mp4"
        code, peaks[name], stderr = peak_rss_mb([clip, audio, "-o", out, "--url", server.grpc_url, *FAST])
        assert code == 0, stderr
        with av.open(str(out)) as c:
            assert c.streams.video[0].frames == num_frames_for_audio(audio_samples(audio))
    assert peaks["4 min"] <= peaks["2 min"] + 4, peaks


# ------------------------------------------------------------------------------------------------ failures
def test_unreachable_server(media_dir, tmp_path):
    out = tmp_path / "out.mp4"
    r = run_cli(media_dir / "retalking_face2.mp4", media_dir / "demo1_audio.wav", "-o", out,
                "--url", f"127.0.0.1:{free_port()}", "-q")
    assert r.returncode == ServerUnreachable.exit_code
    assert "cannot reach" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unsupported_file_and_bad_arguments(media_dir, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    out = tmp_path / "out.mp4"
    r = run_cli(text, media_dir / "demo1_audio.wav", "-o", out, "-q")
    assert r.returncode == InputError.exit_code
    assert "notes.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(media_dir / "demo1_audio.wav", media_dir / "demo1_audio.wav", "-o", out, "-q")
    assert r.returncode == InputError.exit_code and "no video stream" in r.stderr
    r = run_cli(media_dir / "retalking_face2.mp4", media_dir / "demo1_audio.wav", "-o", out, "--steps", "0", "-q")
    assert r.returncode == InputError.exit_code and "steps" in r.stderr
    assert not out.exists()


def test_no_face_found(server, media_dir, tmp_path):
    photo = tmp_path / "wall.png"
    av.VideoFrame.from_ndarray(np.full((64, 64, 3), 90, np.uint8), format="rgb24").to_image().save(photo)
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 1.0)
    out = tmp_path / "out.mp4"
    r = run_cli(photo, audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == NoFaceError.exit_code
    assert "no face found" in r.stderr and not out.exists()
    r = run_cli(photo, audio, "-o", out, "--url", server.grpc_url, "--allow-no-face", "--preset", "ultrafast")
    assert r.returncode == 0 and "without a face" in r.stderr
    assert_synced_output(out, audio, tmp_path)


def test_server_error_text_is_reported(slow_server, media_dir, tmp_path):
    out = tmp_path / "out.mp4"
    r = run_cli(media_dir / "retalking_face2.mp4", media_dir / "demo1_audio.wav", "-o", out,
                "--url", slow_server.grpc_url, "--variant", "1.6", *FAST)
    assert r.returncode == ServerError.exit_code
    assert "variant" in r.stderr and "1.6" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def wait_until_streaming(proc, seconds):
    """Give the client time to get mid-stream, and make sure it is still running."""
    time.sleep(seconds)
    assert proc.poll() is None, proc.communicate()


def test_ctrl_c_leaves_no_output(slow_server, media_dir, tmp_path):
    out = tmp_path / "out.mp4"
    # Ctrl-C as a terminal delivers it: a job started in the background of a script (CI runners, `cmd &`)
    # inherits SIGINT *ignored*, and Python then keeps ignoring it; the CLI starts with the default here.
    proc = subprocess.Popen(CLI + [str(media_dir / "retalking_face2.mp4"), str(media_dir / "demo1_audio.wav"),
                                   "-o", str(out), "--url", slow_server.grpc_url, *FAST],
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until_streaming(proc, 3.0)                           # 15 windows x 0.3 s: well inside the stream
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == Interrupted.exit_code
    assert "interrupted" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    # The aborted sequence was ended: the server takes the next stream at once.
    client = LipsyncClient(slow_server.grpc_url, response_timeout=20)
    audio = np.zeros(8000, np.float32)
    frames = [np.zeros((8, 8, 3), np.uint8)] * num_frames_for_audio(len(audio))
    assert len(list(client.stream(audio, frames))) == len(frames)


def test_server_dying_mid_stream(triton_server, media_dir, tmp_path):
    server = triton_server(echo_repository(tmp_path / "repo", window_delay_s=0.3))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.mp4"
    proc = subprocess.Popen(CLI + [str(media_dir / "retalking_face2.mp4"), str(media_dir / "demo1_audio.wav"),
                                   "-o", str(out), "--url", server.grpc_url, *FAST],
                            stderr=subprocess.PIPE, text=True)
    wait_until_streaming(proc, 3.0)
    os.killpg(server.pid, signal.SIGKILL)                     # the server and its Python backend stubs
    _, stderr = proc.communicate(timeout=60)
    server.stop()
    assert proc.returncode == ServerUnreachable.exit_code, stderr
    assert "lost the connection" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(work.iterdir()) == []
