"""DeepCache parity: the real DeepCache library (PyPI DeepCache 0.1.1, as upstream's inference scripts enable it:
`DeepCacheSDHelper(cache_interval=3, cache_branch_id=0)`) wrapped around this project's UNet gives the same
denoised latents as latentsync_core.deepcache, per stream and with windows of two streams batched at different
steps. fp32 on CPU.

The library is installed from the package registry into a temporary folder (pip --no-deps --target): its
top-level import is only `DeepCache.extension.deepcache`, which imports nothing; its declared dependencies
(torch, diffusers, transformers) serve its bundled Stable Diffusion pipelines, which are not used.
"""

import importlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from latentsync_core.deepcache import deepcache_plan
from latentsync_core.denoise import WindowConditioning, WindowJob, denoise_window, step
from latentsync_core.models.unet3d import UNet3DConditionModel
from latentsync_core.samplers import make_sampler
from latentsync_core.tiny import TINY_UNET, redraw_

pytestmark = pytest.mark.slow  # a few minutes on 2 cores

DEEPCACHE = "DeepCache==0.1.1"
# Upstream runs 20 steps; 8 keep the test short and, like 20, are not a multiple of the interval, so a step count
# that ran on across windows instead of restarting would make the second window's first step a cached one.
STEPS, GUIDANCE, INTERVAL = 8, 1.5, 3
FULL_STEPS = sum(deepcache_plan(k, INTERVAL) for k in range(STEPS))  # per window: steps 0, 3, 6


@pytest.fixture(scope="module")
def deepcache_helper(tmp_path_factory):
    target = str(tmp_path_factory.mktemp("deepcache-site"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--target",
            target,
            DEEPCACHE,
        ],
        check=True,
    )
    sys.path.insert(0, target)
    try:
        yield importlib.import_module("DeepCache").DeepCacheSDHelper
    finally:
        sys.path.remove(target)
        for name in [m for m in sys.modules if m == "DeepCache" or m.startswith("DeepCache.")]:
            del sys.modules[name]


def tiny_unet() -> UNet3DConditionModel:
    model = UNet3DConditionModel.from_config(TINY_UNET).eval()
    model.load_state_dict(redraw_(model.state_dict(), torch.Generator().manual_seed(0), skip=("pos_encoder.pe",)))
    return model


def window(seed, frames=2, hw=8):
    g = torch.Generator().manual_seed(seed)
    cond = WindowConditioning(
        mask=torch.rand(1, 1, frames, hw, hw, generator=g).round(),
        masked=torch.randn(1, 4, frames, hw, hw, generator=g),
        reference=torch.randn(1, 4, frames, hw, hw, generator=g),
        audio=torch.randn(frames, 50, 384, generator=g),
    )
    return torch.randn(1, 4, frames, hw, hw, generator=g), cond


def count_calls(module, counts, name):
    counts[name] = 0
    return module.register_forward_hook(lambda *_: counts.__setitem__(name, counts[name] + 1))


@pytest.fixture(scope="module")
def library_result(deepcache_helper):
    """Upstream's use: one pipe, the helper enabled once, every window the whole DDIM schedule with guidance."""
    unet = tiny_unet()
    pipe = SimpleNamespace(unet=unet, scheduler=make_sampler("ddim", STEPS))
    helper = deepcache_helper(pipe=pipe)
    helper.set_params(cache_interval=INTERVAL, cache_branch_id=0)
    helper.enable()
    counts = {}
    hooks = [
        count_calls(unet.down_blocks[0].resnets[0].conv1, counts, "deep"),  # full steps only
        count_calls(unet.up_blocks[-1].resnets[-1].conv1, counts, "last_layer"),  # every step
        count_calls(unet.up_blocks[-1].motion_modules[0], counts, "rerun_motion"),
    ]  # not wrapped: every step

    def upstream_unet(sample, timesteps, audio):  # upstream passes t itself; the library looks up its index
        return pipe.unet(sample, timesteps[0], audio)

    try:
        with torch.no_grad():
            latents = [denoise_window(upstream_unet, *window(seed), pipe.scheduler, GUIDANCE) for seed in (0, 1)]
    finally:
        helper.disable()
        for h in hooks:
            h.remove()
    return latents, counts


def test_library_caches_what_the_module_docstring_says(library_result):
    _, counts = library_result
    assert FULL_STEPS == 3
    assert counts == {"deep": 2 * FULL_STEPS, "last_layer": 2 * STEPS, "rerun_motion": 2 * STEPS}


def test_project_deepcache_per_stream_equals_the_library(library_result):
    """One window at a time through the project's loop (denoise.WindowJob with DeepCache): exactly the library."""
    expected, _ = library_result
    unet, counts = tiny_unet(), {}
    hook = count_calls(unet.down_blocks[0].resnets[0].conv1, counts, "deep")
    with torch.no_grad():
        latents = [
            denoise_window(unet, *window(seed), make_sampler("ddim", STEPS), GUIDANCE, deepcache=INTERVAL)
            for seed in (0, 1)
        ]
    hook.remove()
    assert counts["deep"] == 2 * FULL_STEPS  # the deep layers run on full steps only
    for got, want in zip(latents, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_project_deepcache_batched_windows_at_different_steps_equal_the_library(library_result):
    """Two streams' windows share every UNet call, as in the denoiser model: the second starts one step later, so
    most calls mix a full and a cached window (two sub-batches) and the others hold two cached ones."""
    expected, _ = library_result
    unet = tiny_unet()
    jobs = [WindowJob(*window(seed), make_sampler("ddim", STEPS), GUIDANCE, INTERVAL) for seed in (0, 1)]
    with torch.no_grad():
        step(unet, jobs[:1])  # the first window's step 0 alone; then both together
        while not all(job.done for job in jobs):
            step(unet, [job for job in jobs if not job.done])
    # Not bit-exact: CPU kernels round differently for other batch sizes (the cached steps run 4 items where the
    # library runs 2). Measured: 3e-7 of the largest |latent|, i.e. a few float32 ulps.
    for job, want in zip(jobs, expected):
        err, peak = (job.latents - want).abs().max().item(), want.abs().max().item()
        assert err <= 1e-6 * peak, f"max abs error {err:.3g} exceeds 1e-6 x max |latent| {peak:.3g}"
