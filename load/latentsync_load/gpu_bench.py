"""`latentsync-gpu-bench`: the prepared GPU run: full-size LatentSync 1.5 / 1.6 models with random weights.

    latentsync-gpu-bench --bundle .gpu-bundle --out $OUT   # on the lent GPU machine (docs/PERFORMANCE.md)
    latentsync-gpu-bench --tiny --frames DIR --out DIR      # CPU dry run with scaled-down models
    latentsync-gpu-bench --tiny --serve ...                 # ... and a real (CPU) Triton server for (b)

Within --budget-s (7 minutes by default; the rest of 8 minutes is start-up), each part in turn, each skipped
with its reason when it cannot run or the time is spent, the report rewritten to OUT/gpu_bench.md and
OUT/gpu_bench.json after every measurement (a killed run leaves what it had):
  (a) gpu_unet: the UNet step at each --batches (2 items per window under guidance), bfloat16, eager and as a
      CUDA graph; TFLOP per step, TFLOP/s, share of the measured matmul peak, frames/s at 20 steps;
  (c) gpu_precision: bfloat16 against float32 on one window of the in-process pipeline, same random weights;
  (d) gpu_geometry: face alignment and paste-back on the GPU against the CPU (the golden-pinned path), TF32
      allowed meanwhile: values that differ and by how much, ms per frame on each side;
  (b) gpu_serving: a Triton server (the bundle's) on a --target gpu repository of the same weights: aggregate
      fps at --served-streams concurrent streams, mean windows per denoiser step, GPU busy share;
  (a) again: torch.compile (--compile-mode) at --compile-batches, with whatever time is left (slowest to set up).
With --bundle the script first unpacks the bundle (latentsync_load.gpu_bundle) and re-executes itself in the
bundle's environment, where the Triton stub finds the same packages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

from latentsync_load.gpu_bundle import BundleEnv, prepare

# The measuring modules import torch and latentsync_core (diffusers): only after --bundle made them importable.
ENV_VAR = "LATENTSYNC_GPU_BUNDLE_ENV"
PARTS = ("unet", "precision", "served", "geometry", "compile")  # in run order: (a) eager, (c), (b), (d), (a) compiled
STOP_S = 5  # (b): the server's exit timeout


@dataclass
class Settings:
    variants: list[str] = field(default_factory=lambda: ["1.5", "1.6"])
    batches: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32])
    steps: int = 20  # the recipe: the fps arithmetic of (a)
    run_steps: int = 20  # steps the pipeline and the served streams run
    window_frames: int = 16  # (c)'s window
    warmup: int = 2
    iters: int = 5
    max_iter_s: float = 10.0  # stop timing a config after this many seconds (fewer iterations)
    graphs_below_ms: float = 100.0  # CUDA graphs only where launch overhead can matter
    channels_last: bool = True
    compile_batches: list[int] = field(default_factory=lambda: [16])
    compile_mode: str = "reduce-overhead"
    precision_variants: list[str] = field(default_factory=lambda: ["1.5", "1.6"])
    geometry_frames: int = 8  # (d)
    geometry_resolutions: list[int] = field(default_factory=lambda: [256, 512])
    served_variants: list[str] = field(default_factory=lambda: ["1.5"])
    served_streams: list[int] = field(default_factory=lambda: [1, 8, 16])
    served_frames: int = 48  # per stream: 3 windows
    served_compile: str = ""  # (b): the denoiser's UNet under torch.compile in this mode ("": eager)
    served_max_windows: int = 0  # (b): the denoiser's --max-windows (0: the target's default)
    served_instances: dict[str, str] = field(default_factory=dict)  # (b): model -> KIND[:COUNT[:GPUS]]
    served_baseline: bool = False  # (b): the target's own placement too, before served_instances
    frame_side: int = 0  # resize face frames to this longer side (0: as bundled, 1080x1920)
    serve: bool = True  # start a server for (b); else only build its repository
    budget_s: float = 420.0
    unet_budget_s: float = 120.0  # (a) eager stops here, leaving time for (c) and (b)
    served_min_s: float = 150.0  # (b) needs this much left to start a server
    compile_min_s: float = 90.0
    matmul_n: int = 8192
    seed: int = 1247
    parts: list[str] = field(default_factory=lambda: list(PARTS))
    tiny: bool = False
    device: str = "cuda"
    dtype: str = "bfloat16"


class Deadline:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


# ---------------------------------------------------------------------------------------------------- report
class Report:
    """Everything measured so far; save() rewrites gpu_bench.json and gpu_bench.md."""

    def __init__(self, out: Path, settings: Settings):
        self.out, self.settings = out, settings
        self.machine: dict = {}
        self.peak_tflops: float | None = None
        self.unet: list = []
        self.precision: list = []
        self.geometry: list = []
        self.served: list = []
        self.gpu_source: str | None = None
        self.notes: list[str] = []
        self.elapsed_s = 0.0
        out.mkdir(parents=True, exist_ok=True)

    def note(self, text: str) -> None:
        print(f"NOTE: {text}", flush=True)
        self.notes.append(text)
        self.save()

    def as_dict(self) -> dict:
        return {
            "settings": asdict(self.settings),
            "machine": self.machine,
            "peak_tflops": self.peak_tflops,
            "unet": [asdict(r) for r in self.unet],
            "precision": [asdict(r) for r in self.precision],
            "geometry": [asdict(r) for r in self.geometry],
            "served": [asdict(r) for r in self.served],
            "gpu_busy_source": self.gpu_source,
            "notes": self.notes,
            "elapsed_s": self.elapsed_s,
        }

    def save(self) -> None:
        (self.out / "gpu_bench.json").write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        (self.out / "gpu_bench.md").write_text(markdown(self.as_dict()))


def _f(x, digits=1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


UNET_COLUMNS = (
    "variant",
    "UNet batch",
    "windows",
    "TFLOP/step",
    "eager ms",
    "CUDA graph ms",
    "compiled ms",
    "compile s",
    "TFLOP/s",
    "% of peak",
    "fps UNet",
    "fps UNet+VAE",
    "goal fps",
    "VAE ms/window",
    "reused step ms",
    "fps DPM++ 10",
    "fps DeepCache 3",
    "max GiB",
    "note",
)
SERVED_COLUMNS = (
    "variant",
    "streams",
    "frames",
    "wall s",
    "aggregate fps",
    "fps per stream",
    "first frame s",
    "windows per denoiser step",
    "GPU busy %",
    "errors",
)
PRECISION_COLUMNS = (
    "variant",
    "frames (faces)",
    "max latent diff",
    "mean latent diff",
    "latent scale",
    "max pixel diff",
    "mean pixel diff",
    "float32 s",
    "bfloat16 s",
)

GEOMETRY_COLUMNS = (
    "R",
    "frames",
    "crop values differing (max)",
    "face values differing (max)",
    "paste values differing (max)",
    "device ms/frame",
    "CPU ms/frame",
)


def _table(columns, rows) -> list[str]:
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + [
        "| " + " | ".join(cells) + " |" for cells in rows
    ]


def unet_cells(r: dict) -> list[str]:
    from latentsync_load.gpu_unet import GOAL_FPS

    return [
        r["variant"],
        str(r["batch"]),
        str(r["batch"] // 2),
        _f(r["tflop_per_step"], 2),
        _f(r["eager_ms"]),
        _f(r["graph_ms"]),
        _f(r["compiled_ms"]),
        _f(r["compile_s"], 0),
        _f(r["tflops"]),
        _f(r["peak_fraction"] and 100 * r["peak_fraction"]),
        _f(r["unet_fps"]),
        _f(r["fps"]),
        _f(GOAL_FPS.get(r["variant"]), 0),
        _f(r["vae_window_ms"]),
        _f(r["reused_ms"]),
        _f(r["fps_dpm10"]),
        _f(r["fps_deepcache"]),
        _f(r["max_memory_gib"]),
        r["note"],
    ]


def served_cells(r: dict) -> list[str]:
    return [
        r["variant"],
        str(r["streams"]),
        str(r["frames"]),
        _f(r["wall_s"]),
        _f(r["fps"]),
        _f(r["stream_fps"]),
        _f(r["first_frame_s"], 2),
        _f(r["windows_per_step"], 2),
        _f(r["gpu_busy"] and 100 * r["gpu_busy"], 0),
        f"{len(r['errors'])}{': ' + r['errors'][0] if r['errors'] else ''}{' ' + r['note'] if r['note'] else ''}",
    ]


def precision_cells(r: dict) -> list[str]:
    return [
        r["variant"],
        f"{r['frames']} ({r['faces']})",
        f"{r['max_latent_diff']:.3g}",
        f"{r['mean_latent_diff']:.3g}",
        f"{r['latent_scale']:.3g}",
        str(r["max_pixel_diff"]),
        f"{r['mean_pixel_diff']:.3f}",
        _f(r["float32_s"], 2),
        _f(r["bfloat16_s"], 2),
    ]


def geometry_cells(r: dict) -> list[str]:
    return [
        str(r["resolution"]),
        str(r["frames"]),
        f"{r['crop_differ']} ({r['crop_max_diff']})",
        f"{r['face_differ']} ({r['face_max_diff']})",
        f"{r['paste_differ']} ({r['paste_max_diff']})",
        _f(r["device_ms"], 2),
        _f(r["cpu_ms"], 2),
    ]


def markdown(d: dict) -> str:
    m, s = d["machine"], d["settings"]
    lines = [
        f"### GPU benchmark: {m.get('device', '?')} (torch {m.get('torch', '?')}, CUDA {m.get('cuda', '-')}, "
        f"Python {m.get('python', '?')})",
        "",
        f"Random {'TINY (dry run, scaled-down)' if s['tiny'] else 'full-size'} weights, {s['dtype']}, "
        f"{s['steps']} steps, guidance 1.5 (2 UNet items per window), 16-frame windows. Measured "
        f"{s['dtype']} matmul peak: {_f(d['peak_tflops'])} TFLOP/s ({s['matmul_n']}^3). Run took "
        f"{d['elapsed_s']:.0f} s.",
        "",
        "#### (a) UNet step",
        "",
        *_table(UNET_COLUMNS, [unet_cells(r) for r in d["unet"]]),
        "",
        "#### (b) Served path (Triton, latentsync-export --target gpu)",
        "",
        *_table(SERVED_COLUMNS, [served_cells(r) for r in d["served"]]),
        "",
        f"GPU busy share from: {d['gpu_busy_source'] or '-'}.",
        "",
        "#### (c) bfloat16 against float32 (one window, in-process pipeline)",
        "",
        *_table(PRECISION_COLUMNS, [precision_cells(r) for r in d["precision"]]),
        "",
        "#### (d) Alignment and paste-back on the device against the CPU (TF32 allowed)",
        "",
        *_table(GEOMETRY_COLUMNS, [geometry_cells(r) for r in d.get("geometry", [])]),
        "",
        "#### Notes",
        "",
        *[f"- {n}" for n in d["notes"]],
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- context
@dataclass
class Run:
    settings: Settings
    report: Report
    deadline: Deadline
    env: BundleEnv | None
    frames_dir: Path | None
    work: Path  # weights and repository (local disk)
    weights: Path | None = None

    @property
    def device(self):
        import torch

        return torch.device(self.settings.device)

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.settings.dtype)


def section(run: Run, name: str, fn, min_left_s: float = 0.0) -> None:
    """Run one part; a failure or a spent budget is a note, never the end of the run."""
    left = run.deadline.left()
    if left < min_left_s:
        run.report.note(f"{name}: skipped, {left:.0f} s of the time budget left (needs {min_left_s:.0f} s)")
        return
    print(f"=== {name} ({run.deadline.elapsed():.0f} s into the run)", flush=True)
    try:
        fn(run)
    except Exception as e:  # noqa: BLE001 - report it and go on with the next part
        traceback.print_exc()
        run.report.note(f"{name}: failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    finally:
        run.report.elapsed_s = run.deadline.elapsed()
        run.report.save()


# ---------------------------------------------------------------------------------------------------- parts
def machine_info(run: Run) -> None:
    import torch

    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    if run.device.type == "cuda":
        props = torch.cuda.get_device_properties(run.device)
        info.update(
            device=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    else:
        info["device"] = f"CPU ({torch.get_num_threads()} threads)"
    if run.env is not None:
        info.update(bundle_venv=run.env.venv, bundle_numpy1=run.env.numpy1, libpython=run.env.libpython)
        for note in run.env.notes:
            run.report.note(f"bundle: {note}")
    run.report.machine = info


def unet_eager(run: Run) -> None:
    import torch

    from latentsync_load import gpu_unet as g

    s, device, dtype = run.settings, run.device, run.dtype
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    run.report.peak_tflops = g.peak_tflops(device, dtype, s.matmul_n, s.warmup, s.iters)
    print(f"measured peak: {run.report.peak_tflops:.1f} TFLOP/s ({s.dtype} matmul {s.matmul_n}^3)", flush=True)
    frames = g.frames_per_window(s.tiny)
    unet, vae = g.build_unet(s.tiny, device, dtype, s.channels_last), g.build_vae(s.tiny, device, dtype)
    stop_at = min(s.unet_budget_s, s.budget_s)
    for variant in s.variants:
        latent = g.variant_latent(variant, s.tiny)
        tflop_per_item = g.unet_flops(s.tiny, 2, frames, latent) / 2 / 1e12
        vae_ms = g.measure_vae(vae, latent, frames, device, dtype, s.warmup, s.iters, s.max_iter_s)
        for batch in s.batches:
            row = g.UNetRow(variant, batch, latent, tflop_per_item * batch, vae_window_ms=vae_ms)
            run.report.unet.append(row)
            if run.deadline.elapsed() > stop_at:
                row.note = "skipped: time budget of (a)"
                continue
            try:
                g.measure_step(unet, row, frames, device, dtype, s.graphs_below_ms, s.warmup, s.iters, s.max_iter_s)
            except torch.cuda.OutOfMemoryError as e:
                g.out_of_memory(row, e)
            g.finish_row(row, run.report.peak_tflops, s.steps, frames)
            print(" | ".join(unet_cells(asdict(row))), flush=True)
            run.report.save()
    del unet, vae
    if device.type == "cuda":
        torch.cuda.empty_cache()


def unet_compiled(run: Run) -> None:
    import torch

    from latentsync_load import gpu_unet as g

    s, device, dtype = run.settings, run.device, run.dtype
    if device.type != "cuda":
        run.report.note("(a) torch.compile: skipped on the CPU (a dry run; inductor takes minutes here)")
        return
    frames = g.frames_per_window(s.tiny)
    unet = g.build_unet(s.tiny, device, dtype, s.channels_last)
    for row in [r for r in run.report.unet if r.batch in s.compile_batches]:
        if run.deadline.left() < s.compile_min_s:
            run.report.note(f"(a) torch.compile {row.variant} batch {row.batch}: skipped, time budget")
            continue
        inputs = g.unet_inputs(row.batch, frames, row.latent, device, dtype)
        try:
            row.compile_s, seconds = g.compiled_time(
                unet, inputs, device, s.compile_mode, "inductor", s.warmup, s.iters, s.max_iter_s
            )
            row.compiled_ms = seconds * 1e3
            row.note = f"{row.note}; compiled: mode {s.compile_mode}".lstrip("; ")
        except Exception as e:  # noqa: BLE001 - the eager and CUDA graph numbers stand
            row.note = f"{row.note}; torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
            torch.cuda.empty_cache()
        g.finish_row(row, run.report.peak_tflops, s.steps, frames)
        print(" | ".join(unet_cells(asdict(row))), flush=True)
        run.report.save()


def make_weights(run: Run) -> None:
    from latentsync_core.tiny import make_random_weights

    started = time.perf_counter()
    size = "tiny" if run.settings.tiny else "full"
    run.weights = make_random_weights(run.work / "weights", 0, size, run.settings.device)
    print(f"random {size} weights in {run.weights} ({time.perf_counter() - started:.0f} s)", flush=True)


def face_frames(run: Run, count: int):
    from latentsync_load.gpu_serving import load_frames

    side = run.settings.frame_side or (960 if run.settings.tiny else 0)  # smaller: MediaPipe misses the face
    return load_frames(run.frames_dir, count, side)


def precision(run: Run) -> None:
    from latentsync_load.gpu_precision import compare
    from latentsync_load.gpu_serving import synthetic_audio

    s = run.settings
    frames = face_frames(run, s.window_frames)
    rows = compare(
        run.weights,
        s.precision_variants,
        frames,
        synthetic_audio(len(frames) + 4),
        s.run_steps,
        s.seed,
        run.device,
        run.env.detector_dir if run.env else None,
    )
    for row in rows:
        run.report.precision.append(row)
        print(" | ".join(precision_cells(asdict(row))), flush=True)


def geometry(run: Run) -> None:
    from latentsync_load.gpu_geometry import compare

    s = run.settings
    for row in compare(face_frames(run, s.geometry_frames), s.geometry_resolutions, run.device, s.seed):
        run.report.geometry.append(row)
        print(" | ".join(geometry_cells(asdict(row))), flush=True)


def served_layouts(chosen: dict[str, str], target: str) -> list[tuple[str, dict[str, str]]]:
    """(label, instances) of each repository (b) tries in turn: `chosen` (--served-instances); on a GPU, unless
    the user placed `lipsync`, then the same with `lipsync` on the CPU (the served path failing with the
    orchestrator on the GPU, where device tensors cross between the models through CUDA IPC)."""
    layouts = [(layout_name(chosen), chosen)]
    if target == "gpu" and "lipsync" not in chosen:
        retry = {**chosen, "lipsync": "cpu"}
        layouts.append((f"{layout_name(retry)} (retry)", retry))
    return layouts


def layout_name(instances: dict[str, str]) -> str:
    """`lipsync=cpu, restorer=cpu`: a placement as --served-instances gave it ("" for the target's own)."""
    return ", ".join(f"{model}={spec}" for model, spec in instances.items())


def served(run: Run) -> None:
    """(b), in each of served_layouts until one serves; with --served-baseline, the target's own placement first and
    then --served-instances', each in half of the time left (a comparison on one card and one build)."""
    target = "gpu" if run.device.type == "cuda" else "cpu"
    chosen = run.settings.served_instances
    if run.settings.served_baseline and chosen:
        half = time.perf_counter() + run.deadline.left() / 2
        for label, instances, until in (("target placement (baseline)", {}, half), (layout_name(chosen), chosen, None)):
            try:
                serve_layout(run, target, instances, label, until)
            except Exception as e:  # noqa: BLE001 - the other placement is still measured
                traceback.print_exc()
                run.report.note(f"(b) {label}: failed: {type(e).__name__}: {str(e).strip()[:300]}")
        return
    layouts = served_layouts(chosen, target)
    for i, (label, instances) in enumerate(layouts):
        try:
            serve_layout(run, target, instances, label)
            return
        except Exception as e:  # noqa: BLE001 - the next layout, else section() reports it
            if i + 1 == len(layouts) or run.deadline.left() < run.settings.served_min_s / 2:
                raise
            traceback.print_exc()
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            run.report.note(f"(b) failed: {type(e).__name__}: {first}; again with {layouts[i + 1][0]}")


def serve_layout(run: Run, target: str, instances: dict[str, str], label: str, until: float | None = None) -> None:
    """Build and serve one placement and measure its levels; `until` (time.perf_counter()): its own end, if before
    the run's."""
    from latentsync_export.model_config import InstanceSpec
    from latentsync_load import gpu_serving as g
    from latentsync_serving.serve import TritonServer

    s = run.settings
    repo = run.work / ("repository" + "".join(f"-{model}" for model in instances))
    g.export_repository(
        run.weights,
        repo,
        s.served_variants,
        target,
        run.env.detector_dir if run.env else None,
        max(24, max(s.served_streams)),
        {model: InstanceSpec.parse(spec) for model, spec in instances.items()},
        s.served_compile,
        s.served_max_windows or None,
    )
    print(f"built {repo} (target {target}{', ' + label if label else ''})", flush=True)
    try:
        run.report.note(f"(b) repository: {g.describe_repository(repo)}")
    except Exception as e:  # noqa: BLE001 - a description, not a reason to rebuild the repository
        run.report.note(f"(b) repository: not described ({type(e).__name__}: {e})")
    if not s.serve:
        run.report.note("(b) served path: repository built, no server started (a CPU dry run; --serve starts one)")
        return
    if run.env is not None and not (run.env.venv and run.env.numpy1 and run.env.libpython):
        run.report.note("(b) served path: skipped, the bundle's Triton stub cannot run here (see the bundle notes)")
        return
    frames = face_frames(run, s.served_frames)
    audio = g.synthetic_audio(len(frames))
    log_path = run.report.out / f"tritonserver{'-' + '-'.join(instances) if instances else ''}.log"
    server = TritonServer(
        repo,
        log_path=log_path,
        extra_args=g.server_args(run.device.type),
        home=run.env.triton_home if run.env else None,
        exit_timeout_s=STOP_S,  # every stream has ended by then; the default 30 s went to a `lipsync` slow to unload
    )
    started = time.perf_counter()
    with server.start():
        server.wait_ready(timeout=max(60.0, run.deadline.left() - 60))
        run.report.note(
            f"(b) Triton ready in {time.perf_counter() - started:.0f} s{' (' + label + ')' if label else ''}"
        )
        compiles = g.compile_times(log_path.read_text(errors="replace") if log_path.is_file() else "")
        if compiles:
            run.report.note(f"(b) UNet compiled at start: {compiles}")
        next_id = 1
        for variant in s.served_variants:  # warm-up: one window, first CUDA kernels and allocations
            params = g.StreamParams(steps=s.run_steps, seed=s.seed, variant=variant)
            (warm,), _ = g.run_streams(
                server.grpc_url,
                1,
                frames[:16],
                g.synthetic_audio(16),
                params,
                next_id,
                timeout=max(30.0, run.deadline.left()),
            )
            if warm.error:
                raise RuntimeError(f"the warm-up stream of {variant} failed: {warm.error}")
            next_id += 1
        run.report.gpu_source = g.GpuSampler().source
        for variant in s.served_variants:
            for n in s.served_streams:
                compiled = f"UNet compiled ({s.served_compile})" if s.served_compile else ""
                windows = f"max windows {s.served_max_windows}" if s.served_max_windows else ""
                row = g.ServedRow(variant, n, note="; ".join(filter(None, [label, compiled, windows])))
                run.report.served.append(row)
                left = run.deadline.left() if until is None else min(run.deadline.left(), until - time.perf_counter())
                left -= STOP_S + 10  # the server's stop comes out of the budget too
                if left < 20:
                    row.note = "; ".join(filter(None, [row.note, "skipped: time budget"]))
                    continue
                deadline = time.perf_counter() + left  # a level that would run past the budget is cut off there
                g.measure_level(server, row, frames, audio, s.run_steps, s.seed, next_id, left, deadline)
                if n == max(s.served_streams):  # who holds the card at the busiest level
                    contexts = g.cuda_contexts()
                    if contexts:
                        run.report.note(f"(b) CUDA contexts{' (' + label + ')' if label else ''}: {contexts}")
                next_id += n
                print(" | ".join(served_cells(asdict(row))), flush=True)
                run.report.save()


def run_all(s: Settings, out: Path, env: BundleEnv | None, frames_dir: Path | None) -> Report:
    report = Report(out, s)
    with tempfile.TemporaryDirectory(prefix="latentsync-gpu-bench-") as work:
        run = Run(s, report, Deadline(s.budget_s), env, frames_dir, Path(work))
        section(run, "machine", machine_info)
        if "unet" in s.parts:
            section(run, "(a) UNet step, eager and CUDA graphs", unet_eager)
        if {"precision", "served"} & set(s.parts):
            if frames_dir is None:
                report.note("(b), (c): skipped, no face frames (--frames DIR or --bundle)")
            else:
                section(run, "random weights for (b) and (c)", make_weights)
        if run.weights is not None and "precision" in s.parts:
            section(run, "(c) bfloat16 vs float32", precision, min_left_s=30)
        if run.weights is not None and "served" in s.parts:
            section(run, "(b) served path", served, min_left_s=s.served_min_s if s.serve else 0)
        if "geometry" in s.parts:
            if frames_dir is None:
                report.note("(d): skipped, no face frames (--frames DIR or --bundle)")
            else:
                section(run, "(d) alignment and paste-back, device vs CPU", geometry, min_left_s=20)
        if "compile" in s.parts and run.report.unet:
            section(run, "(a) torch.compile", unet_compiled, min_left_s=s.compile_min_s)
    return report


# ---------------------------------------------------------------------------------------------------- cli
def _list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="latentsync-gpu-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="output folder ($OUT or .)")
    p.add_argument("--bundle", type=Path, help="the folder `make gpu-bundle` wrote (Triton, packages, face frames)")
    p.add_argument("--frames", type=Path, help="a folder of face JPEGs (default: the bundle's)")
    p.add_argument("--tiny", action="store_true", help="CPU dry run: scaled-down models, few iterations")
    p.add_argument("--device", help="default: cuda (a --tiny run: cpu)")
    p.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="what to run, in this order: unet = (a) eager and "
        "CUDA graphs, precision = (c), geometry = (d), served = (b), compile = (a) under torch.compile",
    )
    p.add_argument("--variants", default="1.5,1.6", help="(a)")
    p.add_argument("--batches", default="2,4,8,16,32", help="(a): UNet batches (2 items per window)")
    p.add_argument("--compile-batches", default="16", help="(a): batches also run under torch.compile")
    p.add_argument("--compile-mode", default="reduce-overhead", help="torch.compile mode")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--precision-variants", default="1.5,1.6", help="(c)")
    p.add_argument("--served-variants", default="1.5", help="(b)")
    p.add_argument("--served-streams", default="1,8,16", help="(b): concurrent streams")
    p.add_argument("--served-frames", type=int, default=48, help="(b): frames per stream")
    p.add_argument(
        "--served-compile",
        default="",
        metavar="MODE",
        help="(b): the denoiser's UNet under torch.compile (latentsync-export --compile-unet MODE; every batch size "
        "compiles while the server starts, about a minute each on an H200: run --parts served alone)",
    )
    p.add_argument(
        "--served-max-windows",
        type=int,
        default=0,
        metavar="N",
        help="(b): windows the denoiser advances together (latentsync-export --max-windows; default: the target's). "
        "With --served-compile, fewer windows compile fewer batch sizes (2, 4, ..., 2N items)",
    )
    p.add_argument(
        "--served-instances",
        action="append",
        default=[],
        metavar="MODEL=KIND[:COUNT[:GPUS]]",
        help="(b): an instance group other than the target's (latentsync-export --instances), e.g. lipsync=cpu; "
        "repeatable",
    )
    p.add_argument(
        "--served-baseline",
        action="store_true",
        help="(b): with --served-instances, measure the target's own placement first, in the same call (half the "
        "time left each): the comparison then shares the card and the build",
    )
    p.add_argument("--frame-side", type=int, default=0, help="resize face frames to this longer side (0: keep)")
    serve = p.add_mutually_exclusive_group()
    serve.add_argument("--serve", action="store_true", help="start a server for (b) also on the CPU")
    serve.add_argument("--no-serve", action="store_true", help="build (b)'s repository, start no server")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--iters", type=int)
    p.add_argument("--budget-s", type=float, default=420.0, help="skip what is left after this many seconds")
    a = p.parse_args(argv)
    unknown = set(_list(a.parts)) - set(PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if a.served_max_windows < 0:
        p.error("--served-max-windows must be >= 1 (or 0: the target's default)")
    from latentsync_contract import MAX_UNANSWERED_FRAMES  # pure Python: importable before the bundle's environment

    if not 1 <= a.served_frames <= MAX_UNANSWERED_FRAMES:  # (b) sends a stream's frames at once
        p.error(f"--served-frames must be 1..{MAX_UNANSWERED_FRAMES} (a stream's frames are sent without waiting)")
    instances = {}
    for item in a.served_instances:  # the specs are checked by check_served_instances, inside the bundle
        model, sep, spec = item.partition("=")
        if not (sep and model.strip() and spec.strip()):
            p.error(f"--served-instances {item!r}: expected MODEL=KIND[:COUNT[:GPUS]], e.g. lipsync=cpu")
        if model.strip() in instances:
            p.error(f"--served-instances {model.strip()!r} is given twice")
        instances[model.strip()] = spec.strip()
    s = Settings(
        parts=_list(a.parts),
        variants=_list(a.variants),
        batches=_list(a.batches, int),
        compile_batches=_list(a.compile_batches, int),
        compile_mode=a.compile_mode,
        precision_variants=_list(a.precision_variants),
        served_variants=_list(a.served_variants),
        served_streams=_list(a.served_streams, int),
        served_frames=a.served_frames,
        served_compile=a.served_compile,
        served_max_windows=a.served_max_windows,
        served_instances=instances,
        served_baseline=a.served_baseline,
        frame_side=a.frame_side,
        steps=a.steps,
        run_steps=a.steps,
        budget_s=a.budget_s,
        tiny=a.tiny,
        device=a.device or ("cpu" if a.tiny else "cuda"),
    )
    s.graphs_below_ms = 0.0 if a.no_cuda_graphs else s.graphs_below_ms
    if s.device == "cpu":  # a dry run proves the code path; it does not measure anything worth keeping
        s.dtype, s.warmup, s.iters, s.matmul_n, s.max_iter_s = "float32", 0, 1, 256, 5.0
        s.run_steps, s.window_frames, s.geometry_frames = 1, 2, 2
        s.serve = a.serve
    else:
        s.serve = not a.no_serve
    s.iters = a.iters or s.iters
    return s, a


def enter_bundle(bundle: Path, argv: list[str]) -> BundleEnv:
    """The bundle's environment: prepared, then this script re-executed in it (returns only in there)."""
    if os.environ.get(ENV_VAR):
        return BundleEnv.load(Path(os.environ[ENV_VAR]))
    dest = Path(tempfile.gettempdir()) / "latentsync-gpu-bundle"
    started = time.perf_counter()
    env = prepare(bundle, dest)
    env.save(dest / "env.json")
    print(f"bundle ready in {time.perf_counter() - started:.0f} s: {'; '.join(env.notes)}", flush=True)
    python = str(env.python)
    env_vars = {**os.environ, ENV_VAR: str(dest / "env.json")}
    if not env.venv:
        env_vars["PYTHONPATH"] = os.pathsep.join(filter(None, [str(dest / "site"), os.environ.get("PYTHONPATH")]))
    os.execve(python, [python, "-m", "latentsync_load.gpu_bench", *argv], env_vars)


def check_served_instances(settings: Settings, gpus: int | None = None) -> str | None:
    """What is wrong with --served-instances, or None; checked before anything is measured. latentsync_export
    reads the specs, and it imports tritonclient: on a GPU machine only the bundle's environment has it (where
    it is missing, (b) is skipped anyway, and this check with it)."""
    if not settings.served_instances or "served" not in settings.parts:
        return None
    try:
        from latentsync_export.export import ExportOptions, parse_instances
    except ImportError:
        return None

    try:  # the exporter's own checks: spec syntax, and names that are models of the repository (b) builds
        instances = parse_instances([f"{model}={spec}" for model, spec in settings.served_instances.items()])
        ExportOptions(out=Path("."), tiny=True, variants=tuple(settings.served_variants), instances=instances).check()
    except ValueError as e:
        return f"--served-instances: {e}"
    for model, spec in instances.items():
        if gpus is not None and any(g >= gpus for g in spec.gpus):
            return f"--served-instances {model}: this machine has {gpus} GPU(s), ids 0..{gpus - 1}"
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings, a = parse_args(argv)
    env = enter_bundle(a.bundle, argv) if a.bundle else None
    frames_dir = a.frames or (env.frames_dir if env else None)
    gpus = None
    if settings.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("latentsync-gpu-bench: no CUDA device; --tiny is the CPU dry run", file=sys.stderr)
            return 2
        gpus = torch.cuda.device_count()
    problem = check_served_instances(settings, gpus)
    if problem:
        print(f"latentsync-gpu-bench: {problem}", file=sys.stderr)
        return 2
    report = run_all(settings, a.out, env, frames_dir)
    print(markdown(report.as_dict()))
    print(f"wrote {a.out / 'gpu_bench.md'} and {a.out / 'gpu_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
