"""The in-process reference pipeline on the project's tiny weights and real frames (MediaPipe detector)."""

import os
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from latentsync_contract import num_frames_for_audio
from latentsync_core.audio import load_audio
from latentsync_core.checkpoints import CheckpointError
from latentsync_core.loaders import load_pipeline, load_vae, locate
from latentsync_core.pipeline import LipSyncPipeline, NoFaceInStream, WindowedStream
from latentsync_core.tiny import make_tiny_weights

SHARED = Path(os.environ.get("LATENTSYNC_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="module")
def pipeline(tiny_weights):
    return load_pipeline(tiny_weights, "1.5")


@pytest.fixture(scope="module")
def clip():
    frames = []
    with av.open(str(SHARED / "media" / "demo1_video.mp4")) as c:
        for f in c.decode(video=0):
            frames.append(f.to_ndarray(format="rgb24", width=540, height=960))
            if len(frames) == 18:
                break
    audio = load_audio(SHARED / "media" / "demo1_audio.wav")
    return frames, audio[: 16000 * 2]


def run(pipeline, frames, audio, **params):
    results = list(pipeline(frames, audio, steps=1, **params))
    return (
        np.concatenate([r.frames for r in results]),
        np.concatenate([r.indices for r in results]),
        np.concatenate([r.face_found for r in results]),
    )


def test_windows_and_face_edit(pipeline, clip):
    frames, audio = clip
    out, idx, found = run(pipeline, frames, audio, seed=3)
    assert out.shape == np.stack(frames).shape and out.dtype == np.uint8
    assert idx.tolist() == list(range(len(frames)))
    assert found.all()
    diff = np.abs(out.astype(int) - np.stack(frames).astype(int)).max(axis=-1)
    # Only the lower face changes: a small part of the frame, the top rows never.
    assert 0.002 < (diff > 0).mean() < 0.2
    assert not diff[:, :200].any()


def test_seed_determinism(pipeline, clip):
    frames, audio = clip
    a = run(pipeline, frames[:4], audio, seed=5)[0]
    b = run(pipeline, frames[:4], audio, seed=5)[0]
    c = run(pipeline, frames[:4], audio, seed=6)[0]
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_frames_without_face_pass_through(pipeline, clip):
    frames, audio = clip
    frames = [f.copy() for f in frames[:6]]
    frames[2][:] = 0
    frames[4][:] = 128
    out, _, found = run(pipeline, frames, audio, seed=1)
    assert found.tolist() == [True, True, False, True, False, True]
    assert np.array_equal(out[2], frames[2]) and np.array_equal(out[4], frames[4])


def test_frame_count_follows_audio(pipeline, clip):
    frames, audio = clip
    short = audio[:4000]  # 0.25 s of speech -> upstream's count of frames
    n = num_frames_for_audio(len(short))
    assert n < len(frames)
    out, idx, _ = run(pipeline, frames, short, seed=1)
    assert len(out) == n and idx[-1] == n - 1


def test_parameter_validation(pipeline):
    with pytest.raises(ValueError, match="guidance"):
        pipeline.stream(guidance=0.5)
    with pytest.raises(ValueError, match="steps"):
        pipeline.stream(steps=0)
    with pytest.raises(ValueError, match="variant"):
        LipSyncPipeline(pipeline.models, "2.0")


def test_weights_folder_errors(tmp_path, tiny_weights):
    with pytest.raises(CheckpointError, match="weights folder not found"):
        locate(tmp_path / "nope")
    (tmp_path / "w").mkdir()
    with pytest.raises(CheckpointError, match="latentsync_unet.pt: missing"):
        locate(tmp_path / "w")
    assert locate(tiny_weights).is_random


def test_taesd_roundtrip_on_a_real_face(clip):
    """The real TAESD (tests only, from ../shared/models) keeps a face recognisable: PSNR well above random."""
    from latentsync_core.vae import sample_latents

    codec = load_vae(SHARED / "models")
    face = torch.from_numpy(clip[0][0][300:556, 150:406]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        rec = codec.decode(sample_latents(codec.posterior(face), torch.Generator().manual_seed(0)))
    mse = ((rec.clamp(-1, 1) - face) ** 2).mean().item() / 4  # in [0, 1] units
    psnr = 10 * np.log10(1 / mse)
    assert psnr > 20, psnr


def run_windows(pipeline, audio, pushes, overlap: bool, stream=None) -> list:
    """The results of a WindowedStream fed `pushes` (arrays of frames) in order, their regions pasted into copies
    of the frames (as a client does)."""
    video = np.concatenate(pushes)
    stream = stream or pipeline.stream(steps=1, seed=11)
    stream.set_audio(audio)
    results, errors = [], []
    windows = WindowedStream(stream, lambda r, _: results.append(r), lambda e, _: errors.append(e), overlap=overlap)
    for frames in pushes:
        windows.push(frames)
    windows.end()
    done = threading.Event()
    windows.after(done.set)
    assert done.wait(300)
    windows.close()
    assert not errors, errors
    for result in results:
        result.apply(video[result.indices].copy())
    return results


@pytest.mark.slow
def test_overlapped_windows_give_the_same_frames(pipeline, clip):
    """A server prepares a stream's next window while the current one denoises (WindowedStream overlap): the
    frames are exactly those of the one-window-at-a-time path."""
    frames, audio = clip
    video = np.stack(frames[:18])
    pushes = [video[i : i + 4] for i in range(0, len(video), 4)]
    np.testing.assert_array_equal(
        np.concatenate([r.frames for r in run_windows(pipeline, audio, pushes, True)]),
        np.concatenate([r.frames for r in run_windows(pipeline, audio, pushes, False)]),
    )


def test_pushed_frames_are_not_kept(pipeline, clip):
    """A server copies each request's frames out of Triton's shared memory once, and a push ingests them at once
    (detection, alignment, paste regions): nothing the windows keep refers to them, in any chunking, and the
    frames are the same whatever the chunking."""
    frames, audio = clip
    video = np.stack(frames[:18])
    stream = pipeline.stream(steps=1, seed=11)
    stream.set_audio(audio)
    windows = WindowedStream(stream, lambda r, _: None, overlap=False)
    given = video[:10].copy()
    windows.push(given)
    kept = [a for r in windows.pending for a in (r.region, r.face) if a is not None]
    assert len(kept) > 10 and not any(np.shares_memory(a, given) for a in kept)
    assert sum(a.nbytes for a in kept) < given.nbytes / 4  # a talking head fills much of a 540x960 frame
    whole = run_windows(pipeline, audio, [video], overlap=True)
    ones = run_windows(pipeline, audio, [video[i : i + 1] for i in range(len(video))], overlap=True)
    np.testing.assert_array_equal(np.concatenate([r.frames for r in whole]), np.concatenate([r.frames for r in ones]))


def test_a_prepared_window_keeps_only_its_paste_regions(pipeline, clip):
    """After alignment a window holds no whole frame, only copies of its faces' paste regions (all paste-back
    reads), and its result is what changed: boxes and regions that rebuild the synced frames."""
    frames, audio = clip
    video = np.stack(frames[:16])
    stream = pipeline.stream(steps=1, seed=2)
    stream.set_audio(audio)
    window = stream.prepare(video.copy())
    assert not any(np.shares_memory(r, video) for r in window.regions)
    held = sum(r.nbytes for r in window.regions)
    assert 0 < held < video.nbytes / 8, (held, video.nbytes)  # a face region of a 540x960 talking head
    result = stream.finish(window, stream.denoise(window))
    assert result.frames is None and len(result.regions) == len(video) == len(result.boxes)
    for region, (y0, y1, x0, x1), found in zip(result.regions, result.boxes, result.face_found):
        assert region.shape == ((y1 - y0, x1 - x0, 3) if found else (0, 0, 3))
    synced = result.apply(video.copy())
    changed = np.flatnonzero((synced != video).any(axis=(1, 2, 3)))
    assert set(changed) <= set(np.flatnonzero(result.face_found)) and len(changed)


def test_no_face_in_the_whole_stream_is_an_error_at_its_end(pipeline, clip):
    """The stream rule the server applies, in the oracle too: frames pass through, then NoFaceInStream."""
    _, audio = clip
    blank = [np.zeros((96, 64, 3), np.uint8)] * 3
    got = []
    with pytest.raises(NoFaceInStream, match="no face found in any of the 3 frames"):
        for window in pipeline(blank, audio, steps=1):
            got.append(window.frames)
    np.testing.assert_array_equal(np.concatenate(got), np.stack(blank))


BF16_MAX_PIXEL_ERROR = 24  # uint8 levels; measured: 9 (this clip, tiny random weights, CPU; docs/PERFORMANCE.md)


@pytest.mark.slow
def test_bfloat16_costs_at_most_a_few_levels_per_pixel(tiny_weights, clip):
    """What half precision costs: the same window in float32 and in bfloat16 (UNet and VAE), on the CPU."""
    frames, audio = clip
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = load_pipeline(tiny_weights, "1.5", dtype=dtype)
        outputs[dtype] = np.concatenate([w.frames for w in pipe(frames[:4], audio, steps=2, seed=3)])
    err = np.abs(outputs[torch.float32].astype(int) - outputs[torch.bfloat16].astype(int))
    edited = (outputs[torch.float32] != np.stack(frames[:4])).mean()
    print(
        f"bfloat16 vs float32, one window: max {err.max()} levels, {(err > 0).mean():.2e} of values differ "
        f"({edited:.3f} of values edited)"
    )
    assert edited > 0.005
    assert err.max() <= BF16_MAX_PIXEL_ERROR
