"""What a running Triton server costs the machine, read from /proc: CPU time and memory of tritonserver and every
Python-backend stub in its process group, and the /dev/shm bytes of its Python-backend regions.

Memory, sampled: the private anonymous memory of every process (RssAnon, /proc/PID/status: a counter, cheap to
read) plus the /dev/shm blocks of the server's regions (the shared-memory pools between tritonserver and its
stubs, each page counted once however many processes map it). That is the summed PSS (proportional set size)
less the file-backed pages (code, constant), without its cost: the kernel walks every page table for
/proc/PID/smaps_rollup, ~100 ms per sample of a loaded server on a small machine; exact PSS is read at the
quiet moments (idle, after). /dev/shm is counted in allocated blocks: a region's size is the pool's reserved
size, its blocks the pages ever touched, which tmpfs keeps until the region is removed.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STUB = "triton_python_backend_stub"


def process_group(pgid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:  # after the command: state, ppid, pgrp, ...
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return pids


def process_name(pid: int) -> str:
    """'tritonserver', or the model a stub serves (its argv: stub, MODEL_DIR/VERSION/model.py, region, pool
    sizes, parent pid, backend dir, queue size, instance name e.g. lipsync_0_1), with the instance's suffix
    where it is not the first."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    exe = os.path.basename(argv[0].decode(errors="replace"))
    if exe == STUB and len(argv) > 1:
        model = Path(argv[1].decode(errors="replace")).parents[1].name
        instance = argv[8].decode(errors="replace") if len(argv) > 8 else ""
        return instance if instance.startswith(model) and not instance.endswith("_0_0") else model
    return exe


def stub_region(pid: int) -> str | None:
    """The /dev/shm region name of a stub (its argv[2]), None for other processes."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return argv[2].decode() if len(argv) > 2 and os.path.basename(argv[0].decode()) == STUB else None


@dataclass(frozen=True)
class CpuUse:
    """A process's CPU use so far (all its threads): user and kernel seconds, minor page faults."""

    user: float = 0.0
    system: float = 0.0
    minor_faults: int = 0

    @property
    def seconds(self) -> float:
        return self.user + self.system

    def __add__(self, other: CpuUse) -> CpuUse:
        return CpuUse(self.user + other.user, self.system + other.system, self.minor_faults + other.minor_faults)

    def __sub__(self, other: CpuUse) -> CpuUse:
        return CpuUse(self.user - other.user, self.system - other.system, self.minor_faults - other.minor_faults)


def cpu_use(pid: int) -> CpuUse:
    """utime, stime and minflt of the process; zeros once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # fields 10, 14, 15 of stat(5), counted from the state (field 3) here
        return CpuUse(int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS, int(fields[7]))
    except (OSError, IndexError, ValueError):
        return CpuUse()


def anon_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def shm_bytes(regions: list[Path]) -> int:
    """Bytes of /dev/shm the regions hold (allocated blocks, not their possibly sparse size)."""
    total = 0
    for region in regions:
        try:
            total += region.stat().st_blocks * 512
        except OSError:
            continue
    return total


@dataclass
class MemorySample:
    t: float
    anon: int  # private anonymous memory summed over the server's processes
    shm: int  # /dev/shm of the server's regions
    by_process: dict[str, int] = field(default_factory=dict)  # anonymous memory of each
    pss: int | None = None  # summed PSS, where read (exact=True)

    @property
    def total(self) -> int:
        """The server's memory: anonymous + shared pools, each page once."""
        return self.anon + self.shm


class ServerProbe:
    """The processes of one server (tritonserver's process group; stubs start while models load)."""

    def __init__(self, pgid: int, shm_prefix: str | None = None):
        self.pgid, self.shm_prefix = pgid, shm_prefix
        self.pids: dict[int, str] = {}
        self.refresh()

    def refresh(self) -> None:
        self.pids = {pid: process_name(pid) for pid in process_group(self.pgid)}

    def regions(self) -> list[Path]:
        if self.shm_prefix:
            return sorted(Path("/dev/shm").glob(f"{self.shm_prefix}*"))
        names = filter(None, (stub_region(pid) for pid in self.pids))
        return [Path("/dev/shm") / n for n in names]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far per process name (instances of one model summed)."""
        return {name: use.seconds for name, use in self.cpu_use().items()}

    def cpu_use(self) -> dict[str, CpuUse]:
        """CPU use so far per process name (instances of one model summed): user, kernel, page faults."""
        out: dict[str, CpuUse] = {}
        for pid, name in self.pids.items():
            out[name] = out.get(name, CpuUse()) + cpu_use(pid)
        return out

    def memory(self, exact: bool = False) -> MemorySample:
        """The cheap sample; with `exact` also the summed PSS (slow under load: see the module's notes)."""
        by_process: dict[str, int] = {}
        for pid, name in self.pids.items():
            by_process[name] = by_process.get(name, 0) + anon_bytes(pid)
        pss = sum(pss_bytes(pid) for pid in self.pids) if exact else None
        return MemorySample(time.monotonic(), sum(by_process.values()), shm_bytes(self.regions()), by_process, pss)


class MemoryWatch:
    """Samples a probe's memory every `period` seconds in a thread; `peak` is the sample of the highest total.
    `cpu_s`: the sampling thread's own CPU time."""

    def __init__(self, probe: ServerProbe, period: float = 0.5):
        self.probe, self.period = probe, period
        self.peak: MemorySample | None = None
        self.peak_shm = 0
        self.cpu_s = 0.0  # this thread's own CPU time (the sampling's cost)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-memory", daemon=True)

    def _run(self) -> None:
        while True:
            sample = self.probe.memory()
            if self.peak is None or sample.total > self.peak.total:
                self.peak = sample
            self.peak_shm = max(self.peak_shm, sample.shm)
            self.cpu_s = time.thread_time()
            if self._stop.wait(self.period):
                return

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------- metrics
def read_metrics(url: str, prefixes: tuple[str, ...] = ("denoiser_", "lipsync_")) -> dict[tuple, float]:
    """Prometheus text of `url` as {(name, (label, value), ...): value} for the series whose name starts with
    one of `prefixes` (the project's own counters; Triton's nv_* series are many and not needed here)."""
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = tuple(sorted(tuple(kv.split("=", 1)) for kv in labels.rstrip("}").split(",") if "=" in kv))
        out[(name, tuple((k, v.strip('"')) for k, v in pairs))] = float(value)
    return out


def metric_delta(before: dict[tuple, float], after: dict[tuple, float], name: str, **labels: str) -> float:
    """Change of the summed series `name` whose labels include `labels`."""

    def total(values: dict[tuple, float]) -> float:
        return sum(v for (n, pairs), v in values.items() if n == name and set(labels.items()) <= set(pairs))

    return total(after) - total(before)
