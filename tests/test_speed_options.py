"""The opt-in speed/quality trade-offs: DPM-Solver++ (fewer steps) and DeepCache-style feature reuse."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from latentsync_core.configs import SCHEDULER_CONFIG
from latentsync_core.deepcache import _rows, cached_step, deepcache_plan, deepcache_step, full_step
from latentsync_core.denoise import WindowConditioning, denoise_window
from latentsync_core.models.unet3d import UNet3DConditionModel
from latentsync_core.samplers import make_sampler
from latentsync_core.tiny import TINY_UNET, redraw_


@pytest.fixture(scope="module")
def unet():
    model = UNet3DConditionModel.from_config(TINY_UNET).eval()
    model.load_state_dict(redraw_(model.state_dict(), torch.Generator().manual_seed(0), skip=("pos_encoder.pe",)))
    return model


def window(frames=2, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = WindowConditioning(
        mask=torch.rand(1, 1, frames, hw, hw, generator=g).round(),
        masked=torch.randn(1, 4, frames, hw, hw, generator=g),
        reference=torch.randn(1, 4, frames, hw, hw, generator=g),
        audio=torch.randn(frames, 50, 384, generator=g),
    )
    return torch.randn(1, 4, frames, hw, hw, generator=g), cond


@pytest.mark.parametrize("steps", [20, 7])
def test_ddim_sampler_is_upstreams_scheduler(steps):
    """Upstream's scheduler_config.json as is; 'leading' spacing: k * (1000 // steps) + steps_offset, descending."""
    ddim = make_sampler("ddim", steps)
    assert type(ddim) is DDIMScheduler
    assert all(ddim.config[k] == v for k, v in SCHEDULER_CONFIG.items() if k != "skip_prk_steps")  # a PNDM field
    leading = torch.arange(steps - 1, -1, -1) * (1000 // steps) + SCHEDULER_CONFIG["steps_offset"]
    assert torch.equal(ddim.timesteps, leading)


def test_dpm_solver_restarts_in_every_window(unet):
    """Two windows from the same inputs must give the same latents: the solver history is per window."""
    latents, cond = window()
    sampler = make_sampler("dpmsolver++", 3)
    assert len(sampler.timesteps) == 3
    with torch.no_grad():
        first = denoise_window(unet, latents, cond, sampler, 1.5)
        second = denoise_window(unet, latents, cond, sampler, 1.5)
        fresh = denoise_window(unet, latents, cond, make_sampler("dpmsolver++", 3), 1.5)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(fresh, first, rtol=0, atol=0)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler", 10)


def test_deepcache_full_and_reused_steps_match_the_unet(unet):
    sample = torch.randn(2, 13, 2, 8, 8)
    t = torch.tensor([901, 901])
    audio = torch.randn(2, 2, 50, 384)
    with torch.no_grad():
        reference = unet(sample, t, audio)
        out, cache = full_step(unet, sample, t, audio)
        reused = cached_step(unet, sample, t, audio, cache)  # same input: same result from the cached feature
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    torch.testing.assert_close(reused, reference, rtol=1e-5, atol=1e-5)


def test_deepcache_runs_the_full_unet_every_interval_steps_of_each_window(unet):
    latents, cond = window()
    counts = {"deep": 0}
    hook = (
        unet.down_blocks[0]
        .resnets[0]
        .conv1.register_forward_hook(lambda *_: counts.__setitem__("deep", counts["deep"] + 1))
    )
    with torch.no_grad():
        for _ in range(2):  # two windows: the count restarts in each
            out = denoise_window(unet, latents, cond, make_sampler("ddim", 4), 1.5, deepcache=3)
    hook.remove()
    assert counts["deep"] == 2 * 2  # steps 0 and 3 of 4 are full, in each window
    with torch.no_grad():
        exact = denoise_window(unet, latents, cond, make_sampler("ddim", 4), 1.5, deepcache=1)
        plain = denoise_window(unet, latents, cond, make_sampler("ddim", 4), 1.5)
    torch.testing.assert_close(exact, plain, rtol=0, atol=0)
    assert torch.isfinite(out).all() and not torch.equal(out, plain)  # an approximation, not the same output


def test_deepcache_plan_counts_from_each_windows_first_step():
    assert [deepcache_plan(k, 3) for k in range(7)] == [True, False, False, True, False, False, True]
    assert all(deepcache_plan(k, 1) for k in range(5))
    with pytest.raises(ValueError, match="interval"):
        deepcache_plan(0, 0)


def test_deepcache_step_serves_items_at_different_steps(unet):
    """One batch, three items: full, cached (on its own earlier feature), full; each group runs as one batch."""
    g = torch.Generator().manual_seed(1)
    sample, audio = torch.randn(3, 13, 2, 8, 8, generator=g), torch.randn(3, 2, 50, 384, generator=g)
    t = torch.tensor([951, 651, 301])
    with torch.no_grad():
        _, earlier = full_step(unet, sample[1:2] * 0.5, 701, audio[1:2])  # item 1's last full step
        out, features = deepcache_step(unet, sample, t, audio, [None, earlier, None])
        full, full_features = full_step(unet, sample[0::2], t[0::2], audio[0::2])
        reused = cached_step(unet, sample[1:2], t[1:2], audio[1:2], earlier)
    torch.testing.assert_close(out, torch.cat([full[:1], reused, full[1:]]), rtol=0, atol=0)
    assert features[1] is earlier
    torch.testing.assert_close(torch.cat([features[0], features[2]]), full_features, rtol=0, atol=0)
    assert not torch.allclose(reused, unet(sample[1:2], t[1:2], audio[1:2]), atol=1e-3)  # really the old feature


def test_deepcache_rows_by_slices_equal_an_index_select():
    """DeepCache picks and reorders batch rows by slices of consecutive runs (no index tensor from host memory,
    which on a GPU waits for the queued UNet work): the same rows as index_select, for subsets and permutations."""
    rng = np.random.default_rng(0)
    t = torch.randn(9, 2, 3)
    for _ in range(50):
        index = sorted(rng.choice(9, rng.integers(1, 10), replace=False).tolist())
        if rng.random() < 0.5:
            index = rng.permutation(index).tolist()
        assert torch.equal(_rows(t, index), t.index_select(0, torch.tensor(index))), index
