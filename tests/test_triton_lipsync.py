"""The `lipsync` deployment on a real Triton server (tiny random weights, CPU target, real gRPC streaming).

* parity: for 1.5 and 1.6, a stream through Triton equals the in-process LipSyncPipeline on the same weights,
  mask image, frames, audio and seed (uint8 frames; the max abs error is printed and must be 0 or a stray 1);
* batching: 4 concurrent streams share UNet executions (Triton's own statistics);
* the stream contract: errors that name the input/parameter, pass-through of face-less frames, state freed
  at the end, after an error and after the idle timeout (the model's `lipsync_open_streams` gauge).
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from helpers import OpenStream, StreamResult, audio_for, metric, reference_video, run_stream, wait_for

from latentsync_contract import AUDIO, FRAMES
from latentsync_contract import WINDOW as NUM_FRAMES
from latentsync_export.export import ExportOptions, build_repository
from latentsync_serving.bls import FRAME_CALL_BYTES, call_spans

pytestmark = pytest.mark.timeout(1200)

IDLE_TIMEOUT_S = 4.0
STEPS = 2  # few DDIM steps keep CPU time down; the loop is the same for 20


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory, shared_dir):
    """Tiny random weights with upstream's mask.png: the parity test below then also shows that the served path
    masks as the in-process one does (its mask differs from the drawn one along the jaw: ~270 pixels at 256)."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    mask = shared_dir / "golden" / "mask.png"
    options = ExportOptions(out=out, tiny=True, idle_timeout_s=IDLE_TIMEOUT_S, max_queue_delay_us=20000)
    assert build_repository(dataclasses.replace(options, mask_image=mask))["mask"] == "lipsync/1/mask.png"
    return out


@pytest.fixture(scope="module")
def server(triton_server, tiny_repo):
    return triton_server(tiny_repo, timeout=600)


# ---------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("variant,n_frames,steps", [("1.5", NUM_FRAMES + 2, 2), ("1.6", 3, 1)])
def test_triton_equals_in_process_pipeline(server, tiny_repo, clip, variant, n_frames, steps):
    """1.5: two windows (16 + a short one), 2 DDIM steps, the 16 frames detected in two calls; 1.6 (4x the
    pixels): one short window, 1 step."""
    frames, samples = clip
    frames = frames[:n_frames]
    audio = audio_for(samples, n_frames)
    params = {"steps": steps, "guidance": 1.5, "seed": 4321, "variant": variant}
    detector_calls = metric(server, "lipsync_bls_requests", 0.0, callee="face_detector")
    restorer_calls = metric(server, "lipsync_bls_requests", 0.0, callee="restorer")
    got = run_stream(server.grpc_url, frames, audio, params)
    assert not got.errors, got.errors
    if variant == "1.5":  # a window's 16 faces at 256 px (0.79 MB each, with their regions) in calls of 10 MiB
        assert metric(server, "lipsync_bls_requests", callee="restorer") - restorer_calls >= 3
    # a request's frames reach the detector in calls of at most FRAME_CALL_BYTES: 6 of these frames, 3 calls for 16
    calls = sum(
        len(call_spans(len(frames[i : i + NUM_FRAMES]), frames[0].nbytes, FRAME_CALL_BYTES))
        for i in range(0, n_frames, NUM_FRAMES)
    )
    assert metric(server, "lipsync_bls_requests", callee="face_detector") - detector_calls == calls
    assert [len(f) for f in got.frames] == [len(frames[i : i + NUM_FRAMES]) for i in range(0, n_frames, NUM_FRAMES)]
    np.testing.assert_array_equal(np.concatenate(got.indices), np.arange(n_frames))
    assert np.concatenate(got.found).all(), "the face of the real clip must be found in every frame"

    want = reference_video(tiny_repo, variant, frames, audio, steps=steps, guidance=1.5, seed=4321)
    err = np.abs(got.video.astype(np.int16) - want.astype(np.int16))
    print(
        f"variant {variant}: Triton vs in-process max abs error {err.max()} (uint8), "
        f"{(err > 0).mean():.2e} of values differ; {(want != frames).mean():.3f} of values were edited"
    )
    assert (want != frames).mean() > 0.005, "the pipeline edited (almost) nothing: the comparison proves little"
    assert err.max() <= 1 and (err > 0).mean() < 1e-4
    # another seed gives another result (the seed reaches the stream's generator)
    if variant == "1.6":
        other = run_stream(server.grpc_url, frames[:1], audio, {**params, "seed": 4322})
        assert not other.errors and not np.array_equal(other.video[0], got.video[0])


# ---------------------------------------------------------------------------------------------------- batching
def test_concurrent_streams_share_denoiser_steps(server, tiny_repo, clip):
    """The denoiser advances the windows of all streams in flight together: fewer loop iterations than
    window-steps (its own counters), and batching does not change a stream's result."""
    frames, samples = clip
    n_streams, n_frames = 4, 6
    audio = audio_for(samples, n_frames)
    counters = ("denoiser_steps", "denoiser_window_steps", "denoiser_windows")
    before = {c: metric(server, c, default=0.0, model="denoiser_1.5") for c in counters}  # none before a step
    results: dict[int, StreamResult] = {}

    def one(i):
        results[i] = run_stream(
            server.grpc_url,
            frames[:n_frames],
            audio,
            {"steps": STEPS, "guidance": 1.5, "seed": 100 + i, "variant": "1.5"},
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    delta = {c: metric(server, c, model="denoiser_1.5") - before[c] for c in counters}
    print(
        f"denoiser_1.5 over {n_streams} streams: {delta}; windows per step "
        f"{delta['denoiser_window_steps'] / delta['denoiser_steps']:.2f}"
    )
    assert all(not r.errors for r in results.values()), [r.errors for r in results.values()]
    assert delta["denoiser_windows"] == n_streams  # one window per stream
    assert delta["denoiser_window_steps"] == n_streams * STEPS  # each window's every step, inside the denoiser
    assert delta["denoiser_steps"] < delta["denoiser_window_steps"]  # windows of different streams shared steps
    # its backlog gauge (the autoscaler's second signal) is exported, and empty once every window is answered
    assert metric(server, "denoiser_waiting_windows", model="denoiser_1.5") == 0

    # Batching does not change a stream's result: its own seeded generator draws its noise.
    want = reference_video(tiny_repo, "1.5", frames[:n_frames], audio, steps=STEPS, guidance=1.5, seed=100)
    err = np.abs(results[0].video.astype(np.int16) - want.astype(np.int16))
    print(f"batched stream vs in-process: max abs error {err.max()}, {(err > 0).mean():.2e} of values differ")
    assert err.max() <= 1 and (err > 0).mean() < 1e-3


def test_a_window_crosses_once_whatever_its_steps(server, clip):
    """Per window, each model gets one request, and its bytes do not depend on the number of steps: every step
    (guidance's zero-audio branch, the UNet, the sampler) runs inside the denoiser; nothing crosses per step."""
    frames, samples = clip
    audio = audio_for(samples, 3)
    traffic = ("lipsync_bls_requests", "lipsync_bls_input_bytes", "lipsync_bls_output_bytes")
    callees = ("face_detector", "vae_encoder", "denoiser_1.5", "vae_decoder", "restorer")

    def per_window(steps: int) -> dict:
        before = {(t, c): metric(server, t, default=0.0, callee=c) for t in traffic for c in callees}
        got = run_stream(server.grpc_url, frames[:3], audio, {"steps": steps, "variant": "1.5"})
        assert not got.errors, got.errors
        return {k: metric(server, k[0], callee=k[1]) - v for k, v in before.items()}

    one, many = per_window(1), per_window(4)
    print({f"{t}/{c}": one[(t, c)] for t, c in one})
    assert one == many
    assert all(one[("lipsync_bls_requests", c)] == 1 for c in callees)
    # what the denoiser receives once per window: latents, mask, masked and reference latents, audio chunks
    latent, frames_n = 32 * 32, 3
    assert one[("lipsync_bls_input_bytes", "denoiser_1.5")] == 4 * frames_n * (13 * latent + 50 * 384)
    # the encoder's masked and reference faces go as uint8 faces plus uint8 keep levels, not float pixels
    assert one[("lipsync_bls_input_bytes", "vae_encoder")] == 2 * frames_n * (3 + 1) * 256 * 256


# ---------------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize(
    "params,name",
    [
        ({"steps": 0}, "steps"),
        ({"guidance": 0.5}, "guidance"),
        ({"variant": "2.0"}, "variant"),
        ({"seed": -1}, "seed"),
        ({"step": 3}, "step"),
    ],
)
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
    too_many = run_stream(server.grpc_url, frames[:4], audio_for(samples, 4)[: 320 * 3], {"steps": 1})
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


NO_AUDIO = np.zeros(0, np.float32)


def test_a_request_that_completes_no_window_is_final_on_arrival_unless_frames_queue_up(server, clip):
    """Window-less requests of frames are answered final when they arrive, not after the window in flight
    (Triton then frees them and their gRPC messages: docs/OPERATIONS.md "Memory"), unless frames of the stream
    already wait in its queue (ingest_backlog_frames): then when the stream takes it in, which holds back a
    client that waits for them. A window's response goes to the request that completed it."""
    frames, audio = clip
    n = 3 * NUM_FRAMES + 12
    frames = frames[np.arange(n) % len(frames)]
    audio = audio_for(audio, n)
    stream = OpenStream(server.grpc_url)
    try:
        # Window 1 must still denoise when requests 2 and 6 arrive: 5 steps are seconds of tiny UNet on 2 cores
        # against milliseconds between the sends (20 steps cost CI 294 s here).
        sid, params = 7_654_321, {"steps": 5}
        stream.send({FRAMES: np.zeros((0, *frames.shape[1:]), np.uint8), AUDIO: audio}, sid, True, False, params)

        def part(a, b):
            return {FRAMES: np.ascontiguousarray(frames[a:b]), AUDIO: NO_AUDIO}

        w = NUM_FRAMES
        stream.send(part(0, w), sid)  # request 1 completes window 1
        stream.send(part(w, w + 4), sid)  # request 2 completes none, with no frames queued before it
        stream.send(part(w + 4, 2 * w), sid)  # request 3 completes window 2
        # Request 4 completes window 3, which waits for window 1 to be answered (two windows in flight at most):
        # the stream thread takes nothing more meanwhile, so request 5's frames are still queued when 6 arrives.
        stream.send(part(2 * w, 3 * w), sid)
        stream.send(part(3 * w, 3 * w + 4), sid)  # request 5 completes none
        stream.send(part(3 * w + 4, 3 * w + 8), sid)  # request 6 completes none, behind request 5's frames
        stream.send(part(3 * w + 8, n), sid, end=True)  # request 7 ends the stream
        order = []
        while len([e for e in order if e[1] == "final"]) < 8:
            reply, error = stream.replies.get(timeout=600)
            assert error is None, error
            response = reply.get_response()
            final = response.parameters["triton_final_response"].bool_param
            order.append((response.id, "final" if final else "data"))
    finally:
        stream.close()
    assert order.index(("2", "final")) < order.index(("1", "data")), order  # request 2 did not wait for window 1
    assert order.index(("6", "final")) > order.index(("1", "data")), order  # request 6 waited in the queue
    for request in ("1", "3", "4", "7"):  # each window goes to the request that completed it, then its final
        assert order.index((request, "data")) < order.index((request, "final")), order
