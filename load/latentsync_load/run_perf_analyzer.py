"""Run Triton's perf_analyzer against every model of a LatentSync repository (lipsync streaming over gRPC).

    latentsync-perf-analyzer --repo REPO --clip FACE.mp4 --out DIR --start-server   # loopback server
    latentsync-perf-analyzer --repo REPO --clip FACE.mp4 --out DIR --url 127.0.0.1:8001

perf_analyzer comes from install_perf_analyzer.sh beside this file (run on demand), input data from perf_inputs.py.
For each model: DIR/<model>.csv (perf_analyzer's own report), DIR/<model>.log (its stdout), and together
DIR/summary.json and DIR/summary.md (throughput, latency percentiles, server queue/compute split). `lipsync`
runs with --streaming and real per-sequence data streams (audio first, then frames); its figures are per
request (a request of 16 frames is one window). Defaults keep a CPU run short; raise --requests and
--max-trials for stable numbers on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import time
from pathlib import Path

from latentsync_serving.serve import INTERNAL_KEY_PARAMETER, TritonServer, check_admin_key, internal_key

from . import perf_inputs

HERE = Path(__file__).resolve().parent


def perf_analyzer() -> str:
    out = subprocess.run([str(HERE / "install_perf_analyzer.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def command(binary: str, model: str, spec: dict, url: str, a, csv_path: Path) -> list[str]:
    cmd = [
        binary,
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--input-data",
        spec["input_data"],
        "--concurrency-range",
        a.concurrency,
        "-f",
        str(csv_path),
        "--percentile",
        "95",
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(a.requests),
        "-s",
        str(a.stability),
        "-r",
        str(a.max_trials),
    ]
    if spec.get("batch"):
        cmd += ["-b", str(spec["batch"])]
    if spec.get("streaming"):  # decoupled models: lipsync, and the denoisers (their default spec: 20 DDIM steps)
        cmd += ["--streaming"]
    if model == "lipsync":
        # (--bls-composing-models is left out: with it perf_analyzer 2.60 sends sequence requests without a
        # correlation id; latentsync-bench reports the composing models from the server statistics instead)
        cmd += [
            "--request-parameter",
            f"steps:{a.steps}:int",
            "--request-parameter",
            f"variant:{spec['variant']}:string",
        ]
    elif a.internal_key:  # the other models answer only requests with the server's internal key
        cmd += ["--request-parameter", f"{INTERNAL_KEY_PARAMETER}:{a.internal_key}:string"]
    return cmd


def redact(arg: str, key: str) -> str:
    return arg.replace(key, "<internal key>") if key else arg


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    us = lambda row, key: float(row.get(key) or 0) / 1e3  # noqa: E731 - microseconds -> ms
    return [
        {
            "concurrency": int(r["Concurrency"]),
            "infer_per_s": float(r["Inferences/Second"]),
            "p50_ms": us(r, "p50 latency"),
            "p95_ms": us(r, "p95 latency"),
            "p99_ms": us(r, "p99 latency"),
            "avg_ms": us(r, "Avg latency"),
            "server_queue_ms": us(r, "Server Queue"),
            "server_compute_ms": us(r, "Server Compute Input")
            + us(r, "Server Compute Infer")
            + us(r, "Server Compute Output"),
        }
        for r in rows
    ]


def markdown(summary: dict) -> str:
    meta = summary["meta"]
    lines = [
        f"perf_analyzer {summary['version']} on {summary['url']}: variant {meta['variant']}, lipsync "
        f"streams of {meta['frames_per_stream']} frames ({meta['frame_size'][1]}x{meta['frame_size'][0]}), "
        f"{summary['steps']} steps.",
        "",
        "| model | batch | concurrency | infer/s | p50 ms | p95 ms | p99 ms | server queue ms "
        "| server compute ms | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in summary["models"].items():
        if not r["rows"]:
            lines.append(f"| {name} | {r['batch'] or '-'} | - | - | - | - | - | - | - | {r['status']} |")
        for row in r["rows"]:
            lines.append(
                f"| {name} | {r['batch'] or '-'} | {row['concurrency']} | {row['infer_per_s']:.3f} | "
                f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | {row['p99_ms']:.0f} | "
                f"{row['server_queue_ms']:.0f} | {row['server_compute_ms']:.0f} | {r['status']} |"
            )
    return "\n".join(lines) + "\n"


def failure_reason(proc: subprocess.CompletedProcess, key: str = "") -> str:
    """perf_analyzer's own words for a failed run (its first error line, e.g. "failed to connect"), so that the
    summary says why without opening the model's log; the internal key redacted before the line is cut short."""
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error|fail|unable|refused|invalid", line, re.IGNORECASE)]
    return redact((errors or lines or ["no output"])[0], key)[:200]


def run(a, url: str) -> dict:
    binary = perf_analyzer()
    out = subprocess.run([binary, "--version"], capture_output=True, text=True)
    version = (out.stdout + out.stderr).strip().replace("Perf Analyzer Version ", "")
    index = perf_inputs.generate(a.repo, a.clip, a.out, a.variant, max(a.streams, 1), a.seconds, a.size)
    meta = index.pop("_meta")
    names = [m for m in (a.models.split(",") if a.models else index) if m in index]
    summary = {"version": version, "url": url, "steps": a.steps, "meta": meta, "models": {}}
    for name in names:
        spec = dict(index[name], variant=meta["variant"])
        csv_path, log_path = a.out / f"{name}.csv", a.out / f"{name}.log"
        cmd = command(binary, name, spec, url, a, csv_path)
        shown = [redact(arg, a.internal_key) for arg in cmd]  # the internal key stays out of logs and reports
        print("$", " ".join(shown), flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
            reason = "" if proc.returncode == 0 else failure_reason(proc, a.internal_key)
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {reason}"
            log_path.write_text(proc.stdout + proc.stderr)
        except subprocess.TimeoutExpired as e:
            status = f"timeout after {a.timeout:g} s"
            log_path.write_text(str(e.stdout or "") + str(e.stderr or ""))
        summary["models"][name] = {
            "batch": spec.get("batch"),
            "status": status,
            "rows": read_csv(csv_path),
            "seconds": time.monotonic() - start,
            "command": shown,
        }
        print(f"{name}: {status} ({time.monotonic() - start:.0f} s)", flush=True)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.out / "summary.md").write_text(markdown(summary))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--repo", type=Path, required=True, help="repository built by latentsync-export")
    p.add_argument("--clip", type=Path, required=True, help="a video with a face and an audio track")
    p.add_argument("--out", type=Path, required=True)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="gRPC host:port of a running server")
    where.add_argument("--start-server", action="store_true", help="start one on loopback for the run")
    p.add_argument(
        "--admin-key-file",
        default=os.environ.get("LATENTSYNC_ADMIN_KEY_FILE"),
        help="with --url: the server's admin key, from which the key of the models lipsync calls is derived "
        "(without it only lipsync is measured: the others refuse outside requests). That key is on perf_analyzer's "
        "command line while it runs (perf_analyzer takes request parameters only there): run it where other "
        "users cannot list processes, or use --start-server",
    )
    p.add_argument("--models", help="comma-separated subset (default: every model with input data)")
    p.add_argument("--variant")
    p.add_argument("--steps", type=int, default=2, help="lipsync steps (a CPU run keeps this small)")
    p.add_argument("--concurrency", default="1:2", help="perf_analyzer --concurrency-range")
    p.add_argument("--streams", type=int, default=4, help="lipsync data streams (>= the highest concurrency)")
    p.add_argument("--seconds", type=float, default=1.2, help="audio seconds per lipsync stream")
    p.add_argument("--size", type=int, default=256, help="frames resized to this longer side")
    p.add_argument("--requests", type=int, default=3, help="requests per measurement window")
    p.add_argument(
        "--stability",
        type=int,
        default=1000,
        help="perf_analyzer -s: allowed spread of 3 windows in percent (a shared CPU needs a lot; use 10-20 on a GPU)",
    )
    p.add_argument("--max-trials", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.url:
        a.internal_key = internal_key(check_admin_key(Path(a.admin_key_file).read_text())) if a.admin_key_file else ""
        summary = run(a, a.url)
    else:
        server = TritonServer(a.repo, log_path=a.out / "tritonserver.log")
        a.internal_key = server.internal_key
        try:
            summary = run(a, server.start().wait_ready(600).grpc_url)
        finally:
            server.stop()
    print(markdown(summary))
    return 0 if all(m["status"] == "ok" for m in summary["models"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
