"""(b) of latentsync-gpu-bench: the served path, a real Triton server, full-size random-weight models.

A repository is built with latentsync-export (`--target gpu` on a GPU: the Python models on KIND_GPU in
bfloat16, the lipsync orchestrator on the GPU with DLPack between the models) from a weights folder, and served
by latentsync_serving.serve.TritonServer (the bundle's tritonserver there). N streams then run together over
raw gRPC (latentsync_client.grpc_stream, as docs/PROTOCOL.md: the whole audio, then frames 16 per request) with
real face frames and synthetic audio, after one warm-up stream per variant. Per stream count:
  * aggregate frames per second (all frames received / wall time from the common start), per-stream fps and
    first-frame latency (streams without errors);
  * mean windows per denoiser step: the deltas of the denoiser's Prometheus counters denoiser_window_steps /
    denoiser_steps for that variant's model (label model="denoiser_<variant>");
  * GPU busy share: NVML's utilisation (share of time a kernel ran) sampled every 0.1 s during the streams,
    through torch.cuda.utilization, else nvidia-smi; the report names the source.
"""

from __future__ import annotations

import queue
import re
import statistics
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from latentsync_contract import (
    FRAME_INDEX,
    SAMPLE_RATE,
    WINDOW,
    StreamParams,
    min_audio_samples,
    num_frames_for_audio,
)

from .ceiling import send_request

# The Python backend's GPU tensors cross processes through Triton's CUDA memory pool (default 64 MB per GPU);
# a window's faces at 512 px are 100 MB as float32.
CUDA_POOL_BYTES = 4 << 30
PINNED_POOL_BYTES = 1 << 30


@dataclass
class ServedRow:
    variant: str
    streams: int
    frames: int = 0  # received, all streams
    wall_s: float | None = None
    fps: float | None = None  # aggregate
    stream_fps: float | None = None  # mean per stream
    first_frame_s: float | None = None
    windows_per_step: float | None = None
    denoiser_steps: int | None = None
    gpu_busy: float | None = None  # mean share 0..1
    errors: list[str] = field(default_factory=list)
    note: str = ""


# ---------------------------------------------------------------------------------------------------- inputs
def load_frames(folder: Path, count: int, long_side: int = 0) -> np.ndarray:
    """`count` RGB frames cycling through the JPEGs of `folder` (resized so the longer side is `long_side`)."""
    import cv2

    images = []
    for path in sorted(Path(folder).glob("*.jpg")):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        if long_side and max(image.shape[:2]) != long_side:
            scale = long_side / max(image.shape[:2])
            size = (round(image.shape[1] * scale) // 2 * 2, round(image.shape[0] * scale) // 2 * 2)
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        images.append(image)
    if not images:
        raise FileNotFoundError(f"no .jpg face frames in {folder}")
    return np.stack([images[i % len(images)] for i in range(count)])


def synthetic_audio(frames: int, seed: int = 0) -> np.ndarray:
    """A 16 kHz track of quiet noise whose frame count (upstream's arithmetic, at least 2) is `frames`."""
    if frames < num_frames_for_audio(0):
        raise ValueError(f"a stream has at least {num_frames_for_audio(0)} frames, asked for {frames}")
    n = (frames - num_frames_for_audio(0)) * SAMPLE_RATE // 25 + min_audio_samples()  # a frame per 640 samples
    return (np.random.default_rng(seed).standard_normal(n) * 0.05).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- a stream
@dataclass
class StreamResult:
    frames: int = 0
    first_frame_s: float | None = None
    wall_s: float = 0.0
    error: str | None = None


CUT_OFF = "cut off at the time budget"  # a stream's error when its deadline came first: a partial, not a failure


def run_stream(
    url: str,
    frames: np.ndarray,
    audio: np.ndarray,
    params: StreamParams,
    sequence_id: int,
    start: threading.Barrier | None = None,
    timeout: float = 300.0,
    deadline: float | None = None,
) -> StreamResult:
    """One stream over raw gRPC: the audio request (sequence start, parameters), then 16 frames per request.
    `timeout`: the longest wait for one response; `deadline` (time.perf_counter()): the stream is cut off there,
    what it received counted."""
    from latentsync_client.grpc_stream import InferStream

    result, replies = StreamResult(), queue.Queue()
    requests = [(np.zeros((0, *frames.shape[1:]), np.uint8), audio)]
    requests += [(frames[i : i + WINDOW], np.zeros(0, np.float32)) for i in range(0, len(frames), WINDOW)]
    if start is not None:
        start.wait()
    began = time.perf_counter()
    stream = InferStream(url, callback=lambda result, error: replies.put((result, error)))  # connects on first use
    try:
        for i, (f, a) in enumerate(requests):
            send_request(stream, i, len(requests), f, a, sequence_id, params.as_parameters())
        finals = 0
        while finals < len(requests):
            wait = timeout if deadline is None else min(timeout, deadline - time.perf_counter())
            if wait <= 0:
                result.error = CUT_OFF
                break
            reply, error = replies.get(timeout=wait)
            if error is not None:
                result.error = str(error).splitlines()[0][:200]
                break
            response = reply.get_response()
            finals += response.parameters["triton_final_response"].bool_param
            index = reply.as_numpy(FRAME_INDEX) if response.outputs else None
            if index is not None and len(index):
                result.first_frame_s = result.first_frame_s or time.perf_counter() - began
                result.frames += len(index)
    except queue.Empty:
        late = deadline is not None and time.perf_counter() >= deadline
        result.error = CUT_OFF if late else f"no response for {timeout:.0f} s"
    finally:
        result.wall_s = time.perf_counter() - began
        stream.close(cancel=result.error is not None)
    return result


def run_streams(
    url: str,
    n: int,
    frames: np.ndarray,
    audio: np.ndarray,
    params: StreamParams,
    first_id: int,
    timeout: float = 300.0,
    deadline: float | None = None,
) -> tuple[list[StreamResult], float]:
    """n streams started together (a barrier); their results and the wall time from the common start (run_stream's
    `timeout` and `deadline`)."""
    barrier = threading.Barrier(n + 1)
    results: list[StreamResult | None] = [None] * n

    def one(i: int) -> None:
        results[i] = run_stream(url, frames, audio, params, first_id + i, barrier, timeout, deadline)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    return [r or StreamResult(error="stream thread died") for r in results], time.perf_counter() - began


# ---------------------------------------------------------------------------------------------------- server side
def read_counters(metrics_url: str, names: tuple[str, ...], model: str) -> dict[str, float]:
    """Prometheus counters of one model (label model="..."), summed over their other labels."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return parse_counters(text, names, model)


def parse_counters(text: str, names: tuple[str, ...], model: str) -> dict[str, float]:
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        m = re.match(r"^(\w+)\{([^}]*)\}\s+(\S+)$", line)
        if m and m.group(1) in out and re.search(rf'(^|,)model="{re.escape(model)}"', m.group(2)):
            out[m.group(1)] += float(m.group(3))
    return out


def cuda_contexts() -> str:
    """Which processes hold GPU memory (a CUDA context), by model where a Python stub's command line names it: e.g.
    `tritonserver 510 MiB, denoiser_1.5 9120 MiB`; "" without nvidia-smi. Checks that a model placed on the CPU made
    no CUDA context (one costs ~500 MiB and time slices of the card)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    holders = []
    for line in out.strip().splitlines():
        pid, _, mib = (x.strip() for x in line.partition(","))
        holders.append(f"{process_model(pid)} {mib} MiB")
    return ", ".join(holders) or "none"


def process_model(pid: str) -> str:
    """The model a Triton Python stub serves (its model.py's folder: <repository>/<model>/<version>/model.py), else
    the process's program name."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    for arg in args:
        if arg.endswith("model.py") and len(Path(arg).parts) >= 3:
            return Path(arg).parts[-3]
    return Path(args[0]).name if args and args[0] else f"pid {pid}"


class GpuSampler:
    """Mean GPU utilisation while running (NVML through torch, else nvidia-smi); `source` says which."""

    def __init__(self, device_index: int = 0, period: float = 0.1):
        self.index, self.period, self.samples = device_index, period, []
        self.source = self._pick_source()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)

    def _pick_source(self) -> str | None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.utilization(self.index)
                return "NVML (torch.cuda.utilization)"
        except Exception:  # noqa: BLE001 - no NVML binding: try the command line tool
            pass
        try:
            self._smi()
            return "nvidia-smi"
        except (OSError, ValueError, subprocess.SubprocessError):
            return None

    def _smi(self) -> float:
        out = subprocess.run(
            ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return float(out.stdout.strip().splitlines()[0])

    def _sample(self) -> float:
        if self.source == "nvidia-smi":
            return self._smi()
        import torch

        return float(torch.cuda.utilization(self.index))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._sample() / 100.0)
            except Exception:  # noqa: BLE001 - a missed sample is not worth failing the run
                pass
            self._stop.wait(self.period)

    def __enter__(self) -> GpuSampler:
        if self.source is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


# ---------------------------------------------------------------------------------------------------- a level
def measure_level(
    server,
    row: ServedRow,
    frames: np.ndarray,
    audio: np.ndarray,
    steps: int,
    seed: int,
    first_id: int,
    timeout: float = 300.0,
    deadline: float | None = None,
) -> None:
    """Run row.streams streams of row.variant together and fill in the row (`timeout`: a stream's longest wait
    for a response; `deadline`: streams still running then are cut off, and the row says so)."""
    params = StreamParams(steps=steps, seed=seed, variant=row.variant)
    model, names = f"denoiser_{row.variant}", ("denoiser_window_steps", "denoiser_steps")
    before = read_counters(server.metrics_url, names, model)
    with GpuSampler() as gpu:
        results, wall = run_streams(server.grpc_url, row.streams, frames, audio, params, first_id, timeout, deadline)
    after = read_counters(server.metrics_url, names, model)
    ok = [r for r in results if r.error is None]
    row.errors = [r.error for r in results if r.error not in (None, CUT_OFF)]
    cut = sum(r.error == CUT_OFF for r in results)
    if cut:
        row.note = "; ".join(filter(None, [row.note, f"{cut} streams cut off at the time budget (partial)"]))
    row.frames, row.wall_s = sum(r.frames for r in results), wall
    row.fps = row.frames / wall  # streams cut off by a timeout count what they received
    row.stream_fps = statistics.mean(r.frames / r.wall_s for r in ok) if ok else None
    row.first_frame_s = statistics.mean(r.first_frame_s for r in ok if r.first_frame_s) if ok else None
    steps_done = after["denoiser_steps"] - before["denoiser_steps"]
    row.denoiser_steps = int(steps_done)
    if steps_done:
        row.windows_per_step = (after["denoiser_window_steps"] - before["denoiser_window_steps"]) / steps_done
    row.gpu_busy = gpu.mean


def export_repository(
    weights: Path,
    out: Path,
    variants: list[str],
    target: str,
    detector_dir: Path | None,
    max_streams: int,
    instances: dict | None = None,
    compile_unet: str = "",
    max_windows: int | None = None,
) -> dict:
    """latentsync-export of one weights folder for every variant (they share the architecture); `instances`:
    model name -> InstanceSpec, where one differs from the target's default; `max_windows` None: the target's."""
    from latentsync_export.export import ExportOptions, build_repository

    opts = ExportOptions(
        out=out,
        target=target,
        weights={v: weights for v in variants},
        detector_dir=detector_dir,
        max_streams=max_streams,
        instances=instances or {},
        compile_unet=compile_unet,
        max_windows=max_windows,
        force=True,
    )
    return build_repository(opts)


def describe_repository(repo: Path) -> str:
    """What a built repository serves, from its config.pbtxt files, for the report: each model's instance groups
    and the denoisers' max_windows and compile_unet, e.g. `denoiser_1.5 gpu x1 (max_windows 8, compile_unet
    reduce-overhead); lipsync cpu x1; restorer gpu x2 on each of GPUs 0,1; ...`."""
    from tritonclient.grpc import model_config_pb2 as mc

    from latentsync_export.model_config import parse_model_config

    parts = []
    for path in sorted(Path(repo).glob("*/config.pbtxt")):
        config = parse_model_config(path)
        groups = ", ".join(  # Triton starts `count` instances on each listed GPU
            f"{mc.ModelInstanceGroup.Kind.Name(g.kind).removeprefix('KIND_').lower()} x{g.count}"
            + (f" on each of GPUs {','.join(map(str, g.gpus))}" if g.gpus else "")
            for g in config.instance_group
        )
        params = {k: v.string_value for k, v in config.parameters.items()}
        extra = [f"{k} {params[k]}" for k in ("max_windows", "compile_unet") if params.get(k)]
        parts.append(f"{config.name} {groups or 'default'}{' (' + ', '.join(extra) + ')' if extra else ''}")
    return "; ".join(parts)


def compile_times(server_log: str) -> str:
    """The denoisers' compile time per batch size from the server's log (CompiledUNet.warm_up's lines), e.g.
    `denoiser_1.5: 2 items 81 s, 4 items 64 s`; empty when nothing was compiled."""
    found = re.findall(
        r"(denoiser_[\w.]+): UNet compiled \([\w-]+\) for (\d+) items of \d+ frames in (\d+) s", server_log
    )
    models: dict[str, list[str]] = {}
    for model, items, seconds in found:
        models.setdefault(model, []).append(f"{items} items {seconds} s")
    return "; ".join(f"{model}: {', '.join(times)}" for model, times in models.items())


def server_args(device_type: str) -> list[str]:
    if device_type != "cuda":
        return []
    return [f"--cuda-memory-pool-byte-size=0:{CUDA_POOL_BYTES}", f"--pinned-memory-pool-byte-size={PINNED_POOL_BYTES}"]
