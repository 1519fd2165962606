"""Reliability (the full matrix is tests/RELIABILITY-MATRIX.md): bad input files end the CLI with exit 2
and one line, contract violations sent with raw tritonclient are refused by name and leave the server READY
with no stream state left behind, a client that vanishes mid-stream is freed, and a short soak of 8 streams.

One tiny repository (random weights, CPU) and one real tritonserver serve the whole module.
"""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import CLI, FAST, audio_for, metric, run_cli, run_stream, wait_for

from latentsync_client.errors import InputError, ServerUnreachable
from latentsync_contract import MAX_FRAME_SIDE
from latentsync_contract import WINDOW as NUM_FRAMES
from latentsync_export.export import ExportOptions, build_repository
from latentsync_serving.serve import free_port

pytestmark = pytest.mark.timeout(600)

IDLE_TIMEOUT_S = 3.0
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("reliability") / "repo"
    build_repository(ExportOptions(out=repo, tiny=True, idle_timeout_s=IDLE_TIMEOUT_S))
    return triton_server(repo, timeout=600)


@pytest.fixture(scope="module")
def media(shared_dir) -> Path:
    return shared_dir / "media"


def open_streams(server) -> float:
    return metric(server, "lipsync_open_streams")


def assert_ready_and_drained(server) -> None:
    """The server and `lipsync` are READY, and every stream is freed (at once, or by the idle timeout)."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_ready() and client.is_model_ready("lipsync")
    wait_for(lambda: open_streams(server) == 0, IDLE_TIMEOUT_S * 5, "every stream to be freed")


# ------------------------------------------------------------------------------------------------ bad files
def write_wav(path: Path, format_tag: int, data: bytes = b"") -> Path:
    """A RIFF/WAVE file with the given codec tag (1 = PCM) and raw data bytes."""
    fmt = struct.pack("<HHIIHH", format_tag, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def truncated(media: Path, tmp: Path) -> Path:
    data = (media / "retalking_face2.mp4").read_bytes()
    (tmp / "truncated.mp4").write_bytes(data[: len(data) // 3])
    return tmp / "truncated.mp4"


def corrupt_header(media: Path, tmp: Path) -> Path:
    data = bytearray((media / "retalking_face2.mp4").read_bytes())
    rng = random.Random(len(data))
    data[:256] = bytes(rng.randrange(256) for _ in range(256))
    (tmp / "corrupt.mp4").write_bytes(bytes(data))
    return tmp / "corrupt.mp4"


def no_video_stream(media: Path, tmp: Path) -> Path:
    return write_wav(tmp / "voice-only.mp4", 1, b"\0" * 32000)     # a container with only audio


@pytest.mark.parametrize("make_video, message", [(truncated, "truncated.mp4: unsupported or unreadable"),
                                                 (corrupt_header, "corrupt.mp4: unsupported or unreadable"),
                                                 (no_video_stream, "voice-only.mp4: has no video stream")])
def test_bad_video_file_exits_2_before_connecting(media, tmp_path, make_video, message):
    """Checked before any network work: the URL points at a closed port, yet the answer is the input error."""
    out = tmp_path / "out.mp4"
    r = run_cli(make_video(media, tmp_path), media / "demo1_audio.wav", "-o", out,
                "--url", f"127.0.0.1:{free_port()}", "-q")
    assert r.returncode == InputError.exit_code, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_zero_length_audio_exits_2(server, media, tmp_path):
    out = tmp_path / "out.mp4"
    r = run_cli(media / "retalking_face2.mp4", write_wav(tmp_path / "empty.wav", 1), "-o", out,
                "--url", server.grpc_url, "-q")
    assert r.returncode == InputError.exit_code, r.stderr
    assert "audio is too short (0 ms)" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
    assert_ready_and_drained(server)


def test_audio_in_an_unknown_codec_fails_cleanly(server, media, tmp_path):
    """WAV with codec tag 0x1234 (FFmpeg has no decoder): exit 2, one line naming the file, no output."""
    out = tmp_path / "out.mp4"
    r = run_cli(media / "retalking_face2.mp4", write_wav(tmp_path / "odd.wav", 0x1234, b"\0" * 32000),
                "-o", out, "--url", server.grpc_url, "-q")
    assert r.returncode == 2, r.stderr
    assert "odd.wav" in r.stderr and "unsupported audio codec" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr
    assert_ready_and_drained(server)


# ------------------------------------------------------------------------------------------------ raw contract
def raw_stream(url: str, requests: list[tuple[dict, bool, bool]], sequence_id: int) -> list[str]:
    """Send (tensors {name: array}, sequence_start, sequence_end) requests on one gRPC stream, without any of
    the client's checks; return each reply as 'data', 'final' or the error text, in arrival order."""
    dtypes = {np.uint8: "UINT8", np.float32: "FP32", np.float64: "FP64", np.int32: "INT32"}
    client, replies = grpcclient.InferenceServerClient(url), queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for i, (tensors, start, end) in enumerate(requests):
            inputs = []
            for name, array in tensors.items():
                inputs.append(grpcclient.InferInput(name, list(array.shape), dtypes[array.dtype.type]))
                inputs[-1].set_data_from_numpy(array)
            client.async_stream_infer("lipsync", inputs, request_id=str(i), sequence_id=sequence_id,
                                      sequence_start=start, sequence_end=end, enable_empty_final_response=True,
                                      parameters={"steps": 1} if start else None)
        got, finals = [], 0
        while finals < len(requests):
            result, error = replies.get(timeout=120)
            if error is not None:
                got.append(str(error))
                finals += 1
            else:
                final = result.get_response().parameters["triton_final_response"].bool_param
                got.append("final" if final else "data")
                finals += final
        return got
    finally:
        client.stop_stream()
        client.close()


AUDIO = np.zeros(16000, np.float32)
NO_AUDIO = np.zeros(0, np.float32)


def frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.zeros((n, h, w, 3), np.uint8)


def audio_then(*frame_requests: dict) -> list[tuple[dict, bool, bool]]:
    """An audio-first stream whose later requests carry the given tensors; the last one ends the stream."""
    return [({"AUDIO": AUDIO}, True, False)] + [(t, False, i == len(frame_requests) - 1)
                                                for i, t in enumerate(frame_requests)]


CONTRACT_VIOLATIONS = {
    "frames-float32": (audio_then({"FRAMES": frames(2).astype(np.float32)}), "'FRAMES' data-type is 'FP32'"),
    "frames-rank-3": (audio_then({"FRAMES": frames(2)[0]}), "unexpected shape for input 'FRAMES'"),
    "frames-4-channels": (audio_then({"FRAMES": np.zeros((2, 8, 8, 4), np.uint8)}), "'FRAMES'"),
    "audio-float64": ([({"AUDIO": AUDIO.astype(np.float64)}, True, True)], "'AUDIO' data-type is 'FP64'"),
    "audio-2d": ([({"AUDIO": AUDIO.reshape(2, -1)}, True, True)], "unexpected shape for input 'AUDIO'"),
    "unknown-input": ([({"AUDIO": AUDIO, "EXTRA": AUDIO}, True, True)], "'EXTRA'"),
    "over-16-frames": (audio_then({"FRAMES": frames(NUM_FRAMES + 1)}), f"at most {NUM_FRAMES} per request"),
    "frame-over-4096-px": (audio_then({"FRAMES": frames(1, MAX_FRAME_SIDE + 1, 8)}),
                           f"FRAMES are 8x{MAX_FRAME_SIDE + 1} pixels; at most {MAX_FRAME_SIDE} per side"),
    "size-changes": (audio_then({"FRAMES": frames(2)}, {"FRAMES": frames(2, 32, 32)}), "FRAMES size changed"),
    "frames-before-audio": ([({"FRAMES": frames(2), "AUDIO": NO_AUDIO}, True, True)], "FRAMES before AUDIO"),
    "no-sequence-start": ([({"AUDIO": AUDIO}, False, True)], "START flag"),
}


@pytest.mark.parametrize("case", list(CONTRACT_VIOLATIONS))
def test_contract_violation_is_refused_by_name_and_server_stays_ready(server, case):
    requests, message = CONTRACT_VIOLATIONS[case]
    got = raw_stream(server.grpc_url, requests, sequence_id=7000 + list(CONTRACT_VIOLATIONS).index(case))
    errors = [g for g in got if g not in ("data", "final")]
    assert errors and message in errors[0], got
    assert "data" not in got, got                             # nothing synced from a refused stream
    assert_ready_and_drained(server)


def test_a_failed_stream_refuses_its_later_requests(server):
    got = raw_stream(server.grpc_url, audio_then({"FRAMES": frames(NUM_FRAMES + 1)}, {"FRAMES": frames(1)}), 7100)
    assert "at most" in got[-2] and "already failed" in got[-1] and "at most" in got[-1], got
    assert_ready_and_drained(server)


# ------------------------------------------------------------------------------------------------ faults
def test_client_vanishing_mid_stream_frees_its_state(server, clip):
    """The gRPC stream is closed after the audio and some frames, without sequence_end: the stream's state
    (gauge) is freed by the idle timeout, and the next stream is served."""
    video, samples = clip
    assert_ready_and_drained(server)
    cut = run_stream(server.grpc_url, video[:2], audio_for(samples, NUM_FRAMES + 4), {"steps": 1}, end=False)
    assert not cut.errors and not cut.frames                  # frames held for their window, then the client left
    assert open_streams(server) == 1
    wait_for(lambda: open_streams(server) == 0, IDLE_TIMEOUT_S * 5, "the abandoned stream to be freed")
    again = run_stream(server.grpc_url, video[:2], audio_for(samples, 2), {"steps": 1})
    assert not again.errors and len(again.video) == 2
    assert_ready_and_drained(server)


def test_server_killed_mid_stream_restarts_and_serves_again(triton_server, server, clip, media, tmp_path):
    """SIGKILL to a serving server (and its backend stubs) while a CLI sync is mid-stream: the CLI exits 3 with
    one line and no output; stop() removes the Python backend's /dev/shm regions the dead stubs left behind;
    a new server on the same repository and ports serves again, with the same frames as before the kill."""
    video, samples = clip
    first = triton_server(server.model_repository, timeout=600)
    before = run_stream(first.grpc_url, video[:2], audio_for(samples, 2), {"steps": 1, "seed": 3})
    assert not before.errors and len(before.video) == 2
    regions = first.shm_regions()
    assert regions, "the Python backend's shm regions carry this server's prefix"

    out = tmp_path / "out.mp4"
    cli = subprocess.Popen(CLI + [media / "demo1_video.mp4", media / "demo1_audio.wav", "-o", out,
                                  "--url", first.grpc_url, "--steps", "1", *FAST], stderr=subprocess.PIPE, text=True)
    wait_for(lambda: open_streams(first) == 1 or cli.poll() is not None, 120, "the CLI's stream to open")
    assert cli.poll() is None, cli.communicate()
    os.killpg(first.pid, signal.SIGKILL)
    _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == ServerUnreachable.exit_code, stderr
    assert "lost the connection" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list(tmp_path.iterdir()) == []                     # no partial output, no temp file
    first.stop()
    assert not any(r.exists() for r in regions)

    again = triton_server(server.model_repository, timeout=600, grpc_port=first.grpc_port,
                          http_port=first.http_port, metrics_port=first.metrics_port)
    after = run_stream(again.grpc_url, video[:2], audio_for(samples, 2), {"steps": 1, "seed": 3})
    assert not after.errors and np.array_equal(after.video, before.video)
    assert_ready_and_drained(again)
    again.stop()


# ------------------------------------------------------------------------------------------------ soak
def test_soak_short(server, media):
    """8 concurrent CLI-path syncs for ~40 s: no errors, every output decodes to its full frame count, the
    gauge is back to 0, server memory growth stays under the bound latentsync-soak states (--max-rss-growth-mb)."""
    r = subprocess.run([sys.executable, "-m", "latentsync_load.soak", "--short", "--url", server.grpc_url,
                        "--metrics-url", server.metrics_url, "--server-pid", str(server.pid),
                        "--clip", str(media / "demo1_video.mp4")], capture_output=True, text=True, timeout=400)
    summary = json.loads(r.stdout)
    print(json.dumps(summary))
    assert r.returncode == 0 and summary["ok"], (summary, r.stderr[-2000:])
    assert summary["syncs"] >= summary["streams"] and summary["frames"] == summary["syncs"] * summary["frames_per_sync"]
