"""`latentsync-bench`: one-machine benchmark of the Triton deployment against the in-process pipeline.

    latentsync-bench --tiny --video FACE.mp4                    # random tiny weights, a server started here
    latentsync-bench --repo REPO --video FACE.mp4 --audio VOICE.wav --streams 1,2,4,8 --json
    latentsync-bench --stand-ins --video CLIP.mp4 --streams 1,8,16 --steps 20,1   # the serving path's ceiling

In one run, on the same weights and the same decoded frames:
  (a) serving overhead: wall time and CPU time of one stream through Triton (gRPC client -> lipsync -> BLS
      models; CPU: every server process and the client) against LatentSync's in-process pipeline
      (latentsync_core, same repository weights, its process's CPU), as ratios; the best of --repeats runs of
      each, after a warm-up run, so other load on the machine does not count as overhead (with --overhead-goal,
      more pairs while the CPU overhead, or the wall one where the server's processes are not measured, is at
      or above the goal, up to --max-repeats);
  (b) aggregate and per-stream fps and first-frame latency at each --streams level (streams start together),
      with the UNet windows per denoising step (the denoiser's metrics: denoiser_window_steps / denoiser_steps,
      the windows of all streams that each UNet forward advances);
  (c) cost per frame of every stage: decode and encode (PyAV, client side), detect, align, audio, UNet (the
      denoising loop of a window, `denoise`, and per step), VAE, paste-back (in-process, timed around each model
      call), plus each Triton model's server-side compute per frame from the server statistics (the denoiser
      is decoupled: its execute only queues a window, its loop's time is not in these statistics);
  (d) peak memory: the server (tritonserver + stubs: anonymous memory + /dev/shm pools, every 0.5 s), the client
      process (peak RSS) and the in-process pipeline (peak RSS of its process).
Timings are wall clock; on a shared machine run it when it is quiet (results: RESULTS.md).

With --stand-ins the run is the serving path's own ceiling instead (ceiling.py): the networks replaced by
near-zero-cost stand-ins, real frames at their size, raw gRPC streams, and the server's CPU and memory per stream.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from latentsync_serving.serve import GRPC_ADMIN_HEADER

from . import ceiling
from .ceiling import CeilingOptions
from .server_probe import MemoryWatch, ServerProbe, metric_delta, read_metrics

PER_FRAME_STAGES = (
    "decode",
    "detect",
    "align",
    "audio",
    "vae_encode",
    "unet",
    "vae_decode",
    "paste_back",
    "other",
    "encode",
)


@dataclass
class BenchOptions:
    video: Path
    audio: Path | None = None  # default: the video's own audio track
    repo: Path | None = None  # a repository built by latentsync-export (cpu target)
    tiny: bool = False  # build a --tiny repository in a temporary folder
    export_args: Sequence[str] = ()  # extra latentsync-export flags for --tiny
    url: str | None = None  # an already running server (no server memory then, unless server_pid)
    server_pid: int | None = None
    metrics_url: str | None = None  # with url: its Prometheus endpoint (the denoiser's batching)
    size: int = 256  # frames are resized so that their longer side is this (0: as decoded)
    seconds: float = 2.5  # audio length used (sets the frame count)
    steps: int = 20
    guidance: float = 1.5
    seed: int = 1247
    variant: str | None = None  # default: the repository's first variant
    streams: Sequence[int] = (1, 2, 4, 8)
    repeats: int = 2
    # With a goal: more pairs of runs (up to max_repeats in all) while the overhead is at or above it: the CPU
    # overhead where the server's processes are measured (it hardly moves with other load on the machine), else
    # the wall one. The best of each path only falls toward its quiet-machine cost as pairs are added, so a
    # burst of load from elsewhere is measured again; a real overhead stays.
    overhead_goal: float | None = None
    max_repeats: int | None = None
    overhead_budget_s: float | None = None  # with a goal: no pair beyond `repeats` starts after this long
    reference: bool = True  # run the in-process pipeline (a)
    timeout: float = 600.0  # server start-up


# ---------------------------------------------------------------------------------------------------- media
@dataclass
class Media:
    frames: np.ndarray  # (n, H, W, 3) uint8, exactly the stream's frame count
    audio: np.ndarray  # 16 kHz mono float32
    audio_path: Path
    decode_s_per_frame: float


def load_media(video: Path, audio: Path | None, size: int, seconds: float) -> Media:
    """Decode (and time) the frames the audio needs, resized once; the video loops ping-pong if short."""
    import cv2

    from latentsync_client import audio_chunks, frames_25fps, num_frames_for_audio, ping_pong_index
    from latentsync_contract import SAMPLE_RATE

    audio_path = Path(audio or video)
    samples = np.concatenate(list(audio_chunks(audio_path)))[: int(seconds * SAMPLE_RATE)]
    n = num_frames_for_audio(len(samples))
    start, decoded = time.perf_counter(), []
    for frame in frames_25fps(video):
        if len(decoded) == n:
            break
        decoded.append(frame)
    decode_s = (time.perf_counter() - start) / len(decoded)
    h, w = decoded[0].shape[:2]
    scale = size / max(h, w) if size else 1.0
    if scale != 1.0:
        hw = (round(w * scale) // 2 * 2, round(h * scale) // 2 * 2)
        decoded = [cv2.resize(f, hw, interpolation=cv2.INTER_AREA) for f in decoded]
    frames = np.stack([decoded[ping_pong_index(j, len(decoded))] for j in range(n)])
    return Media(frames, samples.astype(np.float32), audio_path, decode_s)


def encode_seconds_per_frame(media: Media, frames: np.ndarray) -> float:
    """Client-side cost of writing synced frames (h264 + the original audio), as latentsync-sync does."""
    from latentsync_client import SyncedVideoWriter

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with SyncedVideoWriter(Path(tmp) / "out.mp4", media.audio_path, n_frames=len(frames)) as writer:
            for frame in frames:
                writer.write(frame)
        return (time.perf_counter() - start) / len(frames)


# ---------------------------------------------------------------------------------------------------- memory
def _rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------------- triton
@dataclass
class StreamRun:
    frames: int = 0
    faces: int = 0
    first_frame_s: float | None = None
    wall_s: float = 0.0
    cpu_s: float | None = None  # the serving path's CPU seconds (server and client), where measured
    error: str | None = None
    synced: list = field(default_factory=list, repr=False)


def run_stream(
    url: str, media: Media, params, keep: bool = False, start_at: threading.Barrier | None = None
) -> StreamRun:
    from latentsync_client import ClientError, LipsyncClient

    run = StreamRun()
    client = LipsyncClient(url, response_timeout=600.0)
    if start_at is not None:
        start_at.wait()
    start = time.perf_counter()
    try:
        for synced in client.stream(media.audio, iter(media.frames), params):
            if run.first_frame_s is None:
                run.first_frame_s = time.perf_counter() - start
            run.frames += 1
            run.faces += synced.face_found
            if keep:
                run.synced.append(synced.frame)
    except ClientError as e:
        run.error = str(e)
    run.wall_s = time.perf_counter() - start
    return run


class ServerStats:
    """Deltas of Triton's per-model statistics between `snapshot()` calls."""

    def __init__(self, url: str, headers: dict | None = None):
        import tritonclient.grpc as grpcclient

        self.client = grpcclient.InferenceServerClient(url)
        self.headers = headers
        self.last = self._read()

    def _read(self) -> dict[str, dict]:
        stats = self.client.get_inference_statistics(headers=self.headers, as_json=True)
        out = {}
        for m in stats.get("model_stats", []):
            inf = m.get("inference_stats", {})
            ns = {
                k: int(inf.get(k, {}).get("ns", 0))
                for k in ("queue", "compute_input", "compute_infer", "compute_output")
            }
            batches = {
                int(b["batch_size"]): int(b.get("compute_infer", {}).get("count", 0)) for b in m.get("batch_stats", [])
            }
            out[m["name"]] = {
                "inferences": int(m.get("inference_count", 0)),
                "executions": int(m.get("execution_count", 0)),
                "ns": ns,
                "batches": batches,
            }
        return out

    def snapshot(self) -> dict[str, dict]:
        now = self._read()
        delta = {}
        for name, cur in now.items():
            old = self.last.get(name, {"inferences": 0, "executions": 0, "ns": {}, "batches": {}})
            delta[name] = {
                "inferences": cur["inferences"] - old["inferences"],
                "executions": cur["executions"] - old["executions"],
                "ns": {k: v - old["ns"].get(k, 0) for k, v in cur["ns"].items()},
                "batches": {
                    b: c - old["batches"].get(b, 0) for b, c in cur["batches"].items() if c - old["batches"].get(b, 0)
                },
            }
        self.last = now
        return delta

    def close(self) -> None:
        self.client.close()


def run_concurrent(url: str, media: Media, params, n: int, metrics_url: str | None) -> dict:
    """n streams started together; fps, first-frame latency, errors and the UNet's batching meanwhile: windows
    per denoising step, from the denoiser's counters (None without the server's metrics endpoint)."""
    from concurrent.futures import ThreadPoolExecutor

    before = read_metrics(metrics_url) if metrics_url else None
    barrier = threading.Barrier(n)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda _: run_stream(url, media, params, start_at=barrier), range(n)))
    wall = time.perf_counter() - start
    steps = window_steps = forwards = 0.0
    if before is not None:
        after = read_metrics(metrics_url)
        steps, window_steps, forwards = (
            metric_delta(before, after, f"denoiser_{k}") for k in ("steps", "window_steps", "unet_forwards")
        )
    ok = [r for r in runs if r.error is None]
    return {
        "streams": n,
        "errors": [r.error for r in runs if r.error is not None],
        "frames": sum(r.frames for r in runs),
        "wall_s": wall,
        "aggregate_fps": sum(r.frames for r in ok) / wall,
        "per_stream_fps": statistics.mean(r.frames / r.wall_s for r in ok) if ok else 0.0,
        "min_stream_fps": min((r.frames / r.wall_s for r in ok), default=0.0),
        "first_frame_s": statistics.mean(r.first_frame_s for r in ok if r.first_frame_s) if ok else None,
        "max_first_frame_s": max((r.first_frame_s or 0.0 for r in ok), default=None),
        "denoiser_steps": steps,
        "unet_forwards": forwards,
        "windows_per_unet_step": window_steps / steps if steps else None,
    }


def server_stage_costs(delta: dict[str, dict], frames: int) -> dict[str, dict]:
    """Per model: executions, mean batch, queue and compute milliseconds per output frame."""
    out = {}
    for name, d in sorted(delta.items()):
        if not d["inferences"]:
            continue
        ns = d["ns"]
        out[name] = {
            "executions": d["executions"],
            "mean_batch": d["inferences"] / max(d["executions"], 1),
            "queue_ms_per_frame": ns.get("queue", 0) / 1e6 / frames,
            "compute_ms_per_frame": sum(ns.get(k, 0) for k in ("compute_input", "compute_infer", "compute_output"))
            / 1e6
            / frames,
        }
    return out


# ---------------------------------------------------------------------------------------------------- in-process
class TimedBackend:
    """A ModelBackend that times every model call of the wrapped one (seconds per stage)."""

    # the audio encoder is timed with the rest of LipSyncStream.set_audio (log-mel, encoder, chunks)
    STAGES = {
        "detect": "detect",
        "vae_posterior": "vae_encode",
        "denoise": "unet",
        "vae_decode": "vae_decode",
        "paste_regions": "paste_back",  # the paste windows of a window's frames
    }

    def __init__(self, backend):
        self.backend = backend
        self.seconds = dict.fromkeys(PER_FRAME_STAGES, 0.0)
        self.calls = dict.fromkeys(PER_FRAME_STAGES, 0)

    def timed(self, stage: str, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        return call

    def __getattr__(self, name):
        fn = getattr(self.backend, name)
        return self.timed(self.STAGES[name], fn) if name in self.STAGES else fn


def _reference_worker(conn, repo: str, variant: str, media_file: str, params: dict) -> None:
    """Child process: load the in-process pipeline once, then time one full pass per "run" message."""
    try:
        import torch

        from latentsync_core.pipeline import LipSyncStream
        from latentsync_export.manifest import load_reference

        data = np.load(media_file)
        frames, audio = data["frames"], data["audio"]
        pipeline = load_reference(repo, variant)

        def one_pass(frames: np.ndarray, audio: np.ndarray) -> dict:
            timed = TimedBackend(pipeline.models)
            stream = LipSyncStream(timed, pipeline.variant, **params)
            stream.aligner.align = timed.timed("align", stream.aligner.align)
            start, cpu_start = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                timed.timed("audio", stream.set_audio)(audio)
                for i in range(0, len(frames), 16):
                    stream.process(frames[i : i + 16])
            wall = time.perf_counter() - start
            seconds = dict(timed.seconds)
            seconds["other"] = wall - sum(seconds.values())  # masks, sampler, compositing
            return {
                "wall_s": wall,
                "cpu_s": time.process_time() - cpu_start,  # every thread of this process
                "stage_seconds": seconds,
                "unet_calls": timed.calls["unet"],
            }

        one_pass(frames[:16], audio[: 16 * 640])  # warm-up: first calls allocate and initialise
        conn.send({"ready": True, "torch_threads": torch.get_num_threads()})
        while conn.recv() == "run":
            conn.send(one_pass(frames, audio))
        conn.send({"peak_rss_bytes": _rss_bytes(os.getpid(), "VmHWM")})
    except Exception as e:  # noqa: BLE001 - reported in the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})


class ReferenceWorker:
    """LatentSync's in-process pipeline on the repository's weights, in a process of its own (its memory is
    measured apart from the client's), timed on demand so its runs interleave with the Triton runs."""

    def __init__(self, repo: Path, variant: str, media: Media, params: dict):
        import multiprocessing

        self._tmp = tempfile.TemporaryDirectory(prefix="latentsync-bench-ref-")
        media_file = str(Path(self._tmp.name) / "media.npz")
        np.savez(media_file, frames=media.frames, audio=media.audio)
        from latentsync_serving.serve import allocator_env

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_reference_worker,
            args=(child, str(repo), variant, media_file, params),
            name="latentsync-bench-reference",
            daemon=True,
        )
        # The same malloc settings as the server's processes, so the allocator is not part of the difference.
        saved = dict(os.environ)
        os.environ.update(allocator_env(dict(os.environ)))
        try:
            self.proc.start()  # the spawned interpreter reads its environment at exec
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.torch_threads = self._receive()["torch_threads"]

    def _receive(self) -> dict:
        msg = self.conn.recv()
        if "error" in msg:
            raise RuntimeError(f"in-process pipeline failed: {msg['error']}")
        return msg

    def run(self) -> dict:
        self.conn.send("run")
        return self._receive()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self._tmp.cleanup()

    def close(self) -> int:
        """Stops the process; returns its peak RSS in bytes."""
        try:
            self.conn.send("stop")
            return self._receive()["peak_rss_bytes"]
        finally:
            self.proc.join(30)
            self._tmp.cleanup()


# ---------------------------------------------------------------------------------------------------- run
@contextlib.contextmanager
def _repository(opts: BenchOptions):
    if opts.repo is not None:
        yield Path(opts.repo)
        return
    with tempfile.TemporaryDirectory(prefix="latentsync-bench-") as tmp:
        repo = Path(tmp) / "repo"
        # The serving setup the numbers are for: every stream admitted at once, every window in flight (two per
        # stream with overlap) advanced by each denoising step, every stream's 16 frames in one per-frame model
        # request (a smaller frame batch splits the streams into groups). --export-arg flags override.
        streams = max(opts.streams, default=1)
        cmd = [
            sys.executable,
            "-m",
            "latentsync_export.export",
            "--tiny",
            "--target",
            "cpu",
            "--out",
            str(repo),
            f"--max-streams={max(8, streams)}",
            f"--max-windows={max(8, 2 * streams)}",
            f"--frame-max-batch={max(32, 16 * streams)}",
            *opts.export_args,
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        yield repo


@contextlib.contextmanager
def _server(opts: BenchOptions, repo: Path):
    if opts.url:
        yield opts.url, opts.server_pid, opts.metrics_url
        return
    from latentsync_serving.serve import TritonServer

    with tempfile.TemporaryDirectory(prefix="latentsync-bench-log-") as logs:
        server = TritonServer(repo, log_path=Path(logs) / "tritonserver.log", open_apis=["statistics"])
        try:
            server.start().wait_ready(opts.timeout)
            yield server.grpc_url, server.pid, server.metrics_url
        finally:
            server.stop()


def run(opts: BenchOptions) -> dict:
    from latentsync_contract import StreamParams
    from latentsync_export.manifest import read_manifest

    media = load_media(opts.video, opts.audio, opts.size, opts.seconds)
    n_frames = len(media.frames)
    report: dict = {
        "machine": machine(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "frames_per_stream": n_frames,
        "frame_size": list(media.frames.shape[1:3]),
    }
    with contextlib.ExitStack() as stack:
        repo = stack.enter_context(_repository(opts))
        manifest = read_manifest(repo)
        variant = opts.variant or manifest["variants"][0]
        params = StreamParams(steps=opts.steps, guidance=opts.guidance, seed=opts.seed, variant=variant)
        report.update(
            variant=variant,
            random_weights=manifest.get("random_weights"),
            repository=str(repo) if opts.repo else "(temporary --tiny)",
        )
        url, server_pid, metrics_url = stack.enter_context(_server(opts, repo))
        server_memory = stack.enter_context(MemoryWatch(ServerProbe(server_pid))) if server_pid else None
        reference = (
            ReferenceWorker(repo, variant, media, dict(steps=opts.steps, guidance=opts.guidance, seed=opts.seed))
            if opts.reference
            else None
        )
        if reference is not None:
            stack.callback(reference.kill)  # after close(): nothing left to do
        key = os.environ.get("LATENTSYNC_ADMIN_KEY")  # a --url server's statistics need its key
        stats = ServerStats(url, {GRPC_ADMIN_HEADER: key} if key else None)
        stack.callback(stats.close)
        warm = run_stream(url, media, params, keep=True)  # loads lazily initialised state everywhere
        if warm.error:
            raise RuntimeError(f"warm-up stream failed: {warm.error}")
        report["faces_found"] = f"{warm.faces}/{warm.frames}"

        # (a) one stream, Triton and in-process in turns (so both see the same background load); best of each
        stats.snapshot()
        singles, references = [], []

        def serving_cpu_s() -> float | None:
            """CPU seconds so far of the serving path: the server's processes and this client process (less the
            memory sampler's thread, which the in-process side does not have)."""
            if server_memory is None:
                return None
            server_memory.probe.refresh()
            return sum(server_memory.probe.cpu().values()) + time.process_time() - server_memory.cpu_s

        def wall_overhead() -> float:
            return min(r.wall_s for r in singles) / min(r["wall_s"] for r in references) - 1.0

        def cpu_overhead() -> float | None:
            if singles[0].cpu_s is None:
                return None
            return min(r.cpu_s for r in singles) / min(r["cpu_s"] for r in references) - 1.0

        def gated() -> float:
            """What --overhead-goal judges: CPU time where the server's processes are measured (on a shared
            machine identical Triton runs' wall times varied 2.3x, their CPU times within 9 %), else wall."""
            cpu = cpu_overhead()
            return wall_overhead() if cpu is None else cpu

        singles_start = time.perf_counter()
        while len(singles) < opts.repeats or (
            reference is not None and another_pair(opts, len(singles), gated(), time.perf_counter() - singles_start)
        ):
            cpu_start = serving_cpu_s()
            singles.append(run_stream(url, media, params))
            if cpu_start is not None:
                singles[-1].cpu_s = serving_cpu_s() - cpu_start
            if singles[-1].error:
                raise RuntimeError(f"single-stream run failed: {singles[-1].error}")
            line = f"single-stream run {len(singles)}: Triton {singles[-1].wall_s:.1f} s"
            if singles[-1].cpu_s is not None:
                line += f" ({singles[-1].cpu_s:.1f} CPU s)"
            if reference is not None:
                references.append(reference.run())
                line += f", in-process {references[-1]['wall_s']:.1f} s ({references[-1]['cpu_s']:.1f} CPU s)"
            print(line, file=sys.stderr, flush=True)  # progress: a pair takes minutes on a CPU
        server_costs = server_stage_costs(stats.snapshot(), n_frames * len(singles))
        best = min(singles, key=lambda r: r.wall_s)
        report["triton"] = {
            "wall_s": best.wall_s,
            "first_frame_s": best.first_frame_s,
            "fps": n_frames / best.wall_s,
            "runs_s": [r.wall_s for r in singles],
            "cpu_runs_s": [r.cpu_s for r in singles],
            "server_per_model": server_costs,
        }
        stages = {}
        if reference is not None:
            ref = min(references, key=lambda r: r["wall_s"])
            report["reference"] = {
                "wall_s": ref["wall_s"],
                "fps": n_frames / ref["wall_s"],
                "runs_s": [r["wall_s"] for r in references],
                "cpu_runs_s": [r["cpu_s"] for r in references],
                "torch_threads": reference.torch_threads,
            }
            report["overhead"] = wall_overhead()
            report["cpu_overhead"] = cpu_overhead()
            stages = ref["stage_seconds"]

        # (b) concurrent streams
        report["concurrency"] = [run_concurrent(url, media, params, n, metrics_url) for n in opts.streams]
        report["memory"] = {
            "server_peak_bytes": server_memory.peak.total if server_memory else None,
            "client_peak_bytes": _rss_bytes(os.getpid(), "VmHWM"),
            "reference_peak_bytes": reference.close() if reference is not None else None,
        }

    # (c) per-stage cost per frame
    per_frame = {k: v / n_frames * 1e3 for k, v in stages.items()}
    per_frame["decode"] = media.decode_s_per_frame * 1e3
    per_frame["encode"] = encode_seconds_per_frame(media, np.stack(warm.synced)) * 1e3
    if "unet" in per_frame:
        per_frame["unet_step"] = per_frame["unet"] / opts.steps
    report["stage_ms_per_frame"] = per_frame
    return report


def another_pair(opts: BenchOptions, pairs: int, overhead: float, elapsed_s: float) -> bool:
    """After `repeats` pairs, whether to run one more: only with a goal the overhead has not met yet, below
    max_repeats, and within the budget."""
    return (
        opts.overhead_goal is not None
        and overhead >= opts.overhead_goal
        and pairs < max(opts.repeats, opts.max_repeats or 0)
        and (opts.overhead_budget_s is None or elapsed_s < opts.overhead_budget_s)
    )


def machine() -> dict:
    """Where the numbers come from (without importing torch here: the client's memory is measured)."""
    from importlib.metadata import version

    info = {
        "host": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": version("torch"),
        "tritonclient": version("tritonclient"),
        "gpu": _gpu_name(),
    }
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    return info


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------- output
def _mib(x) -> str:
    return "-" if not x else f"{x / 2**20:.0f} MiB"


def markdown(r: dict) -> str:
    o, m = r["options"], r["machine"]
    lines = [
        f"### latentsync-bench: {m['cpu']} x{m['cpu_count']}{', ' + m['gpu'] if m.get('gpu') else ''}",
        "",
        f"Variant {r['variant']}{' (RANDOM tiny weights)' if r.get('random_weights') else ''}, "
        f"{r['frames_per_stream']} frames of {r['frame_size'][1]}x{r['frame_size'][0]} per stream, "
        f"{o['steps']} steps, guidance {o['guidance']}; faces found {r.get('faces_found')}; "
        f"load average at start {tuple(round(x, 1) for x in m.get('load_average', ()))}.",
        "",
    ]
    t = r["triton"]
    if "reference" in r:
        ref = r["reference"]
        lines += [
            "| path | wall s (best) | fps | first frame s |",
            "|---|---|---|---|",
            f"| in-process pipeline | {ref['wall_s']:.2f} | {ref['fps']:.2f} | - |",
            f"| Triton, 1 stream | {t['wall_s']:.2f} | {t['fps']:.2f} | {t['first_frame_s']:.2f} |",
            "",
            f"**Serving overhead: {100 * r['overhead']:+.1f}% wall"
            + (f", {100 * r['cpu_overhead']:+.1f}% CPU" if r.get("cpu_overhead") is not None else "")
            + f"** (Triton / in-process - 1, best of {len(t['runs_s'])} runs each, in turns; CPU: the server's "
            "processes and the client against the in-process pipeline's process).",
            "",
            "Runs, s: Triton "
            + ", ".join(f"{x:.1f}" for x in t["runs_s"])
            + "; in-process "
            + ", ".join(f"{x:.1f}" for x in ref["runs_s"])
            + ".",
            *(
                [
                    "CPU s: Triton "
                    + ", ".join(f"{x:.1f}" for x in t["cpu_runs_s"])
                    + "; in-process "
                    + ", ".join(f"{x:.1f}" for x in ref["cpu_runs_s"])
                    + "."
                ]
                if r.get("cpu_overhead") is not None
                else []
            ),
            "",
        ]
    lines += [
        "| streams | aggregate fps | per-stream fps (mean / min) | first frame s (mean / max) | "
        "UNet windows per denoising step | errors |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["concurrency"]:
        ff = "-" if c["first_frame_s"] is None else f"{c['first_frame_s']:.2f} / {c['max_first_frame_s']:.2f}"
        per_step = "-" if c["windows_per_unet_step"] is None else f"{c['windows_per_unet_step']:.2f}"
        lines.append(
            f"| {c['streams']} | {c['aggregate_fps']:.2f} | {c['per_stream_fps']:.2f} / "
            f"{c['min_stream_fps']:.2f} | {ff} | {per_step} | {len(c['errors'])} |"
        )
    st = r["stage_ms_per_frame"]
    lines += ["", "| stage | ms per frame |", "|---|---|"]
    for k in (*PER_FRAME_STAGES[:5], "unet", "unet_step", *PER_FRAME_STAGES[6:]):
        if k in st:
            lines.append(f"| {k.replace('_', ' ')}{' (one step)' if k == 'unet_step' else ''} | {st[k]:.2f} |")
    lines += [
        "",
        "| Triton model (1 stream) | executions | mean batch | queue ms/frame | compute ms/frame |",
        "|---|---|---|---|---|",
    ]
    for name, s in t["server_per_model"].items():
        lines.append(
            f"| {name} | {s['executions']} | {s['mean_batch']:.2f} | {s['queue_ms_per_frame']:.2f} | "
            f"{s['compute_ms_per_frame']:.2f} |"
        )
    mem = r["memory"]
    lines += [
        "",
        f"Peak memory: server {_mib(mem.get('server_peak_bytes'))} (tritonserver + stubs: anonymous + /dev/shm), "
        f"client {_mib(mem.get('client_peak_bytes'))}, in-process pipeline "
        f"{_mib(mem.get('reference_peak_bytes'))}.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchOptions | CeilingOptions, argparse.Namespace]:
    p = argparse.ArgumentParser(
        prog="latentsync-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--repo",
        type=Path,
        help="repository built by latentsync-export --target cpu (with "
        "--stand-ins: one built with --stand-ins; default: built for the run)",
    )
    src.add_argument("--tiny", action="store_true", help="build a random tiny repository for the run")
    p.add_argument(
        "--export-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra latentsync-export flag for --tiny (repeat; e.g. --export-arg=--max-windows=4)",
    )
    p.add_argument("--video", type=Path, required=True, help="a video with a face (real clip)")
    p.add_argument("--audio", type=Path, help="voice track (default: the video's audio)")
    p.add_argument(
        "--url",
        help="benchmark a running server (grpc host:port) instead of starting one; its "
        "statistics need env LATENTSYNC_ADMIN_KEY or latentsync-serve --open-api statistics",
    )
    p.add_argument("--server-pid", type=int, help="with --url: the server's process group, for its memory")
    p.add_argument("--metrics-url", help="with --url: its Prometheus endpoint, e.g. http://HOST:8002/metrics")
    p.add_argument("--size", type=int, default=256, help="resize frames to this longer side (0: keep)")
    p.add_argument("--seconds", type=float, default=2.5, help="audio seconds per stream")
    p.add_argument("--steps", default=None, help="DDIM steps (default 20); with --stand-ins a list (default 20,1)")
    p.add_argument("--guidance", type=float, default=1.5)
    p.add_argument("--seed", type=int, default=1247)
    p.add_argument("--variant")
    p.add_argument("--streams", default=None, help="concurrency levels (default 1,2,4,8; --stand-ins 1,8,16)")
    p.add_argument("--repeats", type=int, default=2, help="single-stream runs of each path (best counts)")
    p.add_argument(
        "--overhead-goal",
        type=float,
        help="while the serving overhead in CPU time (a fraction, e.g. 0.1; wall time where the server's "
        "processes are not measured) is at or above this, run more pairs, up to --max-repeats",
    )
    p.add_argument("--max-repeats", type=int, help="with --overhead-goal: most single-stream runs of each path")
    p.add_argument(
        "--overhead-budget",
        type=float,
        metavar="SECONDS",
        help="with --overhead-goal: start no pair beyond --repeats once the single-stream runs took this long",
    )
    p.add_argument("--no-reference", action="store_true", help="skip the in-process pipeline")
    p.add_argument("--json", action="store_true", help="print the report as JSON (machines)")
    p.add_argument("--out", type=Path, help="also write the JSON report here")
    stand = p.add_argument_group("the serving path's ceiling (--stand-ins; frames at the clip's size)")
    stand.add_argument(
        "--stand-ins",
        action="store_true",
        help="the networks replaced by near-zero-cost "
        "stand-ins: the serving path's own throughput, CPU and memory per stream (ceiling.py)",
    )
    stand.add_argument("--frames", type=int, default=64, help="frames per stream")
    stand.add_argument("--per-request", type=int, default=4, help="frames per request (latentsync-client's default)")
    stand.add_argument(
        "--ahead",
        type=int,
        default=36,
        help="frames a stream keeps unanswered, as latentsync-client (at most 64; 0: all at once, as a raw client "
        "may: the server fails a stream with more than 64 waiting)",
    )
    a = p.parse_args(argv)
    ints = lambda text, default: [int(x) for x in (text or default).split(",") if x]  # noqa: E731
    if a.stand_ins:
        if a.tiny or a.url:
            p.error("--stand-ins starts its own server on a --stand-ins repository (--repo, or built for the run)")
        return CeilingOptions(
            video=a.video,
            audio=a.audio,
            repo=a.repo,
            streams=ints(a.streams, "1,8,16"),
            steps=ints(a.steps, "20,1"),
            frames=a.frames,
            per_request=a.per_request,
            ahead=a.ahead,
            guidance=a.guidance,
            seed=a.seed,
        ), a
    if not (a.repo or a.tiny):
        p.error("one of --repo, --tiny or --stand-ins is required")
    steps = ints(a.steps, "20")
    if len(steps) != 1:
        p.error("--steps takes one value without --stand-ins")
    opts = BenchOptions(
        video=a.video,
        audio=a.audio,
        repo=a.repo,
        tiny=a.tiny,
        export_args=a.export_arg,
        url=a.url,
        server_pid=a.server_pid,
        metrics_url=a.metrics_url,
        size=a.size,
        seconds=a.seconds,
        steps=steps[0],
        guidance=a.guidance,
        seed=a.seed,
        variant=a.variant,
        streams=ints(a.streams, "1,2,4,8"),
        repeats=a.repeats,
        overhead_goal=a.overhead_goal,
        max_repeats=a.max_repeats,
        overhead_budget_s=a.overhead_budget,
        reference=not a.no_reference,
    )
    return opts, a


def main(argv: Sequence[str] | None = None) -> int:
    opts, a = parse_args(argv)
    report = ceiling.run(opts) if isinstance(opts, CeilingOptions) else run(opts)
    text = json.dumps(report, indent=1, default=str)
    if a.out:
        a.out.write_text(text + "\n")
    if not a.json:
        text = ceiling.markdown(report) if isinstance(opts, CeilingOptions) else markdown(report)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
