"""Every CPU figure of RESULTS.md in one run, on loopback, with the tiny repository (random weights):

    latentsync-cpu-results --out results/cpu          # about 30 min on 2 cores

1. `latentsync-bench`: (a) serving overhead, (b) 1, 2, 4 and 8 concurrent streams, (c) per-stage cost,
   (d) peak memory; the recipe's 20 steps and guidance 1.5, one 16-frame window per stream.
2. locust (latentsync_load/locustfile.py): 4 users, one stream each, streaming a real clip through `lipsync`.
3. perf_analyzer (latentsync-perf-analyzer): every model, `lipsync` with --streaming.

The bench starts its own server; locust and perf_analyzer share one started here. Each tool's own report
lands in --out (bench.md/.json, locust_*.csv + locust.json, perf_analyzer/summary.md/.json) with
machine.json (CPU, load average, versions); RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from latentsync_serving.serve import TritonServer

from .bench import machine
from .locust_cli import LOCUSTFILE

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def run(cmd: list, log: Path) -> None:
    """Run one tool; its output goes to `log`; a failure stops everything with the log's tail."""
    print("$", " ".join(map(str, cmd)), flush=True)
    start = time.monotonic()
    with open(log, "w") as f:
        code = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  exit {code} after {time.monotonic() - start:.0f} s, log {log}", flush=True)
    if code != 0:
        sys.exit(f"{cmd[0]} failed:\n{log.read_text()[-3000:]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/cpu"))
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("LATENTSYNC_SHARED", "../shared")))
    p.add_argument("--clip", type=Path, help="video with a face (default: shared media retalking_face2.mp4)")
    p.add_argument("--skip", default="", help="comma-separated: bench, locust, perf_analyzer")
    a = p.parse_args(argv)
    clip = a.clip or a.shared / "media" / "retalking_face2.mp4"
    skip = set(filter(None, a.skip.split(",")))
    a.out.mkdir(parents=True, exist_ok=True)

    (a.out / "machine.json").write_text(json.dumps(machine(), indent=1) + "\n")
    with tempfile.TemporaryDirectory(prefix="latentsync-results-") as tmp:
        repo = Path(tmp) / "repo"
        # The serving setup of the figures: every window of 8 streams (two each with overlap) advanced by each
        # denoising step, 8 streams' frames per per-frame model call.
        run(
            [
                BIN / "latentsync-export",
                "--tiny",
                "--target",
                "cpu",
                "--out",
                repo,
                "--max-windows=16",
                "--frame-max-batch=128",
            ],
            a.out / "export.log",
        )
        if "bench" not in skip:
            run(
                [
                    BIN / "latentsync-bench",
                    "--repo",
                    repo,
                    "--video",
                    clip,
                    "--size",
                    "256",
                    "--seconds",
                    "0.64",
                    "--steps",
                    "20",
                    "--guidance",
                    "1.5",
                    "--streams",
                    "1,2,4,8",
                    "--repeats",
                    "3",
                    "--out",
                    a.out / "bench.json",
                ],
                a.out / "bench.md",
            )
        if {"locust", "perf_analyzer"} <= skip:
            return 0
        with TritonServer(repo, log_path=a.out / "tritonserver.log") as server:
            if "locust" not in skip:
                run(
                    [
                        BIN / "locust",
                        "-f",
                        LOCUSTFILE,
                        "--headless",
                        "-u",
                        "4",
                        "-r",
                        "4",
                        "--host",
                        server.grpc_url,
                        "--clip",
                        clip,
                        "--clip-seconds",
                        "1.28",
                        "--size",
                        "256",
                        "--steps",
                        "10",
                        "--streams-per-user",
                        "1",
                        "--max-run-seconds",
                        "900",
                        "--csv",
                        a.out / "locust",
                        "--summary-json",
                        a.out / "locust.json",
                        "--only-summary",
                    ],
                    a.out / "locust.log",
                )
            if "perf_analyzer" not in skip:
                run(
                    [
                        sys.executable,
                        "-m",
                        "latentsync_load.run_perf_analyzer",
                        "--repo",
                        repo,
                        "--clip",
                        clip,
                        "--out",
                        a.out / "perf_analyzer",
                        "--url",
                        server.grpc_url,
                    ],
                    a.out / "perf_analyzer.log",
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
