"""`latentsync-bench --stand-ins`: the serving path's own ceiling, and the server's memory per stream.

The repository serves near-zero-cost stand-ins for the UNet, the VAE and the audio encoder (`latentsync-export
--stand-ins`: same inputs and outputs), so what is measured is the serving path itself: gRPC, the `lipsync`
orchestrator, the BLS transfers, face detection, alignment, the denoising loop's bookkeeping and paste-back. No
GPU can make the product faster than this. Real frames at their size (a clip decoded once: 1080x1920 for
../shared/media/demo1_video.mp4), raw gRPC streams (docs/PROTOCOL.md) started together, at each stream count
and each step count:
  - window-steps/s (`denoiser_window_steps`), frames/s, time to each stream's first response;
  - server CPU ms per frame: utime + stime of tritonserver and every backend stub (/proc), per process and
    summed; the lipsync stub's own ms per frame and per window-step; the client's (this process) apart;
  - UNet windows per step (`denoiser_window_steps / denoiser_steps`), and the BLS requests and bytes per window
    and per window-step of every callee (`lipsync_bls_*`);
  - server memory (server_probe.py): PSS summed over tritonserver and its stubs, and /dev/shm of its Python
    backend regions, at idle (after load, and after a small warm-up stream that initialises what models load
    lazily), at the peak (sampled every 0.5 s) and a few seconds after the streams ended.
A stream keeps at most `ahead` frames sent and not yet answered (the two windows the server overlaps), and at most
UNANSWERED_REQUESTS requests waiting to be acknowledged, as latentsync-client does; `--ahead 0` sends everything
at once, as a raw client may (the server then holds what the client sent ahead, up to MAX_UNANSWERED_FRAMES
waiting frames per stream; a stream that sends more fails).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .server_probe import CpuUse, MemorySample, MemoryWatch, ServerProbe, metric_delta, read_metrics

SAMPLES_PER_FRAME = 640  # 16 kHz / 25 fps: num_frames_for_audio((n - 2) * 640) == n


@dataclass
class CeilingOptions:
    video: Path
    audio: Path | None = None  # default: the video's own audio track
    repo: Path | None = None  # a repository built with --stand-ins; default: built for the run
    streams: Sequence[int] = (1, 8, 16)
    steps: Sequence[int] = (20, 1)
    frames: int = 64  # per stream
    per_request: int = 4  # frames per request (latentsync-client's default)
    ahead: int = 36  # frames a stream keeps unanswered, as latentsync-client; 0: all at once
    guidance: float = 1.5
    seed: int = 1247
    warmup_side: int = 960  # longer side of the warm-up stream's frames (a face must be found)
    settle_s: float = 5.0  # after the streams ended, before memory is read again
    period_s: float = 0.5  # memory sampling period
    timeout: float = 900.0  # server start-up; a stream's silence


@dataclass
class Clip:
    frames: np.ndarray  # (n, H, W, 3) uint8, shared by every stream
    audio: np.ndarray  # 16 kHz float32 covering exactly n frames


def load_clip(video: Path, audio: Path | None, n: int) -> Clip:
    """The first n frames at 25 fps (ping-pong if the clip is shorter) and the speech that covers them."""
    from latentsync_client import audio_chunks, frames_25fps, ping_pong_index
    from latentsync_contract import num_frames_for_audio

    decoded = list(itertools.islice(frames_25fps(video), n))
    frames = np.stack([decoded[ping_pong_index(j, len(decoded))] for j in range(n)])
    samples = np.concatenate(list(audio_chunks(audio or video)))
    need = (n - 2) * SAMPLES_PER_FRAME
    samples = np.resize(samples, max(need, 1))[:need].astype(np.float32)  # a short track repeats
    assert num_frames_for_audio(len(samples)) == n
    return Clip(frames, samples)


def smaller(clip: Clip, side: int, n: int = 16) -> Clip:
    import cv2

    h, w = clip.frames.shape[1:3]
    scale = side / max(h, w)
    size = (max(2, round(w * scale) // 2 * 2), max(2, round(h * scale) // 2 * 2))
    frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in clip.frames[:n]])
    return Clip(frames, clip.audio[: (n - 2) * SAMPLES_PER_FRAME])


# ---------------------------------------------------------------------------------------------------- streams
@dataclass
class StreamRun:
    frames: int = 0  # frames that came back
    first_s: float | None = None  # first response with frames
    wall_s: float = 0.0
    error: str | None = None


def send_request(stream, i: int, total: int, frames: np.ndarray, audio: np.ndarray, sequence_id: int, params):
    """Request i of `total` of a stream on an open latentsync_client InferStream (docs/PROTOCOL.md): FRAMES and
    AUDIO (either may be empty), the sequence flags, and the stream's parameters with the first request."""
    from latentsync_client.grpc_stream import encode_request
    from latentsync_contract import AUDIO, FRAMES, MODEL_NAME

    request = encode_request(
        MODEL_NAME,
        [(FRAMES, frames), (AUDIO, audio)],
        request_id=str(i),
        sequence_id=sequence_id,
        sequence_start=i == 0,
        sequence_end=i == total - 1,
        parameters=params if i == 0 else None,
    )
    stream.send(request)


def raw_stream(
    url: str,
    clip: Clip,
    params: dict,
    per_request: int = 4,
    ahead: int = 36,
    timeout: float = 900.0,
    start: threading.Barrier | None = None,
    unanswered: int | None = None,
) -> StreamRun:
    """One stream as docs/PROTOCOL.md says, over latentsync-client's gRPC stream: the audio, then the frames in
    requests as latentsync-client cuts them (`request_spans`), with at most `ahead` frames unanswered (0: no
    limit) and, as latentsync-client, at most `unanswered` requests that complete no window waiting for their
    final response (default UNANSWERED_REQUESTS; 0: no limit). Frames that come back are counted from the
    response's FRAME_INDEX, their regions not pasted."""
    from latentsync_client.grpc_stream import InferStream
    from latentsync_contract import (
        FRAME_INDEX,
        MAX_UNANSWERED_FRAMES,
        UNANSWERED_REQUESTS,
        WINDOW,
        completes_window,
        request_spans,
    )

    if ahead and not WINDOW + per_request <= ahead <= MAX_UNANSWERED_FRAMES:  # whole windows; the server's bound
        raise ValueError(f"ahead must be 0 or {WINDOW + per_request}..{MAX_UNANSWERED_FRAMES}")
    unanswered = UNANSWERED_REQUESTS if unanswered is None else unanswered
    n, (h, w) = len(clip.frames), clip.frames.shape[1:3]
    requests = [(np.zeros((0, h, w, 3), np.uint8), clip.audio, True)]
    requests += [
        (clip.frames[start:stop], np.zeros(0, np.float32), not completes_window(stop, n))
        for start, stop in request_spans(n, per_request)
    ]
    run, replies, counts = StreamRun(), queue.SimpleQueue(), {"finals": 0}
    waiting: set[str] = set()  # acknowledged requests without their final response
    sequence_id = secrets.randbits(62) | 1

    def take() -> None:
        result, error = replies.get(timeout=timeout)
        if error is not None:
            raise RuntimeError(str(error))
        response = result.get_response()
        run.frames += sum(int(o.shape[0]) for o in response.outputs if o.name == FRAME_INDEX)
        if run.first_s is None and run.frames:
            run.first_s = time.perf_counter() - t0
        if response.parameters["triton_final_response"].bool_param:
            counts["finals"] += 1
            waiting.discard(response.id)

    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    stream = InferStream(url, callback=lambda result, error: replies.put((result, error)))  # connects on first use
    try:
        sent = 0
        for i, (frames, audio, acknowledged) in enumerate(requests):
            while (ahead and sent - run.frames + len(frames) > ahead) or (
                acknowledged and unanswered and len(waiting) >= unanswered
            ):
                take()
            send_request(stream, i, len(requests), frames, audio, sequence_id, params)
            sent += len(frames)
            if acknowledged:
                waiting.add(str(i))
        while counts["finals"] < len(requests):
            take()
    except (RuntimeError, queue.Empty) as e:
        run.error = str(e) or f"no response for {timeout:.0f} s"
    finally:
        stream.close()
    run.wall_s = time.perf_counter() - t0
    return run


# ---------------------------------------------------------------------------------------------------- one level
def _memory(sample: MemorySample) -> dict:
    return {
        "bytes": sample.total,
        "anon_bytes": sample.anon,
        "shm_bytes": sample.shm,
        "pss_bytes": sample.pss,
        "anon_by_process": sample.by_process,
    }


def run_level(
    server, probe: ServerProbe, clip: Clip, n: int, steps: int, opts: CeilingOptions, idle: MemorySample
) -> dict:
    """n streams of `clip` started together; throughput, CPU, BLS traffic and memory of the server meanwhile."""
    params = {"steps": steps, "guidance": opts.guidance, "seed": opts.seed}
    metrics0, cpu0, client0 = read_metrics(server.metrics_url), probe.cpu_use(), os.times()
    start = threading.Barrier(n)
    with MemoryWatch(probe, opts.period_s) as watch:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            runs = list(
                pool.map(
                    lambda _: raw_stream(
                        server.grpc_url,
                        clip,
                        params,
                        opts.per_request,
                        opts.ahead,
                        opts.timeout,
                        start,
                        unanswered=None if opts.ahead else 0,  # --ahead 0: a raw client that paces nothing
                    ),
                    range(n),
                )
            )
        wall = time.perf_counter() - t0
    metrics1, cpu1, client1 = read_metrics(server.metrics_url), probe.cpu_use(), os.times()
    time.sleep(opts.settle_s)
    after = probe.memory(exact=True)

    frames = sum(r.frames for r in runs)
    delta = lambda name, **labels: metric_delta(metrics0, metrics1, name, **labels)  # noqa: E731
    window_steps, unet_steps, windows = (delta(f"denoiser_{k}") for k in ("window_steps", "steps", "windows"))
    use = {name: cpu1[name] - cpu0.get(name, CpuUse()) for name in cpu1}
    cpu = {name: u.seconds for name, u in use.items()}
    per_frame = lambda seconds: seconds * 1e3 / max(frames, 1)  # noqa: E731
    callees = sorted(
        {
            dict(labels)["callee"]
            for (name, labels) in metrics1
            if name == "lipsync_bls_requests" and "callee" in dict(labels)
        }
    )
    bls = {}
    for callee in callees:
        calls = delta("lipsync_bls_requests", callee=callee)
        bytes_in = delta("lipsync_bls_input_bytes", callee=callee)
        bytes_out = delta("lipsync_bls_output_bytes", callee=callee)
        if calls:
            bls[callee] = {
                "requests_per_window": calls / max(windows, 1),
                "input_bytes_per_window": bytes_in / max(windows, 1),
                "output_bytes_per_window": bytes_out / max(windows, 1),
                "requests_per_window_step": calls / max(window_steps, 1),
                "bytes_per_window_step": (bytes_in + bytes_out) / max(window_steps, 1),
            }
    ok = [r for r in runs if r.error is None]
    return {
        "streams": n,
        "steps": steps,
        "frames": frames,
        "wall_s": wall,
        "errors": [r.error for r in runs if r.error is not None],
        "frames_per_s": frames / wall,
        "window_steps_per_s": window_steps / wall,
        "windows": windows,
        "window_steps": window_steps,
        "unet_steps": unet_steps,
        "windows_per_unet_step": window_steps / unet_steps if unet_steps else None,
        "first_response_s": statistics.mean(r.first_s for r in ok if r.first_s) if ok else None,
        "max_first_response_s": max((r.first_s or 0.0 for r in ok), default=None),
        "server_cpu_ms_per_frame": per_frame(sum(cpu.values())),
        "cpu_ms_per_frame": {name: per_frame(s) for name, s in sorted(cpu.items())},
        # the kernel's share (page faults and unmaps of fresh memory, copies into and out of sockets) and the
        # minor page faults behind much of it
        "server_system_cpu_ms_per_frame": per_frame(sum(u.system for u in use.values())),
        "system_cpu_ms_per_frame": {name: per_frame(u.system) for name, u in sorted(use.items())},
        "minor_faults_per_frame": {name: u.minor_faults / max(frames, 1) for name, u in sorted(use.items())},
        "lipsync_ms_per_frame": per_frame(cpu.get("lipsync", 0.0)),
        "lipsync_ms_per_window_step": cpu.get("lipsync", 0.0) * 1e3 / window_steps if window_steps else None,
        "client_cpu_ms_per_frame": per_frame(
            client1.user + client1.system - client0.user - client0.system - watch.cpu_s
        ),
        "memory_sampling_cpu_ms_per_s": watch.cpu_s * 1e3 / wall,
        "bls": bls,
        "memory": {
            "peak": _memory(watch.peak),
            "peak_shm_bytes": watch.peak_shm,
            "after": _memory(after),
            "per_stream_peak_bytes": (watch.peak.total - idle.total) / n,
            "after_minus_idle_bytes": after.total - idle.total,
        },
    }


# ---------------------------------------------------------------------------------------------------- run
@contextlib.contextmanager
def _repository(opts: CeilingOptions):
    if opts.repo is not None:
        yield Path(opts.repo)
        return
    with tempfile.TemporaryDirectory(prefix="latentsync-ceiling-") as tmp:
        repo = Path(tmp) / "repo"
        # Every stream admitted at once, and every window in flight (two per stream) advanced by each step.
        most = max(opts.streams)
        cmd = [
            sys.executable,
            "-m",
            "latentsync_export.export",
            "--tiny",
            "--stand-ins",
            "--variants",
            "1.5",
            "--target",
            "cpu",
            "--out",
            str(repo),
            f"--max-streams={most}",
            f"--max-windows={2 * most}",
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        yield repo


@contextlib.contextmanager
def _server(repo: Path, timeout: float):
    from latentsync_serving.serve import TritonServer

    with tempfile.TemporaryDirectory(prefix="latentsync-ceiling-log-") as logs:
        server = TritonServer(repo, log_path=Path(logs) / "tritonserver.log")
        try:
            server.start().wait_ready(timeout)
            yield server
        finally:
            server.stop()


def run(opts: CeilingOptions) -> dict:
    from latentsync_export.manifest import read_manifest

    from .bench import machine

    clip = load_clip(opts.video, opts.audio, opts.frames)
    report: dict = {
        "machine": machine(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "frame_size": list(clip.frames.shape[1:3]),
        "frames_per_stream": len(clip.frames),
    }
    with _repository(opts) as repo, _server(repo, opts.timeout) as server:
        if not read_manifest(repo).get("stand_ins"):
            raise ValueError(f"{repo} serves the networks: build it with latentsync-export --stand-ins")
        probe = ServerProbe(server.pid, server.shm_prefix)
        time.sleep(opts.settle_s)
        cold = probe.memory(exact=True)
        warm = raw_stream(server.grpc_url, smaller(clip, opts.warmup_side), {"steps": 1}, timeout=opts.timeout)
        if warm.error:
            raise RuntimeError(f"warm-up stream failed: {warm.error}")
        time.sleep(opts.settle_s)
        idle = probe.memory(exact=True)
        report["memory_idle"] = {"after_load": _memory(cold), "after_warm_up": _memory(idle)}
        report["levels"] = [
            run_level(server, probe, clip, n, steps, opts, idle) for steps in opts.steps for n in opts.streams
        ]
    return report


# ---------------------------------------------------------------------------------------------------- output
def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:,.0f}"


def markdown(r: dict) -> str:
    m, o = r["machine"], r["options"]
    h, w = r["frame_size"]
    idle = r["memory_idle"]
    lines = [
        f"### latentsync-bench --stand-ins: {m['cpu']} x{m['cpu_count']}",
        "",
        f"Stand-in UNet, VAE and audio encoder; {r['frames_per_stream']} frames of {w}x{h} per stream, "
        f"{o['per_request']} per request, at most {o['ahead'] or 'all'} unanswered; guidance {o['guidance']}; "
        f"load average at start {tuple(round(x, 1) for x in m.get('load_average', ()))}.",
        "",
        "| streams | steps | frames/s | window-steps/s | windows per UNet step | first response s (mean / max) "
        "| server CPU ms/frame | lipsync ms/frame | lipsync ms/window-step | client CPU ms/frame | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in r["levels"]:
        first = (
            "-"
            if lv["first_response_s"] is None
            else f"{lv['first_response_s']:.1f} / {lv['max_first_response_s']:.1f}"
        )
        per_step = lv["lipsync_ms_per_window_step"]
        lines.append(
            f"| {lv['streams']} | {lv['steps']} | {lv['frames_per_s']:.2f} | {lv['window_steps_per_s']:.1f} "
            f"| {lv['windows_per_unet_step'] or 0:.2f} | {first} | {lv['server_cpu_ms_per_frame']:.1f} "
            f"| {lv['lipsync_ms_per_frame']:.1f} | {'-' if per_step is None else f'{per_step:.2f}'} "
            f"| {lv['client_cpu_ms_per_frame']:.1f} | {len(lv['errors'])} |"
        )
    names = sorted({k for lv in r["levels"] for k in lv["cpu_ms_per_frame"]})
    lines += [
        "",
        "Server CPU ms per frame, by process: all / of it in the kernel (page faults, unmaps, socket copies) / "
        "minor page faults per frame:",
        "",
        "| streams | steps | " + " | ".join(names) + " | all processes |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]

    def cpu_cell(lv: dict, name: str | None) -> str:
        total = lv["server_cpu_ms_per_frame"] if name is None else lv["cpu_ms_per_frame"].get(name, 0.0)
        if "system_cpu_ms_per_frame" not in lv:  # a report from before the kernel's share was measured
            return f"{total:.1f}"
        faults = lv["minor_faults_per_frame"]
        system = lv["server_system_cpu_ms_per_frame"] if name is None else lv["system_cpu_ms_per_frame"].get(name, 0)
        fault_count = sum(faults.values()) if name is None else faults.get(name, 0)
        return f"{total:.1f} / {system:.1f} / {fault_count:,.0f}"

    for lv in r["levels"]:
        cells = [cpu_cell(lv, k) for k in names] + [cpu_cell(lv, None)]
        lines.append(f"| {lv['streams']} | {lv['steps']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "BLS traffic per window (16 frames), by callee (the last level):",
        "",
        "| callee | requests/window | MB in/window | MB out/window | requests/window-step | MB/window-step |",
        "|---|---|---|---|---|---|",
    ]
    for callee, b in r["levels"][-1]["bls"].items():
        lines.append(
            f"| {callee} | {b['requests_per_window']:.2f} | {_mb(b['input_bytes_per_window'])} | "
            f"{_mb(b['output_bytes_per_window'])} | {b['requests_per_window_step']:.3f} | "
            f"{_mb(b['bytes_per_window_step'])} |"
        )
    cold, warm = idle["after_load"], idle["after_warm_up"]
    lines += [
        "",
        "Server memory, MB: anonymous memory of tritonserver and every stub + the /dev/shm of its regions "
        "(= summed PSS less file-backed pages; sampled every "
        f"{o['period_s']} s). Idle after load {_mb(cold['bytes'])} (shm {_mb(cold['shm_bytes'])}; summed "
        f"PSS {_mb(cold['pss_bytes'])}), after the warm-up stream {_mb(warm['bytes'])} (shm "
        f"{_mb(warm['shm_bytes'])}; PSS {_mb(warm['pss_bytes'])}); per level against the latter:",
        "",
        "| streams | steps | peak | peak shm | per stream at peak | after | after - idle | shm after | PSS after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in r["levels"]:
        mem = lv["memory"]
        lines.append(
            f"| {lv['streams']} | {lv['steps']} | {_mb(mem['peak']['bytes'])} | "
            f"{_mb(mem['peak_shm_bytes'])} | {_mb(mem['per_stream_peak_bytes'])} | "
            f"{_mb(mem['after']['bytes'])} | {_mb(mem['after_minus_idle_bytes'])} | "
            f"{_mb(mem['after']['shm_bytes'])} | {_mb(mem['after']['pss_bytes'])} |"
        )
    return "\n".join(lines) + "\n"
