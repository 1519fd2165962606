"""latentsync-client end to end against a real Triton server (tritonserver from the pytriton wheel).

The server's `lipsync` model here is tests/models/protocol_echo: a PROTOCOL CONFORMANCE DOUBLE (not the
product) that enforces docs/PROTOCOL.md and echoes frames back per 16-frame window, so the client's decode,
streaming, backpressure, error handling and encode are tested with real gRPC streams.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

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
from latentsync_client.errors import Interrupted, NoFaceError, OutputError, ServerUnreachable, StreamExpired
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
    source = next(frames_25fps(media_dir / "demo1_video.mp4"))  # the echo returns the input frames
    assert np.abs(info["frames"][0].astype(int) - source).mean() < 3


@pytest.mark.parametrize(
    "video, audio",
    [
        ("retalking_face1.mp4", "retalking_face1.mp4"),  # 22 fps h264, its own audio track (AAC 44.1 kHz)
        ("retalking_face2.mp4", "demo1_audio.wav"),  # audio longer than the video: ping-pong loop
    ],
)
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
    assert info["size"] == (96, 48)  # shown upright: turned a quarter
    assert np.abs(info["frames"][0].astype(int) - np.rot90(gradient)).mean() < 3

    photo = tmp_path / "photo.png"
    with av.open(str(media_dir / "retalking_face2.mp4")) as c:
        next(c.decode(video=0)).to_image().resize((120, 90)).save(photo)
    out = tmp_path / "photo.mp4"
    r = run_cli(photo, audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == 0, r.stderr
    info = assert_synced_output(out, audio, tmp_path)
    assert info["size"] == (90, 120)
    assert np.abs(info["frames"][-1].astype(int) - info["frames"][0]).mean() < 2  # a still stays still


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
    with pytest.raises(NoFaceError, match=f"no face found in any of the {n} frames"):  # after the last frame
        for k, synced in enumerate(client.stream([audio[:30000], audio[30000:]], frames, StreamParams(steps=3))):
            most_in_flight = max(most_in_flight, len(pulled) - k)
            assert synced.index == k and synced.face_found is False  # uniform frames: "no face"
            assert synced.frame.shape == (8, 8, 3) and synced.frame[0, 0, 0] == k % 251
    assert k + 1 == n and len(pulled) == n
    assert most_in_flight <= 24 + 4


def test_audio_over_the_servers_limit_is_refused_before_any_frame(server):
    """More than 300 s of audio (the server's limit per stream): InputError while the audio is sent, before the
    first frame is asked for."""
    asked = []
    chunks = (np.zeros(10 * 16000, np.float32) for _ in range(31))  # 310 s, sent as decoded
    with pytest.raises(InputError, match="the audio is longer than the server's limit of 300 s"):
        for _ in LipsyncClient(server.grpc_url).stream(chunks, lambda n: asked.append(n) or []):
            pass
    assert asked == []


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
    r = subprocess.run(
        [sys.executable, "-c", PEAK_WRAPPER, *map(str, args)], capture_output=True, text=True, timeout=300
    )
    hwm = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("VmHWM")]
    return r.returncode, int(hwm[0]) / 1024 if hwm else float("nan"), r.stderr


def test_peak_memory_does_not_grow_with_length(server, media_dir, tmp_path):
    """A 1-minute and a 4-minute sync (a 2 s clip looped ping-pong) peak at the same memory.

    Small frames keep the constant in-flight budget small, so that holding on to anything per frame (~12 KB each,
    4500 more frames: +54 MB) or to the audio track (+11.5 MB) would show. The peaks of equal-length runs differ by
    up to ~5 MB (allocator and timing noise: 3 MB in-tree, and CI once saw 5.2 MB between 2 and 4 minutes), hence
    8 MB."""
    with av.open(str(media_dir / "retalking_face2.mp4")) as c:
        frames = [f.to_ndarray(width=64, height=64, format="rgb24") for _, f in zip(range(50), c.decode(video=0))]
    clip = write_clip(tmp_path / "clip.mp4", len(frames), size=(64, 64), frames=frames)
    voice = np.concatenate(list(audio_chunks(media_dir / "demo1_audio.wav")))
    repeats = {"1 min": int(np.ceil(60 * 16000 / len(voice)))}
    repeats["4 min"] = 4 * repeats["1 min"]
    peaks = {}
    for name, n in repeats.items():
        audio, out = write_wav(tmp_path / "voice.wav", np.tile(voice, n)), tmp_path / "out.mp4"
        code, peaks[name], stderr = peak_rss_mb([clip, audio, "-o", out, "--url", server.grpc_url, *FAST])
        assert code == 0, stderr
        with av.open(str(out)) as c:
            assert c.streams.video[0].frames == num_frames_for_audio(audio_samples(audio))
    assert peaks["4 min"] <= peaks["1 min"] + 8, peaks


# ------------------------------------------------------------------------------------------------ failures
def test_unreachable_server(media_dir, tmp_path):
    out = tmp_path / "out.mp4"
    r = run_cli(
        media_dir / "retalking_face2.mp4",
        media_dir / "demo1_audio.wav",
        "-o",
        out,
        "--url",
        f"127.0.0.1:{free_port()}",
        "-q",
    )
    assert r.returncode == ServerUnreachable.exit_code
    assert "cannot reach" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "gRPC" not in r.stderr
    # Triton's HTTP port by mistake: the one line says the client speaks gRPC
    r = run_cli(media_dir / "retalking_face2.mp4", media_dir / "demo1_audio.wav", "-o", out, "--url", "127.0.0.1:8000")
    assert r.returncode == ServerUnreachable.exit_code and "gRPC, Triton's port 8001" in r.stderr
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
    for option, message in (
        ("--preset=fastest", "preset 'fastest'"),
        ("--crf=52", "crf 52"),
        ("--threads=-1", "threads"),
    ):
        r = run_cli(media_dir / "retalking_face2.mp4", media_dir / "demo1_audio.wav", "-o", out, option, "-q")
        assert r.returncode == InputError.exit_code and message in r.stderr, (option, r.stderr)  # before connecting
    assert not out.exists()


def test_no_face_found(server, media_dir, tmp_path):
    photo = tmp_path / "wall.png"
    av.VideoFrame.from_ndarray(np.full((64, 64, 3), 90, np.uint8), format="rgb24").to_image().save(photo)
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 1.0)
    out = tmp_path / "out.mp4"
    r = run_cli(photo, audio, "-o", out, "--url", server.grpc_url, *FAST)
    assert r.returncode == NoFaceError.exit_code
    assert "no face found" in r.stderr and "--allow-no-face" in r.stderr and not out.exists()
    r = run_cli(photo, audio, "-o", out, "--url", server.grpc_url, "--allow-no-face", "--preset", "ultrafast")
    assert r.returncode == 0 and "without a face" in r.stderr
    assert_synced_output(out, audio, tmp_path)


def test_server_error_text_is_reported(slow_server, media_dir, tmp_path):
    out = tmp_path / "out.mp4"
    r = run_cli(
        media_dir / "retalking_face2.mp4",
        media_dir / "demo1_audio.wav",
        "-o",
        out,
        "--url",
        slow_server.grpc_url,
        "--variant",
        "1.6",
        *FAST,
    )
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
    proc = subprocess.Popen(
        CLI
        + [
            str(media_dir / "retalking_face2.mp4"),
            str(media_dir / "demo1_audio.wav"),
            "-o",
            str(out),
            "--url",
            slow_server.grpc_url,
            *FAST,
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_until_streaming(proc, 3.0)  # 15 windows x 0.3 s: well inside the stream
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == Interrupted.exit_code
    assert "interrupted" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    # The aborted sequence was ended: the server takes the next stream at once.
    client = LipsyncClient(slow_server.grpc_url, response_timeout=20)
    audio = np.zeros(8000, np.float32)
    frames = [np.arange(192, dtype=np.uint8).reshape(8, 8, 3)] * num_frames_for_audio(len(audio))  # a "face"
    assert len(list(client.stream(audio, frames))) == len(frames)


def test_server_dying_mid_stream(triton_server, media_dir, tmp_path):
    server = triton_server(echo_repository(tmp_path / "repo", window_delay_s=0.3))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out.mp4"
    proc = subprocess.Popen(
        CLI
        + [
            str(media_dir / "retalking_face2.mp4"),
            str(media_dir / "demo1_audio.wav"),
            "-o",
            str(out),
            "--url",
            server.grpc_url,
            *FAST,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until_streaming(proc, 3.0)
    os.killpg(server.pid, signal.SIGKILL)  # the server and its Python backend stubs
    _, stderr = proc.communicate(timeout=60)
    server.stop()
    assert proc.returncode == ServerUnreachable.exit_code, stderr
    assert "lost the connection" in stderr and len(stderr.strip().splitlines()) == 1
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------------------------ limits, output
def write_image(path: Path, pixels: np.ndarray) -> Path:
    av.VideoFrame.from_ndarray(pixels, format="rgb24").to_image().save(path)
    return path


def closed_url() -> str:
    from latentsync_serving.serve import free_port

    return f"127.0.0.1:{free_port()}"


def assert_one_line_error(r, exit_code: int, text: str) -> None:
    assert r.returncode == exit_code, r.stderr
    assert text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_tiny_images_work_or_are_refused_before_connecting(server, media_dir, tmp_path):
    """The h264 output needs even sizes >= 2 (an odd side loses a row / column): 1-pixel sides are refused
    before connecting (a closed port would otherwise answer exit 3); 2x2 and 3x5 come back as 2x2 and 2x4."""
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 0.5)
    out = tmp_path / "out.mp4"
    for h, w in [(1, 1), (1, 40), (40, 1)]:
        r = run_cli(
            write_image(tmp_path / f"{h}x{w}.png", np.zeros((h, w, 3), np.uint8)),
            audio,
            "-o",
            out,
            "--url",
            closed_url(),
            "-q",
        )
        assert_one_line_error(r, InputError.exit_code, f"FRAMES are {w}x{h} pixels; at least 2 per side")
    assert not out.exists()
    for h, w in [(2, 2), (3, 5)]:
        pixels = np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 17  # not uniform: a "face"
        r = run_cli(write_image(tmp_path / f"{h}x{w}.png", pixels), audio, "-o", out, "--url", server.grpc_url, *FAST)
        assert r.returncode == 0, r.stderr
        assert assert_synced_output(out, audio, tmp_path)["size"] == (h - h % 2, w - w % 2)


def test_output_that_would_overwrite_an_input_is_refused_before_connecting(media_dir, tmp_path):
    video = Path(shutil.copy(media_dir / "retalking_face2.mp4", tmp_path / "face.mp4"))
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 1.0)
    (tmp_path / "same-face.mp4").hardlink_to(video)
    (tmp_path / "same-voice.wav").symlink_to(audio)
    before = {p: p.read_bytes() for p in (video, audio)}
    for out, source in [(video, video), (tmp_path / "same-face.mp4", video), (tmp_path / "same-voice.wav", audio)]:
        r = run_cli(video, audio, "-o", out, "--url", closed_url(), "-q")
        assert_one_line_error(r, InputError.exit_code, f"is the input {source} itself")
    r = run_cli(video, audio, "-o", tmp_path, "--url", closed_url(), "-q")
    assert_one_line_error(r, InputError.exit_code, "is a folder")
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.mp4", "same-face.mp4", "same-voice.wav", "voice.wav"]


def run_cli_on_tmpfs(folder: Path, mount_options: str, *args, timeout=120):
    """The CLI with `folder` a fresh tmpfs (`mount -o mount_options`), in a private user and mount namespace (no
    privileges needed); after the CLI's own stderr, the last line lists what is left in the folder."""
    script = (
        'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; dir=$2; shift 2; "$@"; rc=$?; '
        'echo "left: $(ls -A "$dir")" >&2; exit $rc'
    )
    folder.mkdir()
    cmd = ["unshare", "-rm", "sh", "-c", script, "sh", mount_options, str(folder), *CLI, *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode != 99, r.stderr
    *errors, left = r.stderr.strip().splitlines()
    return r.returncode, errors, left.removeprefix("left:").split()


def test_read_only_output_folder_exits_2_before_connecting(media_dir, tmp_path):
    code, errors, left = run_cli_on_tmpfs(
        tmp_path / "ro",
        "ro",
        media_dir / "retalking_face2.mp4",
        media_dir / "demo1_audio.wav",
        "-o",
        tmp_path / "ro" / "out.mp4",
        "--url",
        closed_url(),
        "-q",
    )
    assert code == InputError.exit_code and len(errors) == 1, errors
    assert "cannot write the output there (Read-only file system)" in errors[0] and left == []


def test_full_disk_exits_5_and_leaves_nothing(server, media_dir, tmp_path):
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 2.0)
    code, errors, left = run_cli_on_tmpfs(
        tmp_path / "full",
        "size=64k",
        media_dir / "retalking_face2.mp4",
        audio,
        "-o",
        tmp_path / "full" / "out.mp4",
        "--url",
        server.grpc_url,
        "--preset",
        "ultrafast",
        "--crf",
        "0",
        "-q",
    )
    assert code == OutputError.exit_code and len(errors) == 1, errors
    assert "No space left on device" in errors[0] and left == []


def test_partials_of_killed_clients_are_removed_by_the_next_run(server, slow_server, media_dir, tmp_path):
    """A SIGKILLed CLI leaves its partial file; the next run in that folder removes it, but not the partial of a
    live writer (it holds the file's lock) nor files that are not partials."""
    out = tmp_path / "out.mp4"
    proc = subprocess.Popen(
        CLI
        + [
            str(media_dir / "retalking_face2.mp4"),
            str(media_dir / "demo1_audio.wav"),
            "-o",
            str(out),
            "--url",
            slow_server.grpc_url,
            *FAST,
        ],
        stderr=subprocess.PIPE,
    )
    wait_until_streaming(proc, 3.0)
    proc.kill()
    proc.wait()
    (stale,) = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert stale.name.startswith(f".out.partial-{proc.pid}-")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from latentsync_client.writer import claim_partial; "
            "print(claim_partial(Path(sys.argv[1]))[0], flush=True); sys.stdin.read()",
            str(tmp_path / "other.mp4"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        live = Path(holder.stdout.readline().strip())
        unrelated = tmp_path / ".notes.partial-1.txt"
        unrelated.write_text("not ours")
        audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 0.5)
        r = run_cli(
            media_dir / "retalking_face2.mp4", audio, "-o", tmp_path / "second.mp4", "--url", server.grpc_url, *FAST
        )
        assert r.returncode == 0, r.stderr
        assert not stale.exists() and live.exists() and unrelated.exists()
    finally:
        holder.stdin.close()
        holder.wait()


# ------------------------------------------------------------------------------------------------ idle timeout
@pytest.fixture(scope="module")
def idle_server(triton_server, tmp_path_factory):
    """Echo with a 3 s sequence idle timeout that takes 4 s per window: a client that sends nothing while it
    waits for a window outlives the timeout."""
    return triton_server(echo_repository(tmp_path_factory.mktemp("idle"), window_delay_s=4.0, idle_timeout_s=3.0))


def test_waiting_for_slow_windows_keeps_the_stream_alive(idle_server, media_dir, tmp_path):
    """The CLI holds back frames (36 in flight) while windows take longer than the server's idle timeout: its
    keep-alive requests keep the sequence open. Without them the stream is dropped, and the error says so."""
    audio = cut_audio(media_dir / "demo1_audio.wav", tmp_path / "voice.wav", 2.2)
    n = num_frames_for_audio(audio_samples(audio))
    assert n > 48 + 4  # some frames wait for the first window
    out = tmp_path / "out.mp4"
    r = run_cli(media_dir / "retalking_face2.mp4", audio, "-o", out, "--url", idle_server.grpc_url, *FAST)
    assert r.returncode == 0, r.stderr
    assert_synced_output(out, audio, tmp_path)

    client = LipsyncClient(idle_server.grpc_url, keepalive_s=None)
    frames = [np.arange(192, dtype=np.uint8).reshape(8, 8, 3)] * n
    with pytest.raises(StreamExpired, match="dropped the stream as idle") as failure:
        for _ in client.stream(np.zeros(audio_samples(audio), np.float32), frames):
            pass
    assert failure.value.exit_code == ServerError.exit_code
