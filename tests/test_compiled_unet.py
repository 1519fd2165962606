"""The denoiser's compiled UNet (latentsync-export --compile-unet): full windows at fixed batch sizes, padded;
everything else eager. Dynamo's graph capture with the eager backend stands in for inductor on this CPU."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch
from helpers import NoMetricsPb

from latentsync_core.models.unet3d import UNet3DConditionModel
from latentsync_core.tiny import TINY_UNET
from latentsync_serving.compiled_unet import CompiledUNet


def tiny_unet() -> UNet3DConditionModel:
    torch.manual_seed(0)
    return UNet3DConditionModel(**TINY_UNET).eval()


def inputs(items: int, frames: int, size: int = 8):
    g = torch.Generator().manual_seed(items * 100 + frames)
    sample = torch.randn(items, 13, frames, size, size, generator=g)
    return sample, torch.arange(items) * 37 + 1, torch.randn(items, frames, 50, 384, generator=g)


def test_batch_sizes_are_buckets_up_to_the_largest_and_only_full_windows_are_compiled():
    wrapped = CompiledUNet(torch.nn.Identity(), "reduce-overhead", 12, backend="eager")
    assert wrapped.buckets == (2, 4, 8, 12)
    assert [wrapped.bucket(n, 16) for n in (1, 2, 3, 5, 12, 13)] == [2, 2, 4, 8, 12, None]
    assert wrapped.bucket(3, 15) is None  # a stream's last window: eager


@pytest.mark.slow  # ~45 s: dynamo traces the tiny UNet at two batch sizes
def test_padded_compiled_calls_give_each_items_eager_output_and_the_rest_runs_eager():
    unet = tiny_unet()
    wrapped = CompiledUNet(unet, "default", 4, backend="eager")
    calls = []
    wrapped.compiled = lambda *xs, f=wrapped.compiled: calls.append(len(xs[0])) or f(*xs)
    with torch.no_grad():
        full = inputs(3, 16)  # 3 items -> the bucket of 4 (one padding item)
        torch.testing.assert_close(wrapped(*full), unet(*full), rtol=1e-5, atol=1e-5)
        short = inputs(3, 8)  # fewer frames: the eager module, the same call
        assert torch.equal(wrapped(*short), unet(*short))
        wrapped.warm_up(8, torch.device("cpu"), torch.float32, log=lambda text: None)
    assert calls == [4] + [2] * 3 + [4] * 3  # the padded call, then warm_up: 3 calls per bucket
    assert wrapped.embed == unet.embed and wrapped.config is unet.config  # DeepCache's pieces: the module's


@pytest.mark.slow  # ~20 s: dynamo traces the tiny UNet once
def test_the_denoiser_compiles_every_bucket_on_its_loop_thread_before_it_is_ready():
    from latentsync_serving.denoiser import DenoiserService

    wrapped = CompiledUNet(tiny_unet(), "default", 2, backend="eager")
    threads = []
    wrapped.compiled = lambda *xs, f=wrapped.compiled: threads.append(threading.current_thread().name) or f(*xs)
    service = DenoiserService(NoMetricsPb(), wrapped, torch.device("cpu"), torch.float32, 1, "denoiser_t", 8)
    assert service.ready.wait(300) and service.startup_error is None
    assert threads == ["denoiser_t-loop"] * 3  # the bucket of 2 items, three calls

    broken = CompiledUNet(torch.nn.Identity(), "default", 2, backend="eager")  # no config: warm-up fails
    failed = DenoiserService(NoMetricsPb(), broken, torch.device("cpu"), torch.float32, 1, "denoiser_b", 8)
    assert failed.ready.wait(60) and "AttributeError" in failed.startup_error


@pytest.mark.slow  # ~4 min on 2 cores: inductor compiles the tiny UNet inside the denoiser's stub
def test_a_repository_with_compile_unet_loads_compiled_and_serves_what_the_eager_pipeline_gives(
    triton_server, clip, tmp_path
):
    """A real server: the denoiser compiles its one batch size (max_windows 1: 2 items) in its stub before it is
    ready (which needs the stub's files read as UTF-8, backend.utf8_locale), then serves a window through it."""
    from helpers import audio_for, reference_video, run_stream

    from latentsync_export.export import ExportOptions, build_repository

    repo = tmp_path / "repo"
    build_repository(ExportOptions(out=repo, tiny=True, variants=("1.5",), max_windows=1, compile_unet="default"))
    log = tmp_path / "tritonserver.log"
    server = triton_server(repo, timeout=900, log_path=log)
    assert re.search(r"UNet compiled \(default\) for 2 items of 16 frames in \d+ s", log.read_text())
    frames, samples = clip
    frames, audio = frames[:16], audio_for(samples, 16)
    got = run_stream(server.grpc_url, frames, audio, {"steps": 2, "seed": 7})
    assert not got.errors and np.concatenate(got.found).all()
    want = reference_video(repo, "1.5", frames, audio, steps=2, seed=7)
    err = np.abs(got.video.astype(np.int16) - want.astype(np.int16))
    print(f"compiled vs eager: max abs error {err.max()}, {(err > 0).mean():.2e} of values differ")
    assert err.max() <= 2 and (err > 0).mean() < 1e-3  # inductor's fused float32 arithmetic, not bit-identical
