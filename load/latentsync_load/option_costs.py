"""`latentsync-option-costs`: what each per-stream option costs per frame, from measured model calls.

    latentsync-option-costs --out results/cpu/options          # full-size 1.5 models, random weights, this CPU
    latentsync-option-costs --tiny --out /tmp/options          # scaled-down models: checks the code path only

Measures, on one device and dtype, with upstream's full-size architectures and random weights (costs do not
depend on the values): one guided UNet step of a 16-frame window (batch 2), DeepCache's reused step on the same
inputs, the VAE's work per window (encode masked + reference faces, decode), and the face enhancer per face
(GFPGAN v1.4's architecture at 512, the 256 px face resized up and back). From those, per frame:

    recipe                                    UNet calls per window        what it is
    ddim 20                                   20 full                      upstream's pipeline defaults
    ddim 20 + deepcache 3                     7 full + 13 reused           upstream's inference scripts
    dpmsolver++ 10                            10 full                      half the steps, another sampler
    dpmsolver++ 10 + deepcache 3              4 full + 6 reused
    + enhance                                 + 1 enhancer call per face

Face detection, alignment and paste-back are the same for every option (latentsync-bench's per-stage table).
Writes OUT/options.json and OUT/options.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latentsync_core.deepcache import cached_step, deepcache_plan, full_step

from . import gpu_unet as g

RECIPES = (  # (name, sampler, steps, deepcache interval)
    ("ddim 20 (upstream's defaults)", "ddim", 20, 0),
    ("ddim 20 + deepcache 3 (upstream's scripts)", "ddim", 20, 3),
    ("dpmsolver++ 10", "dpmsolver++", 10, 0),
    ("dpmsolver++ 10 + deepcache 3", "dpmsolver++", 10, 3),
)


@dataclass
class Costs:
    device: str
    dtype: str
    variant: str
    frames: int
    unet_step_ms: float  # one guided step of a window (batch 2)
    reused_step_ms: float  # DeepCache's reused step, same inputs
    vae_window_ms: float
    enhancer_face_ms: float | None


def time_once(fn, device: torch.device, iters: int) -> float:
    """Seconds per call: one untimed call (allocations, kernel choice), then the mean of `iters`."""
    return g.time_call(fn, device, warmup=1, iters=iters, max_s=1e9)


def measure(device: torch.device, dtype: torch.dtype, variant: str, tiny: bool, iters: int, enhance: bool) -> Costs:
    frames = g.frames_per_window(tiny)
    latent = g.variant_latent(variant, tiny)
    unet = g.build_unet(tiny, device, dtype, channels_last=False)
    inputs = g.unet_inputs(2, frames, latent, device, dtype)
    with torch.no_grad():
        step_s = time_once(lambda: unet(*inputs), device, iters)
        _, feature = full_step(unet, *inputs)
        reused_s = time_once(lambda: cached_step(unet, *inputs, feature), device, iters)
    vae = g.build_vae(tiny, device, dtype)
    vae_ms = g.measure_vae(vae, latent, frames, device, dtype, 1, iters, 1e9)
    face_ms = None
    if enhance:
        from latentsync_core.face.enhance import FaceEnhancer
        from latentsync_core.tiny import face_restorer_network

        # GFPGAN loads only at its official size; a dry run uses the scaled-down network of the tests instead.
        hyper = dict(out_size=64, num_style_feat=64, channel_multiplier=1, narrow=0.125) if tiny else {}
        with torch.device(device):
            enhancer = FaceEnhancer(face_restorer_network("GFPGAN", **hyper), "GFPGAN", size=64 if tiny else 512)
        enhancer = enhancer.to(dtype)
        faces = torch.rand(1, 3, latent * 8, latent * 8, device=device, dtype=dtype) * 2 - 1
        face_ms = time_once(lambda: enhancer(faces), device, iters) * 1e3
    return Costs(
        str(device), str(dtype).removeprefix("torch."), variant, frames, step_s * 1e3, reused_s * 1e3, vae_ms, face_ms
    )


def recipe_rows(c: Costs) -> list[dict]:
    rows = []
    for name, sampler, steps, interval in RECIPES:
        full = sum(deepcache_plan(i, interval) for i in range(steps)) if interval else steps
        reused = steps - full
        unet_ms = (full * c.unet_step_ms + reused * c.reused_step_ms) / c.frames
        rows.append(
            {
                "recipe": name,
                "sampler": sampler,
                "steps": steps,
                "deepcache": interval,
                "full_steps": full,
                "reused_steps": reused,
                "unet_ms_per_frame": unet_ms,
                "vae_ms_per_frame": c.vae_window_ms / c.frames,
                "ms_per_frame": unet_ms + c.vae_window_ms / c.frames,
            }
        )
    base = rows[0]["ms_per_frame"]
    for r in rows:
        r["vs_upstream_defaults"] = r["ms_per_frame"] / base
    return rows


def markdown(c: Costs, rows: list[dict], machine: str) -> str:
    lines = [
        f"Option costs, {c.variant} at {c.frames} frames per window, {c.dtype} on {c.device} ({machine}); full UNet "
        f"step {c.unet_step_ms:.0f} ms, DeepCache reused step {c.reused_step_ms:.0f} ms "
        f"({c.reused_step_ms / c.unet_step_ms:.1%}), VAE {c.vae_window_ms / c.frames:.0f} ms per frame.",
        "",
        "| recipe | UNet calls per window | UNet ms/frame | + VAE ms/frame | vs upstream's defaults |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        calls = f"{r['full_steps']} full" + (f" + {r['reused_steps']} reused" if r["reused_steps"] else "")
        lines.append(
            f"| {r['recipe']} | {calls} | {r['unet_ms_per_frame']:,.0f} | {r['ms_per_frame']:,.0f} | "
            f"{r['vs_upstream_defaults']:.2f}x |"
        )
    if c.enhancer_face_ms is not None:
        lines.append(
            f"| + enhance (GFPGAN v1.4 architecture, 512 px) | + 1 enhancer call per face | "
            f"+{c.enhancer_face_ms:,.0f} | | +{c.enhancer_face_ms / rows[0]['ms_per_frame']:.1%} of the defaults |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="latentsync-option-costs",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--variant", default="1.5")
    p.add_argument("--iters", type=int, default=1, help="timed calls of each model (after one untimed)")
    p.add_argument("--tiny", action="store_true", help="scaled-down models: a dry run of the code path")
    p.add_argument("--no-enhance", action="store_true", help="skip the enhancer")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    started = time.perf_counter()
    costs = measure(device, getattr(torch, a.dtype), a.variant, a.tiny, a.iters, not a.no_enhance)
    rows = recipe_rows(costs)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    if a.tiny:
        machine += ", TINY scaled-down models"
    a.out.mkdir(parents=True, exist_ok=True)
    report = {"costs": asdict(costs), "recipes": rows, "machine": machine, "seconds": time.perf_counter() - started}
    (a.out / "options.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(costs, rows, machine)
    (a.out / "options.md").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
