"""GPU benchmark of full-size LatentSync 1.5 / 1.6 models with random weights (same FLOPs as the real ones).

    latentsync-gpu-bench                  # on a GPU: 1.5 and 1.6 at 1 and 8 streams, well under 8 minutes
    latentsync-gpu-bench --tiny           # dry run on the CPU with scaled-down models (seconds)
    latentsync-gpu-bench --out DIR        # table as DIR/gpu_bench.md and DIR/gpu_bench.json ($OUT by default)

What it measures, per variant and stream count (the recipe: 20 DDIM steps, guidance 1.5):
  * one UNet step at batch 2 x streams (classifier-free guidance doubles every window) of 16-frame windows,
    fp16, SDPA attention, channels_last, cudnn autotuning; CUDA graphs on top where capture works;
  * the UNet's FLOPs per step (torch.utils.flop_counter on one forward, counted on the meta device with the
    math attention kernel so attention is included) -> achieved TFLOP/s, against the card's measured peak
    (a large fp16 matmul);
  * the VAE per window (encode masked + reference faces: 32 images; decode 16) at full size;
  * frames per second per GPU = streams x 16 / (steps x step time [+ VAE time]); derived rows for the opt-in
    trade-offs: DPM-Solver++ at 10 steps (same step cost, half the steps) and DeepCache interval 3 (a measured
    reused step, 7 full + 13 reused steps per window of 20).
Face detection, alignment and paste-back are not included (they run beside the UNet on a server).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from latentsync_core.configs import NUM_FRAMES, UNET_STAGE2, get_variant
from latentsync_core.deepcache import cached_step, full_step
from latentsync_core.models.unet3d import UNet3DConditionModel

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


@dataclass
class Settings:
    variants: list[str] = field(default_factory=lambda: ["1.5", "1.6"])
    streams: list[int] = field(default_factory=lambda: [1, 8])
    steps: int = 20
    frames: int = NUM_FRAMES
    warmup: int = 3
    iters: int = 10
    max_iter_s: float = 20.0        # stop timing a config after this many seconds (fewer iterations)
    budget_s: float = 420.0         # skip what is left after this (the whole run stays under 8 minutes)
    cuda_graphs: bool = True
    vae: bool = True
    deepcache_interval: int = 3
    matmul_n: int = 8192
    tiny: bool = False
    device: str = "cuda"
    dtype: str = "float16"


# ---------------------------------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, warmup: int, iters: int, max_s: float) -> float:
    """Median seconds per call after warm-up (cudnn autotuning, allocator growth)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters and (not times or time.perf_counter() - start < max_s):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_tflops(device: torch.device, dtype: torch.dtype, n: int, s: Settings) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_call(lambda: a @ b, device, s.warmup, s.iters, s.max_iter_s)
    return 2 * n**3 / t / 1e12


def cuda_graph(fn, device: torch.device):
    """Capture fn() (static inputs) into a CUDA graph; returns replay(), or raises if capture fails."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ---------------------------------------------------------------------------------------------------- models
def unet_config(s: Settings) -> dict:
    if s.tiny:
        from latentsync_core.tiny import TINY_UNET
        return TINY_UNET
    return UNET_STAGE2


def build_unet(s: Settings, device: torch.device, dtype: torch.dtype) -> UNet3DConditionModel:
    with torch.device(device):  # built in place: default inits, buffers (position tables) computed there
        unet = UNet3DConditionModel.from_config(unet_config(s))
    return unet.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def build_vae(s: Settings, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    if s.tiny:
        from latentsync_core.tiny import TINY_VAE
        cfg = TINY_VAE
    else:
        cfg = SD_VAE
    with torch.device(device):
        vae = AutoencoderKL(**cfg)
    return vae.to(dtype=dtype, memory_format=torch.channels_last).eval().requires_grad_(False)


def unet_flops(s: Settings, batch: int, latent: int) -> int:
    """FLOPs of one UNet forward, counted on the meta device (no memory, no compute)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet3DConditionModel.from_config(unet_config(s)).half()
        sample, audio, t = unet_inputs(batch, s.frames, latent, torch.device("meta"), torch.float16)
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            unet(sample, t, audio)
    return counter.get_total_flops()


def unet_inputs(batch: int, frames: int, latent: int, device, dtype):
    sample = torch.randn(batch, 13, frames, latent, latent, device=device, dtype=dtype)
    audio = torch.randn(batch, frames, 50, 384, device=device, dtype=dtype)
    t = torch.full((batch,), 501, device=device, dtype=torch.int64)
    return sample, audio, t


# ---------------------------------------------------------------------------------------------------- run
@dataclass
class Row:
    variant: str
    streams: int
    batch: int
    latent: int
    step_ms: float | None = None
    graphs: bool = False
    tflop_per_step: float | None = None
    tflops: float | None = None
    peak_fraction: float | None = None
    vae_window_ms: float | None = None
    cached_step_ms: float | None = None
    unet_fps: float | None = None
    fps: float | None = None
    fps_dpm10: float | None = None
    fps_deepcache: float | None = None
    max_memory_gib: float | None = None
    note: str = ""


def run(s: Settings) -> dict:
    device = torch.device(s.device)
    dtype = getattr(torch, s.dtype)
    started = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    report = {"settings": asdict(s), "machine": machine(device), "rows": []}
    print(f"device {report['machine']['device']}", flush=True)

    peak = peak_tflops(device, dtype, s.matmul_n, s)
    report["peak_tflops"] = peak
    print(f"measured peak: {peak:.1f} TFLOP/s ({s.dtype} matmul {s.matmul_n}^3)", flush=True)

    unet = build_unet(s, device, dtype)
    report["unet_parameters"] = sum(p.numel() for p in unet.parameters())
    vae = build_vae(s, device, dtype) if s.vae else None
    use_graphs = s.cuda_graphs and device.type == "cuda"
    for variant in s.variants:
        resolution = get_variant(variant).resolution // (4 if s.tiny else 1)
        latent = resolution // 8
        vae_ms = measure_vae(vae, resolution, s, device, dtype) if vae is not None else None
        for streams in s.streams:
            row = Row(variant, streams, 2 * streams, latent, vae_window_ms=vae_ms)
            report["rows"].append(row)
            if time.perf_counter() - started > s.budget_s:
                row.note = "skipped: time budget"
                continue
            try:
                use_graphs = measure_unet(unet, row, s, device, dtype, use_graphs)
            except torch.cuda.OutOfMemoryError as e:
                row.note = f"out of memory: {str(e).splitlines()[0][:120]}"
                torch.cuda.empty_cache()
                continue
            row.tflop_per_step = unet_flops(s, row.batch, latent) / 1e12
            row.tflops = row.tflop_per_step / (row.step_ms / 1e3)
            row.peak_fraction = row.tflops / peak
            frames = streams * s.frames
            window_vae_s = streams * (vae_ms or 0.0) / 1e3
            row.unet_fps = frames / (s.steps * row.step_ms / 1e3)
            row.fps = frames / (s.steps * row.step_ms / 1e3 + window_vae_s)
            row.fps_dpm10 = frames / (10 * row.step_ms / 1e3 + window_vae_s)
            if row.cached_step_ms is not None:
                full = math.ceil(s.steps / s.deepcache_interval)
                unet_s = (full * row.step_ms + (s.steps - full) * row.cached_step_ms) / 1e3
                row.fps_deepcache = frames / (unet_s + window_vae_s)
            print(format_row(row), flush=True)
    report["elapsed_s"] = time.perf_counter() - started
    report["rows"] = [asdict(r) for r in report["rows"]]
    return report


def measure_unet(unet, row: Row, s: Settings, device, dtype, use_graphs: bool) -> bool:
    """Fills step_ms (graphs where possible), cached_step_ms and memory; returns whether graphs still work."""
    sample, audio, t = unet_inputs(row.batch, s.frames, row.latent, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        step = lambda: unet(sample, t, audio)  # noqa: E731
        eager_ms = time_call(step, device, s.warmup, s.iters, s.max_iter_s) * 1e3
        row.step_ms = eager_ms
        if use_graphs:
            try:
                replay = cuda_graph(step, device)
                graph_ms = time_call(replay, device, s.warmup, s.iters, s.max_iter_s) * 1e3
                row.graphs, row.step_ms = graph_ms < eager_ms, min(graph_ms, eager_ms)
                row.note = f"eager {eager_ms:.1f} ms, CUDA graph {graph_ms:.1f} ms"
                del replay
            except Exception as e:  # noqa: BLE001 - capture is an optimisation; report and go on eagerly
                row.note = f"CUDA graph capture failed ({type(e).__name__}); eager"
                use_graphs = False
            torch.cuda.empty_cache()
        if s.deepcache_interval > 1:
            _, cache = full_step(unet, sample, t, audio)
            row.cached_step_ms = time_call(lambda: cached_step(unet, sample, t, audio, cache), device,
                                           s.warmup, s.iters, s.max_iter_s) * 1e3
            del cache
    if device.type == "cuda":
        row.max_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return use_graphs


def measure_vae(vae, resolution: int, s: Settings, device, dtype) -> float:
    """Milliseconds of the VAE for one window: encode masked + reference faces (2 x frames), decode frames."""
    pixels = torch.randn(2 * s.frames, 3, resolution, resolution, device=device, dtype=dtype)
    latents = torch.randn(s.frames, 4, resolution // 8, resolution // 8, device=device, dtype=dtype)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        enc = time_call(lambda: vae.encode(pixels).latent_dist.mean, device, s.warmup, s.iters, s.max_iter_s)
        dec = time_call(lambda: vae.decode(latents).sample, device, s.warmup, s.iters, s.max_iter_s)
    return (enc + dec) * 1e3


def machine(device: torch.device) -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        info["device"] = f"CPU ({torch.get_num_threads()} threads)"
    return info


# ---------------------------------------------------------------------------------------------------- output
COLUMNS = ("variant", "streams", "UNet batch", "step ms", "CUDA graph", "TFLOP/step", "TFLOP/s", "% of peak",
           "VAE ms/window", "reused step ms", "UNet-only fps", "fps (UNet+VAE)", "fps DPM++ 10", "fps DeepCache 3",
           "max GiB", "note")


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def format_row(r: Row | dict) -> str:
    r = r if isinstance(r, dict) else asdict(r)
    cells = [r["variant"], str(r["streams"]), str(r["batch"]), _f(r["step_ms"]), "yes" if r["graphs"] else "no",
             _f(r["tflop_per_step"], 2), _f(r["tflops"]), _f(r["peak_fraction"] and 100 * r["peak_fraction"]),
             _f(r["vae_window_ms"]), _f(r["cached_step_ms"]), _f(r["unet_fps"], 2), _f(r["fps"], 2),
             _f(r["fps_dpm10"], 2), _f(r["fps_deepcache"], 2), _f(r["max_memory_gib"]), r["note"]]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"### GPU benchmark: {m['device']} (torch {m['torch']}, CUDA {m.get('cuda', '-')})", "",
             f"Random full-size weights{' (TINY dry run: scaled-down models)' if s['tiny'] else ''}; "
             f"{s['steps']} steps, guidance on (2 UNet items per window), {s['frames']}-frame windows, "
             f"{s['dtype']}. Measured peak: {report['peak_tflops']:.1f} TFLOP/s ({s['dtype']} matmul "
             f"{s['matmul_n']}^3). UNet parameters: {report['unet_parameters'] / 1e6:.0f} M. "
             f"Run took {report['elapsed_s']:.0f} s.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [format_row(r) for r in report["rows"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--tiny", action="store_true", help="CPU dry run: scaled-down UNet and VAE, few iterations")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="output folder ($OUT or .)")
    p.add_argument("--variants", default="1.5,1.6")
    p.add_argument("--streams", default="1,8", help="concurrent streams (UNet batch = 2 x streams)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=420.0, help="skip remaining configs after this many seconds")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--no-vae", action="store_true")
    p.add_argument("--deepcache-interval", type=int, default=3, help="1 = do not measure reused steps")
    p.add_argument("--device", default=None, help="default: cuda when available (a --tiny run: cpu)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device; use --tiny for a CPU dry run")
    on_cpu = device == "cpu"
    s = Settings(variants=a.variants.split(","), streams=[int(x) for x in a.streams.split(",")], steps=a.steps,
                 budget_s=a.budget_s, cuda_graphs=not a.no_cuda_graphs, vae=not a.no_vae,
                 deepcache_interval=a.deepcache_interval, tiny=a.tiny, device=device,
                 dtype="float32" if on_cpu else "float16")
    if on_cpu:  # a dry run proves the code path, it does not measure anything worth keeping
        s.warmup, s.iters, s.matmul_n, s.max_iter_s = 1, 2, 512, 5.0
    if a.iters:
        s.iters = a.iters
    return s, a.out


def main(argv=None) -> int:
    settings, out = parse_args(argv)
    report = run(settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_bench.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / 'gpu_bench.md'} and {out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
