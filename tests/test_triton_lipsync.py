"""The `lipsync` deployment on a real Triton server (tiny random weights, CPU target, real gRPC streaming).

* parity: for 1.5 and 1.6, a stream through Triton equals the in-process LipSyncPipeline on the same weights,
  frames, audio and seed (uint8 frames; the max abs error is printed and must be 0 or a stray 1);
* batching: 4 concurrent streams share UNet executions (Triton's own statistics);
* the stream contract: errors that name the input/parameter, pass-through of face-less frames, state freed
  at the end, after an error and after the idle timeout (the model's `lipsync_open_streams` gauge).
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")

from latentsync_core.audio import load_audio, num_frames_for_audio  # noqa: E402
from latentsync_core.configs import NUM_FRAMES  # noqa: E402
from latentsync_export.export import ExportOptions, build_repository, load_reference  # noqa: E402

pytestmark = pytest.mark.timeout(1200)

IDLE_TIMEOUT_S = 4.0
STEPS = 2             # few DDIM steps keep CPU time down; the loop is the same for 20
_ids = itertools.count(1000)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    build_repository(ExportOptions(out=out, tiny=True, idle_timeout_s=IDLE_TIMEOUT_S, max_queue_delay_us=20000))
    return out


@pytest.fixture(scope="module")
def server(triton_server, tiny_repo):
    return triton_server(tiny_repo, timeout=600)


@pytest.fixture(scope="module")
def clip(shared_dir):
    """Half-size frames of a real clip and its 16 kHz speech (a few frames more than any test sends)."""
    import av

    frames = []
    with av.open(str(shared_dir / "media" / "demo1_video.mp4")) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=frame.width // 2, height=frame.height // 2))
            if len(frames) == NUM_FRAMES + 8:
                break
    return np.stack(frames), load_audio(shared_dir / "media" / "demo1_audio.wav")


def audio_for(samples: np.ndarray, n_frames: int) -> np.ndarray:
    """The shortest prefix of the track that covers n_frames video frames (upstream's frame count)."""
    n = n_frames * 640
    while num_frames_for_audio(n) < n_frames:
        n += 160
    return np.ascontiguousarray(samples[:n], np.float32)


# ---------------------------------------------------------------------------------------------------- client
@dataclass
class StreamResult:
    frames: list = field(default_factory=list)
    indices: list = field(default_factory=list)
    found: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def video(self) -> np.ndarray:
        return np.concatenate(self.frames)


def run_stream(url: str, frames: np.ndarray, audio: np.ndarray, params: dict | None, sequence_id: int | None = None,
               timeout: float = 600.0, start: bool = True, end: bool = True) -> StreamResult:
    """One stream per docs/PROTOCOL.md: whole audio first (sequence_start), then frames in windows of 16."""
    client = grpcclient.InferenceServerClient(url)
    replies: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    sequence_id = sequence_id or next(_ids)
    h, w = (frames.shape[1:3] if len(frames) else (8, 8))
    requests = [(np.zeros((0, h, w, 3), np.uint8), audio)] if audio is not None else []
    requests += [(np.ascontiguousarray(frames[i:i + NUM_FRAMES]), np.zeros(0, np.float32))
                 for i in range(0, len(frames), NUM_FRAMES)]
    for i, (f, a) in enumerate(requests):
        inputs = [grpcclient.InferInput("FRAMES", list(f.shape), "UINT8"), grpcclient.InferInput("AUDIO", list(a.shape), "FP32")]
        inputs[0].set_data_from_numpy(f)
        inputs[1].set_data_from_numpy(a)
        first, last = i == 0 and start, i == len(requests) - 1 and end
        client.async_stream_infer("lipsync", inputs, request_id=str(i), sequence_id=sequence_id,
                                  sequence_start=first, sequence_end=last, enable_empty_final_response=True,
                                  parameters=params if first and params else None)
    result, finals = StreamResult(), 0
    try:
        while finals < len(requests):
            reply, error = replies.get(timeout=timeout)
            if error is not None:
                result.errors.append(str(error))
                finals += 1
                continue
            response = reply.get_response()
            finals += response.parameters["triton_final_response"].bool_param
            if response.outputs:
                result.frames.append(reply.as_numpy("FRAMES"))
                result.indices.append(reply.as_numpy("FRAME_INDEX"))
                result.found.append(reply.as_numpy("FACE_FOUND"))
    finally:
        client.stop_stream()
        client.close()
    return result


def reference_video(repo, variant, frames, audio, **params) -> np.ndarray:
    pipeline = load_reference(repo, variant)
    return np.concatenate([w.frames for w in pipeline(frames, audio, **params)])


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]
    assert values, f"metric {name} not exported"
    return sum(values)


def unet_stats(server, model: str) -> dict:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    stats = client.get_inference_statistics(model, headers=server.grpc_admin_headers, as_json=True)["model_stats"][0]
    batches = {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}
    return {"requests": int(stats["inference_stats"]["success"].get("count", 0)),
            "inferences": int(stats.get("inference_count", 0)), "executions": int(stats.get("execution_count", 0)),
            "batches": batches}


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant,n_frames,steps", [("1.5", NUM_FRAMES + 2, 2), ("1.6", 3, 1)])
def test_triton_equals_in_process_pipeline(server, tiny_repo, clip, variant, n_frames, steps):
    """1.5: two windows (16 + a short one), 2 DDIM steps; 1.6 (4x the pixels): one short window, 1 step."""
    frames, samples = clip
    frames = frames[:n_frames]
    audio = audio_for(samples, n_frames)
    params = {"steps": steps, "guidance": 1.5, "seed": 4321, "variant": variant}
    got = run_stream(server.grpc_url, frames, audio, params)
    assert not got.errors, got.errors
    assert [len(f) for f in got.frames] == [len(frames[i:i + NUM_FRAMES]) for i in range(0, n_frames, NUM_FRAMES)]
    np.testing.assert_array_equal(np.concatenate(got.indices), np.arange(n_frames))
    assert np.concatenate(got.found).all(), "the face of the real clip must be found in every frame"

    want = reference_video(tiny_repo, variant, frames, audio, steps=steps, guidance=1.5, seed=4321)
    err = np.abs(got.video.astype(np.int16) - want.astype(np.int16))
    print(f"variant {variant}: Triton vs in-process max abs error {err.max()} (uint8), "
          f"{(err > 0).mean():.2e} of values differ; {(want != frames).mean():.3f} of values were edited")
    assert (want != frames).mean() > 0.005, "the pipeline edited (almost) nothing: the comparison proves little"
    assert err.max() <= 1 and (err > 0).mean() < 1e-4
    # another seed gives another result (the seed reaches the stream's generator)
    if variant == "1.6":
        other = run_stream(server.grpc_url, frames[:1], audio, {**params, "seed": 4322})
        assert not other.errors and not np.array_equal(other.video[0], got.video[0])


# ---------------------------------------------------------------------------------------------------- batching
def test_concurrent_streams_share_unet_executions(server, tiny_repo, clip):
    frames, samples = clip
    n_streams, n_frames = 4, 6
    audio = audio_for(samples, n_frames)
    before = unet_stats(server, "unet_1.5")
    results: dict[int, StreamResult] = {}

    def one(i):
        results[i] = run_stream(server.grpc_url, frames[:n_frames], audio,
                                {"steps": STEPS, "guidance": 1.5, "seed": 100 + i, "variant": "1.5"})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = unet_stats(server, "unet_1.5")
    requests = after["requests"] - before["requests"]
    executions = after["executions"] - before["executions"]
    inferences = after["inferences"] - before["inferences"]
    merged = {b: n - before["batches"].get(b, 0) for b, n in after["batches"].items() if b > 2}
    print(f"unet_1.5 over {n_streams} streams: {requests} requests (2 items each), {inferences} inferences, "
          f"{executions} executions; executions of batch > 2: {merged}")
    assert all(not r.errors for r in results.values()), [r.errors for r in results.values()]
    assert requests == n_streams * STEPS          # one UNet call per step per window, guidance in one call
    assert inferences == 2 * requests             # [unconditional, conditional] items of one window
    # windows of different streams ran together: fewer executions than requests, > 1 window per execution
    assert executions < requests and inferences > 2 * executions
    assert sum(merged.values()) > 0

    # Batching does not change a stream's result: its own seeded generator draws its noise.
    want = reference_video(tiny_repo, "1.5", frames[:n_frames], audio, steps=STEPS, guidance=1.5, seed=100)
    err = np.abs(results[0].video.astype(np.int16) - want.astype(np.int16))
    print(f"batched stream vs in-process: max abs error {err.max()}, {(err > 0).mean():.2e} of values differ")
    assert err.max() <= 1 and (err > 0).mean() < 1e-3


# ---------------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("params,name", [({"steps": 0}, "steps"), ({"guidance": 0.5}, "guidance"),
                                         ({"variant": "2.0"}, "variant"), ({"seed": -1}, "seed"),
                                         ({"step": 3}, "step")])
def test_bad_parameters_are_refused_by_name(server, clip, params, name):
    frames, samples = clip
    got = run_stream(server.grpc_url, frames[:1], audio_for(samples, 1), params)
    assert got.errors and f"'{name}'" in got.errors[0], got.errors
    assert not got.frames
    # every later request of the failed stream is refused too (the state was dropped at the error)
    assert all("already failed" in e for e in got.errors[1:]), got.errors


def test_frames_before_audio_and_past_the_audio_are_refused(server, clip):
    frames, samples = clip
    no_audio = run_stream(server.grpc_url, frames[:2], None, {"steps": 1})
    assert no_audio.errors and "AUDIO" in no_audio.errors[0], no_audio.errors
    too_many = run_stream(server.grpc_url, frames[:4], audio_for(samples, 4)[:320 * 3], {"steps": 1})
    assert too_many.errors and "past the end of the audio" in too_many.errors[0], too_many.errors


def test_faceless_frames_pass_through_and_a_faceless_stream_fails(server, clip):
    frames, samples = clip
    mixed = frames[:3].copy()
    mixed[1] = 0  # a blank frame inside a stream with a face
    got = run_stream(server.grpc_url, mixed, audio_for(samples, 3), {"steps": 1})
    assert not got.errors, got.errors
    np.testing.assert_array_equal(np.concatenate(got.found), [True, False, True])
    np.testing.assert_array_equal(got.video[1], mixed[1])
    assert not np.array_equal(got.video[0], mixed[0])

    blank = np.zeros_like(frames[:2])
    got = run_stream(server.grpc_url, blank, audio_for(samples, 2), {"steps": 1})
    np.testing.assert_array_equal(got.video, blank)  # sent back unchanged, then the stream fails
    assert got.errors and "no face found" in got.errors[-1], got.errors


def test_stream_state_is_freed_at_end_after_error_and_when_idle(server, clip):
    frames, samples = clip
    gauge = lambda: metric(server, "lipsync_open_streams")  # noqa: E731
    wait_for(lambda: gauge() == 0, 30, "earlier streams to close")
    # audio only, no sequence_end: the stream stays open until the idle timeout
    open_stream = run_stream(server.grpc_url, frames[:0], audio_for(samples, 2), {"steps": 1}, end=False)
    assert not open_stream.errors
    assert gauge() == 1
    wait_for(lambda: gauge() == 0, IDLE_TIMEOUT_S * 4, "the idle stream to be dropped")
