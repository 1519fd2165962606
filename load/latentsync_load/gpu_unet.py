"""(a) of latentsync-gpu-bench: one step of the full-size UNet (random weights, upstream's stage2 config) per batch.

Per variant (1.5: latent 32, 1.6: latent 64) and UNet batch (2 items per window under guidance): the step's
time eager, replayed as a CUDA graph, and (at the batches given) under torch.compile; its FLOPs (counted once
per variant on the meta device with the math attention kernel, so attention counts; a step's FLOPs are linear
in the batch), the achieved TFLOP/s against the card's measured matmul peak, and the frames per second that
step time allows at 20 steps: windows x 16 frames / (20 x step), UNet alone and with the VAE's time per window
(encode masked + reference faces, decode); derived from the same times, the opt-in trade-offs: DPM-Solver++ at
10 steps, and DeepCache at interval 3 (a measured reused step: 7 full + 13 reused steps per 20).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from latentsync_core.configs import NUM_FRAMES, UNET_STAGE2, get_variant
from latentsync_core.deepcache import cached_step, full_step
from latentsync_core.models.unet3d import UNet3DConditionModel
from latentsync_core.tiny import SD_VAE, TINY_UNET, TINY_VAE

GOAL_FPS = {"1.5": 40.0, "1.6": 9.0}  # per GPU, at 20 steps
DEEPCACHE_INTERVAL = 3


@dataclass
class UNetRow:
    variant: str
    batch: int  # UNet items; windows = batch / 2
    latent: int
    tflop_per_step: float | None = None
    eager_ms: float | None = None
    graph_ms: float | None = None
    compiled_ms: float | None = None
    compile_s: float | None = None
    best_ms: float | None = None
    reused_ms: float | None = None  # DeepCache's reused step (eager)
    tflops: float | None = None  # at the best time
    peak_fraction: float | None = None
    vae_window_ms: float | None = None
    unet_fps: float | None = None  # at 20 steps (Settings.steps)
    fps: float | None = None  # UNet + VAE
    fps_dpm10: float | None = None  # UNet + VAE, DPM-Solver++ at 10 steps
    fps_deepcache: float | None = None  # UNet + VAE, DeepCache interval 3
    max_memory_gib: float | None = None
    note: str = ""

    @property
    def windows(self) -> int:
        return self.batch // 2


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


def peak_tflops(device: torch.device, dtype: torch.dtype, n: int, warmup: int, iters: int) -> float:
    """The card's dense matmul rate in this dtype, measured (random data)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_call(lambda: a @ b, device, warmup, iters, 20.0) / 1e12


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


def compiled_time(
    module, inputs: tuple, device: torch.device, mode: str | None, backend: str, warmup: int, iters: int, max_s: float
) -> tuple[float, float]:
    """(compile seconds, seconds per call) of torch.compile(module) on fixed-shape inputs."""
    compiled = torch.compile(module, mode=mode, backend=backend, dynamic=False)
    try:
        start = time.perf_counter()
        with torch.no_grad():
            compiled(*inputs)
            sync(device)
            compile_s = time.perf_counter() - start
            return compile_s, time_call(lambda: compiled(*inputs), device, warmup, iters, max_s)
    finally:
        torch._dynamo.reset()  # drops the compiled graphs (and their CUDA graph pools) before the next shape


# ---------------------------------------------------------------------------------------------------- models
def unet_config(tiny: bool) -> dict:
    return TINY_UNET if tiny else UNET_STAGE2


def build_unet(tiny: bool, device: torch.device, dtype: torch.dtype, channels_last: bool) -> UNet3DConditionModel:
    with torch.device(device):  # built in place: default inits, buffers (position tables) computed there
        unet = UNet3DConditionModel.from_config(unet_config(tiny))
    unet = unet.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return unet.eval().requires_grad_(False)


def build_vae(tiny: bool, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE))
    return vae.to(dtype=dtype).eval().requires_grad_(False)


def unet_inputs(batch: int, frames: int, latent: int, device, dtype) -> tuple:
    """(sample, timesteps, audio) of one step, in the UNet's argument order."""
    sample = torch.randn(batch, 13, frames, latent, latent, device=device, dtype=dtype)
    t = torch.full((batch,), 501, device=device, dtype=torch.int64)
    audio = torch.randn(batch, frames, 50, 384, device=device, dtype=dtype)
    return sample, t, audio


def unet_flops(tiny: bool, batch: int, frames: int, latent: int) -> int:
    """FLOPs of one UNet forward, counted on the meta device (no memory, no compute)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet3DConditionModel.from_config(unet_config(tiny)).half()
        inputs = unet_inputs(batch, frames, latent, torch.device("meta"), torch.float16)
        with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
            unet(*inputs)
    return counter.get_total_flops()


def variant_latent(variant: str, tiny: bool) -> int:
    """Latent side: 32 (1.5) or 64 (1.6); a quarter of the resolution in a tiny dry run."""
    return get_variant(variant).resolution // (4 if tiny else 1) // 8


# ---------------------------------------------------------------------------------------------------- measuring
def measure_vae(vae, latent: int, frames: int, device, dtype, warmup: int, iters: int, max_s: float) -> float:
    """Milliseconds of the VAE for one window: encode masked + reference faces (2 x frames), decode frames."""
    pixels = torch.randn(2 * frames, 3, latent * 8, latent * 8, device=device, dtype=dtype)
    latents = torch.randn(frames, 4, latent, latent, device=device, dtype=dtype)
    with torch.no_grad():
        enc = time_call(lambda: vae.encode(pixels).latent_dist.mean, device, warmup, iters, max_s)
        dec = time_call(lambda: vae.decode(latents).sample, device, warmup, iters, max_s)
    return (enc + dec) * 1e3


def measure_step(
    unet, row: UNetRow, frames: int, device, dtype, graphs_below_ms: float, warmup: int, iters: int, max_s: float
) -> None:
    """Eager step time, then as a CUDA graph where the eager step is short enough for launch overhead to matter
    (on a GPU; a capture failure is noted and skipped)."""
    inputs = unet_inputs(row.batch, frames, row.latent, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        step = lambda: unet(*inputs)  # noqa: E731
        row.eager_ms = time_call(step, device, warmup, iters, max_s) * 1e3
        _, feature = full_step(unet, *inputs)
        row.reused_ms = time_call(lambda: cached_step(unet, *inputs, feature), device, warmup, iters, max_s) * 1e3
        if device.type == "cuda" and row.eager_ms < graphs_below_ms:
            try:
                replay = cuda_graph(step, device)
                row.graph_ms = time_call(replay, device, warmup, iters, max_s) * 1e3
                del replay
            except Exception as e:  # noqa: BLE001 - capture is an optimisation: report it, keep eager
                row.note = f"CUDA graph capture failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    if device.type == "cuda":
        row.max_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.empty_cache()


def finish_row(row: UNetRow, peak: float, steps: int, frames: int) -> None:
    """Best time and what follows from it: TFLOP/s, share of the peak, frames per second at `steps` steps."""
    times = [t for t in (row.eager_ms, row.graph_ms, row.compiled_ms) if t is not None]
    if not times:
        return
    row.best_ms = min(times)
    if row.tflop_per_step is not None:
        row.tflops = row.tflop_per_step / (row.best_ms / 1e3)
        row.peak_fraction = row.tflops / peak if peak else None
    seconds = steps * row.best_ms / 1e3
    row.unet_fps = row.windows * frames / seconds
    if row.vae_window_ms is None:
        return
    vae_s = row.windows * row.vae_window_ms / 1e3
    row.fps = row.windows * frames / (seconds + vae_s)
    row.fps_dpm10 = row.windows * frames / (10 * row.best_ms / 1e3 + vae_s)
    if row.reused_ms is not None:
        full = math.ceil(steps / DEEPCACHE_INTERVAL)
        unet_s = (full * row.best_ms + (steps - full) * row.reused_ms) / 1e3
        row.fps_deepcache = row.windows * frames / (unet_s + vae_s)


def out_of_memory(row: UNetRow, e: Exception) -> None:
    row.note = f"out of memory: {str(e).splitlines()[0][:120]}"
    torch.cuda.empty_cache()


def frames_per_window(tiny: bool) -> int:
    return 2 if tiny else NUM_FRAMES  # a CPU dry run proves the code path with less work
