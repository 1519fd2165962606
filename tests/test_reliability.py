"""Reliability (the full matrix is tests/RELIABILITY-MATRIX.md): bad input files end the CLI with exit 2
and one line, contract violations sent with raw tritonclient are refused by name and leave the server READY
with no stream state left behind, a client that vanishes mid-stream is freed, and a short soak of 8 streams.

One tiny repository (random weights, CPU) and one real tritonserver serve the whole module.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from helpers import CLI, FAST, OpenStream, audio_for, metric, run_cli, run_stream, server_memory_mb, wait_for

from latentsync_client.errors import InputError, ServerUnreachable
from latentsync_contract import (
    MAX_AUDIO_AMPLITUDE,
    MAX_AUDIO_SAMPLES,
    MAX_AUDIO_SECONDS,
    MAX_FRAME_SIDE,
    STREAM_TOKEN,
    is_stream_dropped_error,
)
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
    return write_wav(tmp / "voice-only.mp4", 1, b"\0" * 32000)  # a container with only audio


@pytest.mark.parametrize(
    "make_video, message",
    [
        (truncated, "truncated.mp4: unsupported or unreadable"),
        (corrupt_header, "corrupt.mp4: unsupported or unreadable"),
        (no_video_stream, "voice-only.mp4: has no video stream"),
    ],
)
def test_bad_video_file_exits_2_before_connecting(media, tmp_path, make_video, message):
    """Checked before any network work: the URL points at a closed port, yet the answer is the input error."""
    out = tmp_path / "out.mp4"
    r = run_cli(
        make_video(media, tmp_path), media / "demo1_audio.wav", "-o", out, "--url", f"127.0.0.1:{free_port()}", "-q"
    )
    assert r.returncode == InputError.exit_code, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_zero_length_audio_exits_2(server, media, tmp_path):
    out = tmp_path / "out.mp4"
    r = run_cli(
        media / "retalking_face2.mp4", write_wav(tmp_path / "empty.wav", 1), "-o", out, "--url", server.grpc_url, "-q"
    )
    assert r.returncode == InputError.exit_code, r.stderr
    assert "audio is too short (0 ms)" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()
    assert_ready_and_drained(server)


def test_audio_in_an_unknown_codec_fails_cleanly(server, media, tmp_path):
    """WAV with codec tag 0x1234 (FFmpeg has no decoder): exit 2, one line naming the file, no output."""
    out = tmp_path / "out.mp4"
    r = run_cli(
        media / "retalking_face2.mp4",
        write_wav(tmp_path / "odd.wav", 0x1234, b"\0" * 32000),
        "-o",
        out,
        "--url",
        server.grpc_url,
        "-q",
    )
    assert r.returncode == 2, r.stderr
    assert "odd.wav" in r.stderr and "unsupported audio codec" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists(), r.stderr
    assert_ready_and_drained(server)


# ------------------------------------------------------------------------------------------------ raw contract
def raw_stream(url: str, requests: list[tuple[dict, bool, bool]], sequence_id: int) -> list[str]:
    """Send (tensors {name: array}, sequence_start, sequence_end) requests on one gRPC stream, without any of
    the client's checks; return each reply as 'data', 'final' or the error text, in arrival order."""
    with OpenStream(url) as stream:
        for tensors, start, end in requests:
            stream.send(tensors, sequence_id, start, end, {"steps": 1} if start else None)
        return stream.collect(len(requests), timeout=120)


AUDIO = np.zeros(16000, np.float32)
NO_AUDIO = np.zeros(0, np.float32)


def frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.zeros((n, h, w, 3), np.uint8)


def spiked(value: float) -> np.ndarray:
    """A second of quiet noise with three bad samples: each would rescale the whole track's log-mel."""
    audio = np.random.default_rng(0).normal(0, 0.05, 16000).astype(np.float32)
    audio[[100, 8000, 15000]] = value
    return audio


def audio_then(*frame_requests: dict, audio: np.ndarray = AUDIO) -> list[tuple[dict, bool, bool]]:
    """An audio-first stream whose later requests carry the given tensors; the last one ends the stream."""
    return [({"AUDIO": audio}, True, False)] + [
        (t, False, i == len(frame_requests) - 1) for i, t in enumerate(frame_requests)
    ]


CONTRACT_VIOLATIONS = {
    "frames-float32": (audio_then({"FRAMES": frames(2).astype(np.float32)}), "'FRAMES' data-type is 'FP32'"),
    "frames-rank-3": (audio_then({"FRAMES": frames(2)[0]}), "unexpected shape for input 'FRAMES'"),
    "frames-4-channels": (audio_then({"FRAMES": np.zeros((2, 8, 8, 4), np.uint8)}), "'FRAMES'"),
    "audio-float64": ([({"AUDIO": AUDIO.astype(np.float64)}, True, True)], "'AUDIO' data-type is 'FP64'"),
    "audio-2d": ([({"AUDIO": AUDIO.reshape(2, -1)}, True, True)], "unexpected shape for input 'AUDIO'"),
    "unknown-input": ([({"AUDIO": AUDIO, "EXTRA": AUDIO}, True, True)], "'EXTRA'"),
    "over-16-frames": (audio_then({"FRAMES": frames(NUM_FRAMES + 1)}), f"at most {NUM_FRAMES} per request"),
    "frame-over-4096-px": (
        audio_then({"FRAMES": frames(1, MAX_FRAME_SIDE + 1, 8)}),
        f"FRAMES are 8x{MAX_FRAME_SIDE + 1} pixels; at most {MAX_FRAME_SIDE} per side",
    ),
    "size-changes": (audio_then({"FRAMES": frames(2)}, {"FRAMES": frames(2, 32, 32)}), "FRAMES size changed"),
    "frame-0-high": (audio_then({"FRAMES": frames(1, 0, 8)}), "FRAMES are 8x0 pixels; at least 2 per side"),
    "frame-0-wide": (audio_then({"FRAMES": frames(1, 8, 0)}), "FRAMES are 0x8 pixels; at least 2 per side"),
    **{
        f"audio-{name}": ([({"AUDIO": spiked(value)}, True, True)], "AUDIO samples must be finite and within")
        for name, value in (("nan", np.nan), ("inf", -np.inf), ("1e30", 1e30), ("over-2", MAX_AUDIO_AMPLITUDE + 0.1))
    },
    "audio-under-20-ms": (
        audio_then({"FRAMES": frames(1)}, audio=AUDIO[:319]),
        "AUDIO: the track is shorter than 20 ms",
    ),
    "audio-over-300-s": (
        [({"AUDIO": np.zeros(MAX_AUDIO_SAMPLES + 1, np.float32)}, True, True)],
        f"the stream's audio is longer than {MAX_AUDIO_SECONDS} s",
    ),
    "audio-over-300-s-in-parts": (
        [
            ({"AUDIO": np.zeros(MAX_AUDIO_SAMPLES - 16000, np.float32)}, True, False),
            ({"AUDIO": AUDIO}, False, False),
            ({"AUDIO": AUDIO}, False, True),
        ],
        f"the stream's audio is longer than {MAX_AUDIO_SECONDS} s",
    ),
    "frames-before-audio": ([({"FRAMES": frames(2), "AUDIO": NO_AUDIO}, True, True)], "FRAMES before AUDIO"),
    "no-sequence-start": ([({"AUDIO": AUDIO}, False, True)], "START flag"),
}


@pytest.mark.parametrize("case", list(CONTRACT_VIOLATIONS))
def test_contract_violation_is_refused_by_name_and_server_stays_ready(server, case):
    requests, message = CONTRACT_VIOLATIONS[case]
    got = raw_stream(server.grpc_url, requests, sequence_id=7000 + list(CONTRACT_VIOLATIONS).index(case))
    errors = [g for g in got if g not in ("data", "final")]
    assert errors and message in errors[0], got
    assert "data" not in got, got  # nothing synced from a refused stream
    assert_ready_and_drained(server)


def test_a_failed_stream_refuses_its_later_requests(server):
    got = raw_stream(server.grpc_url, audio_then({"FRAMES": frames(NUM_FRAMES + 1)}, {"FRAMES": frames(1)}), 7100)
    assert "at most" in got[-2] and "already failed" in got[-1] and "at most" in got[-1], got
    assert_ready_and_drained(server)


@pytest.mark.parametrize("token", ["owner-secret", None], ids=["with-token", "old-client"])
def test_a_live_sequence_id_belongs_to_the_client_that_started_it(server, clip, token):
    """Another connection's START on a live sequence id (without the owner's stream_token, or with a guessed one)
    is refused by name, and so are its requests without the token; the owner's stream goes on untouched: its
    frames equal those of an undisturbed stream. A stream started without a token (an old client) is guarded
    against STARTs only: its later requests carry nothing to tell them apart."""
    video, samples = clip
    audio, sequence_id = audio_for(samples, 2), 7200 + (token is None)
    reference = run_stream(server.grpc_url, video[:2], audio, {"steps": 1, "seed": 3})
    owner_token = {STREAM_TOKEN: token} if token else {}
    foreign = [
        ({"AUDIO": audio[::-1].copy()}, True, {"steps": 1}),
        ({"AUDIO": audio[::-1].copy()}, True, {"steps": 1, STREAM_TOKEN: "guess"}),
    ]
    if token:
        foreign.append(({"FRAMES": video[:1], "AUDIO": NO_AUDIO}, False, None))
    with OpenStream(server.grpc_url) as owner, OpenStream(server.grpc_url) as other:
        owner.send({"AUDIO": audio}, sequence_id, start=True, parameters={"steps": 1, "seed": 3, **owner_token})
        assert owner.collect(1) == ["final"]
        for tensors, start, parameters in foreign:
            other.send(tensors, sequence_id, start=start, parameters=parameters)
        refused = other.collect(len(foreign))
        owner.send({"FRAMES": video[:2], "AUDIO": NO_AUDIO}, sequence_id, end=True, parameters=owner_token or None)
        owner.collect(1)
    assert all(f"sequence_id {sequence_id} is in use by another" in r for r in refused), refused
    assert not owner.result.errors and np.array_equal(owner.result.video, reference.video)
    assert_ready_and_drained(server)


def test_a_stream_dropped_as_idle_is_told_so(server, clip):
    """The next request of a stream lipsync dropped as idle is told so, with the timeout; once Triton released the
    sequence too (twice the timeout after the last request) Triton answers itself. The client library reports
    both as StreamExpired (is_stream_dropped_error)."""
    video, samples = clip
    assert_ready_and_drained(server)
    with OpenStream(server.grpc_url) as stream:
        stream.send({"AUDIO": audio_for(samples, 2)}, 7300, start=True, parameters={"steps": 1})
        assert stream.collect(1) == ["final"]
        wait_for(lambda: open_streams(server) == 0, IDLE_TIMEOUT_S * 2, "lipsync to drop the idle stream")
        stream.send({"FRAMES": video[:2], "AUDIO": NO_AUDIO}, 7300)
        (lipsync_says,) = stream.collect(1)
        time.sleep(2 * IDLE_TIMEOUT_S + 2)
        stream.send({"FRAMES": video[:2], "AUDIO": NO_AUDIO}, 7300, end=True)
        (triton_says,) = stream.collect(1)
    assert f"stream 7300 was dropped after {IDLE_TIMEOUT_S:g} s without requests" in lipsync_says, lipsync_says
    assert "must specify the START flag" in triton_says, triton_says
    assert is_stream_dropped_error(lipsync_says) and is_stream_dropped_error(triton_says)
    assert_ready_and_drained(server)


# ------------------------------------------------------------------------------------------------ faults
def test_client_vanishing_mid_stream_frees_its_state(server, clip):
    """The gRPC stream is closed after the audio and some frames, without sequence_end: the stream's state
    (gauge) is freed by the idle timeout, and the next stream is served."""
    video, samples = clip
    assert_ready_and_drained(server)
    cut = run_stream(server.grpc_url, video[:2], audio_for(samples, NUM_FRAMES + 4), {"steps": 1}, end=False)
    assert not cut.errors and not cut.frames  # frames held for their window, then the client left
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
    # the stream above is freed just after its last response: until then the gauge still counts it, and the kill
    # below must wait for the CLI's own stream (else the CLI may not have connected yet)
    wait_for(lambda: open_streams(first) == 0, IDLE_TIMEOUT_S * 5, "the first stream to be freed")

    out = tmp_path / "out.mp4"
    cli = subprocess.Popen(
        CLI
        + [
            media / "demo1_video.mp4",
            media / "demo1_audio.wav",
            "-o",
            out,
            "--url",
            first.grpc_url,
            "--steps",
            "1",
            *FAST,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: open_streams(first) == 1 or cli.poll() is not None, 120, "the CLI's stream to open")
    assert cli.poll() is None, cli.communicate()
    os.killpg(first.pid, signal.SIGKILL)
    _, stderr = cli.communicate(timeout=120)
    assert cli.returncode == ServerUnreachable.exit_code, stderr
    assert "lost the connection" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list(tmp_path.iterdir()) == []  # no partial output, no temp file
    first.stop()
    assert not any(r.exists() for r in regions)

    again = triton_server(
        server.model_repository,
        timeout=600,
        grpc_port=first.grpc_port,
        http_port=first.http_port,
        metrics_port=first.metrics_port,
    )
    after = run_stream(again.grpc_url, video[:2], audio_for(samples, 2), {"steps": 1, "seed": 3})
    assert not after.errors and np.array_equal(after.video, before.video)
    assert_ready_and_drained(again)
    again.stop()


# ------------------------------------------------------------------------------------------------ memory
def test_memory_after_the_longest_stream_and_refused_huge_requests(server, clip):
    """Streams of the longest audio the contract takes (300 s): the lipsync stub returns to its memory after each
    (~0.7 GB of features at its peak; glibc kept ~90 MB of it before malloc_trim). AUDIO messages far over the
    limit, refused by name: a message is copied once into the lipsync stub's shared-memory pool, which keeps that
    size (Triton copies inputs in before the model can refuse them; a gateway limit bounds it), and the next such
    message grows nothing (tritonserver's pooled request objects kept each one's buffers before).
    RssAnon per process (shared memory counted as the /dev/shm pools), MB."""
    video, samples = clip
    longest = np.resize(samples, MAX_AUDIO_SAMPLES).astype(np.float32)
    assert not run_stream(server.grpc_url, video[:2], audio_for(samples, 2), {"steps": 1}).errors  # warm-up
    for _ in range(2):
        before = server_memory_mb(server)["lipsync"]
        result = run_stream(server.grpc_url, video[:2], longest, {"steps": 1})
        assert not result.errors and len(result.video) == 2, result.errors
        wait_for(
            lambda limit=before + 32: server_memory_mb(server)["lipsync"] < limit,
            30,  # its thread ended
            "the lipsync stub to return to its memory",
        )
    huge, levels = np.zeros(16 << 20, np.float32), [server_memory_mb(server)]  # 64 MiB: 1,048 s of audio
    for _ in range(2):
        refused = raw_stream(server.grpc_url, [({"AUDIO": huge}, True, True)], 7400)
        assert "the stream's audio is longer than 300 s" in refused[0], refused
        # freed gRPC slices go back when the preload library trims the idle heaps: the first 2 s period after the
        # message may have been busy, the next is idle
        time.sleep(5)
        levels.append(server_memory_mb(server))
    # The second message's growth is read against the highest level before it: the heaps move by whole 16 MiB
    # steps of their own (CI once saw tritonserver fall 9.8 MB after the first message and rise 16.0 after the
    # second). What this guards against, tritonserver keeping each message's buffers, grew 64 MiB per message.
    first = {k: levels[1][k] - levels[0][k] for k in levels[0]}
    second = {k: levels[2][k] - max(levels[0][k], levels[1][k]) for k in levels[0]}
    print("growth after a refused 64 MiB message, the first and the second:", first, second)
    assert first["shm:lipsync"] < 64 + 48 and first["lipsync"] < 16 and first["tritonserver"] < 64, first
    assert second["shm:lipsync"] <= 0 and second["lipsync"] < 16 and second["tritonserver"] < 32, second
    assert_ready_and_drained(server)


# ------------------------------------------------------------------------------------------------ soak
def test_soak_short(server, media):
    """8 concurrent CLI-path syncs for ~40 s: no errors, every output decodes to its full frame count, the
    gauge is back to 0, server memory growth stays under the bound latentsync-soak states (--max-rss-growth-mb)."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "latentsync_load.soak",
            "--short",
            "--url",
            server.grpc_url,
            "--metrics-url",
            server.metrics_url,
            "--server-pid",
            str(server.pid),
            "--clip",
            str(media / "demo1_video.mp4"),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    summary = json.loads(r.stdout)
    print(json.dumps(summary))
    assert r.returncode == 0 and summary["ok"], (summary, r.stderr[-2000:])
    assert summary["syncs"] >= summary["streams"] and summary["frames"] == summary["syncs"] * summary["frames_per_sync"]
