"""Bounded soak test: N concurrent latentsync-client syncs for T seconds against a running `lipsync` server.

    latentsync-soak --url 127.0.0.1:8001 --metrics-url http://127.0.0.1:8002/metrics --server-pid PID \
        --clip ../shared/media/demo1_video.mp4 --streams 8 --seconds 300 --max-rss-growth-mb 1024
    latentsync-soak ... --short          # 8 streams for ~40 s (the CI smoke version)

Each worker runs `sync_file` (the CLI's own path: decode, stream, encode) on a small clip made once from
--clip and --audio-seconds of a tone, over and over until the time is up (a sync in progress finishes), and
re-opens every output to check it decodes to exactly the frame count the audio asks for.

Server memory: the summed resident memory of --server-pid and its descendants (the Python backend stubs),
sampled after the first sync of every worker (warm: models loaded, buffers allocated) and at the end; the
growth must stay under --max-rss-growth-mb (samples every 5 s are printed too, to tell a one-off step from
steady growth). The `lipsync_open_streams` gauge must be back to 0 at the end.
Prints one JSON summary; exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import av
import numpy as np

from latentsync_client import LipsyncClient, StreamParams, num_frames_for_audio
from latentsync_client.errors import ClientError
from latentsync_client.sync import sync_file


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC HOST:PORT")
    p.add_argument("--metrics-url", help="Prometheus URL of the server (checks lipsync_open_streams)")
    p.add_argument("--server-pid", type=int, help="tritonserver pid (checks resident memory growth)")
    p.add_argument("--clip", required=True, help="video whose first --clip-frames frames are used")
    p.add_argument("--clip-frames", type=int, default=12)
    p.add_argument(
        "--face-frames",
        type=int,
        default=1,
        help="keep the first K frames of the clip, blank the rest: faceless frames pass through, "
        "so K sets the server work per sync (a stream needs one face to succeed)",
    )
    p.add_argument("--width", type=int, default=540, help="frame width in pixels (height keeps the aspect)")
    p.add_argument("--audio-seconds", type=float, default=0.5)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=512.0,
        help="bound on server RSS growth after the warm-up (tiny CPU repository, 8 streams, "
        "MALLOC_ARENA_MAX=2 as latentsync-serve sets it: ~180 MB, then flat)",
    )
    p.add_argument(
        "--warmup-seconds",
        type=float,
        default=20.0,
        help="seconds of full load after every stream's first sync before the memory baseline",
    )
    p.add_argument("--short", action="store_true", help="8 streams for 60 s (overrides --streams/--seconds)")
    a = p.parse_args(argv)
    if a.short:
        a.streams, a.seconds = 8, 60.0
    return a


# ------------------------------------------------------------------------------------------------ inputs
def make_inputs(
    clip: str, n_frames: int, face_frames: int, width: int, audio_seconds: float, folder: Path
) -> tuple[Path, Path]:
    """A small 25 fps h264 clip from `clip` and a 16 kHz tone wav (small: the server, not the codec, is tested)."""
    video, audio = folder / "clip.mp4", folder / "voice.wav"
    with av.open(clip) as src, av.open(str(video), "w") as dst:
        stream = dst.add_stream("libx264", rate=25)
        source = src.streams.video[0]
        stream.width, stream.height = width, round(source.height * width / source.width / 2) * 2
        stream.pix_fmt = "yuv420p"
        for i, frame in zip(range(n_frames), src.decode(source)):
            rgb = frame.to_ndarray(format="rgb24", width=stream.width, height=stream.height)
            rgb = rgb if i < face_frames else np.zeros_like(rgb)
            dst.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        dst.mux(stream.encode())
    t = np.arange(int(audio_seconds * 16000)) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    with av.open(str(audio), "w") as dst:
        stream = dst.add_stream("pcm_s16le", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone[None], format="s16", layout="mono")
        frame.rate = 16000
        dst.mux(stream.encode(frame))
        dst.mux(stream.encode())
    return video, audio


def decoded_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


# ------------------------------------------------------------------------------------------------ server
def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MB (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            total += int(
                next(ln for ln in Path(f"/proc/{p}/status").read_text().splitlines() if ln.startswith("VmRSS")).split()[
                    1
                ]
            )
        except (OSError, StopIteration):
            pass
    return total / 1024


def open_streams(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("lipsync_open_streams{"))


# ------------------------------------------------------------------------------------------------ soak
def soak(a: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="latentsync-soak-"))
    video, audio = make_inputs(a.clip, a.clip_frames, a.face_frames, a.width, a.audio_seconds, work)
    expected = num_frames_for_audio(int(a.audio_seconds * 16000))
    params = StreamParams(steps=a.steps, seed=7)
    lock, warm = threading.Lock(), threading.Barrier(a.streams + 1)
    stats = {"syncs": 0, "frames": 0, "errors": [], "incomplete": []}
    deadline = time.monotonic() + a.seconds

    def worker(i: int) -> None:
        client, first = LipsyncClient(a.url, response_timeout=120), True
        while first or time.monotonic() < deadline:
            out = work / f"out-{i}.mp4"
            try:
                sync_file(video, audio, out, client=client, params=params, require_face=False, preset="ultrafast")
                n = decoded_frames(out)
                with lock:
                    stats["syncs"] += 1
                    stats["frames"] += n
                    if n != expected:
                        stats["incomplete"].append(f"worker {i}: {n} of {expected} frames")
            except (ClientError, OSError, av.FFmpegError) as e:
                with lock:
                    stats["errors"].append(f"worker {i}: {type(e).__name__}: {e}")
            finally:
                out.unlink(missing_ok=True)
            if first:
                first = False
                warm.wait()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(a.streams)]
    started = time.monotonic()
    for t in threads:
        t.start()
    warm.wait()  # every worker finished one sync: models loaded, buffers sized
    # The allocators (glibc arenas per thread, Triton's gRPC buffers, torch's caches) keep growing for a while
    # after the first round; the baseline is taken after --warmup-seconds more of full load, so the bound
    # is on growth under steady load, which is what a leak shows up as.
    warm_at, samples, after_warm = time.monotonic() + a.warmup_seconds, [], []
    while a.server_pid and any(t.is_alive() for t in threads):
        rss = tree_rss_mb(a.server_pid)
        samples.append(round(rss))  # every 5 s: tells a one-off step from steady growth
        if time.monotonic() >= warm_at:
            after_warm.append(rss)  # the first one is the baseline
        time.sleep(5.0)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    rss_end = tree_rss_mb(a.server_pid) if a.server_pid else None
    gauge = None
    if a.metrics_url:  # ended streams are freed at once; allow the reaper a moment
        for _ in range(40):
            gauge = open_streams(a.metrics_url)
            if gauge == 0:
                break
            time.sleep(0.25)
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    # Growth = the highest sample after the baseline (not just the end: ended streams free their state).
    rss_warm = after_warm[0] if after_warm else None
    growth = None if rss_warm is None else max(after_warm + [rss_end]) - rss_warm
    if a.server_pid and rss_warm is None:
        stats["errors"].append(f"the run ended before the {a.warmup_seconds:g} s warm-up: no memory baseline")
    ok = (
        not stats["errors"]
        and not stats["incomplete"]
        and stats["syncs"] >= a.streams
        and (growth is None or growth <= a.max_rss_growth_mb)
        and gauge in (None, 0)
    )
    return {
        "ok": ok,
        "streams": a.streams,
        "seconds": round(elapsed, 1),
        "syncs": stats["syncs"],
        "frames": stats["frames"],
        "frames_per_sync": expected,
        "errors": stats["errors"][:20],
        "n_errors": len(stats["errors"]),
        "incomplete": stats["incomplete"][:20],
        "server_rss_warm_mb": rss_warm and round(rss_warm, 1),
        "server_rss_end_mb": rss_end and round(rss_end, 1),
        "server_rss_growth_mb": growth if growth is None else round(growth, 1),
        "server_rss_samples_mb": samples[:: max(1, len(samples) // 30)],
        "max_rss_growth_mb": a.max_rss_growth_mb,
        "open_streams_at_end": gauge,
    }


def main(argv=None) -> int:
    summary = soak(parse_args(argv))
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
