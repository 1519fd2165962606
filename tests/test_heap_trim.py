"""The heap trimmer that latentsync-serve preloads into tritonserver and every stub (serve.HEAP_TRIM_SOURCE): it
gives free arena pages back only while a process is idle, never in the middle of its work (a trim there made the
served UNet loop fault its pages in again). Run in a plain child process under the real compiled library."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latentsync_serving.serve import build_argv_shim

PERIOD_MS = 200
BLOCKS = 256  # freed blocks of 1 MiB, under the mmap threshold: they live in the main arena

CHILD = f"""
import ctypes, json, time
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

blocks = [libc.malloc(1 << 20) for _ in range(2 * {BLOCKS})]
for b in blocks:
    ctypes.memset(b, 1, 1 << 20)  # resident
full = rss_mb()
for b in blocks[::2]:  # holes between kept blocks: free() cannot give them back, only malloc_trim can
    libc.free(b)
freed = rss_mb()
end = time.process_time() + 6 * {PERIOD_MS} / 1000  # busy: a core for six trim periods
while time.process_time() < end:
    pass
busy = rss_mb()
time.sleep(6 * {PERIOD_MS} / 1000)  # idle for as long
idle = rss_mb()
print(json.dumps(dict(full=full, freed=freed, busy=busy, idle=idle)))
"""


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return build_argv_shim(tmp_path_factory.mktemp("shim") / "argv_secret.so")


def run_child(library, trim_ms: int) -> dict:
    env = dict(
        os.environ,
        LD_PRELOAD=str(library),
        LATENTSYNC_HEAP_TRIM_MS=str(trim_ms),
        MALLOC_ARENA_MAX="2",
        MALLOC_MMAP_THRESHOLD_=str(4 << 20),
        MALLOC_TOP_PAD_=str(16 << 20),
    )
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_free_pages_return_only_once_the_process_is_idle(library):
    mb = run_child(library, PERIOD_MS)
    assert mb["full"] - mb["freed"] < 0.1 * BLOCKS, mb  # freed, but still resident in the arena
    assert mb["full"] - mb["busy"] < 0.1 * BLOCKS, mb  # not trimmed while it used a core
    assert mb["full"] - mb["idle"] > 0.9 * BLOCKS, mb  # trimmed once idle


def test_heap_trim_ms_zero_turns_the_trimmer_off(library):
    mb = run_child(library, 0)
    assert mb["full"] - mb["idle"] < 0.1 * BLOCKS, mb


REUSE_CHILD = """
import ctypes, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 25 << 20  # a gRPC message of four 1080p frames

def message():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)  # received into it
    return block

kept = message()  # the arena's first use
libc.free(message())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    libc.free(message())
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults_per_message(library, program: Path | None, **env) -> float:
    """Page faults per 25 MB message received and freed, under the library and the environment latentsync-serve
    gives tritonserver, in this interpreter started as `program` (a link named tritonserver: the library checks the
    program's name; stdlib only, as a link may not find the venv) or as itself."""
    served = {"LD_PRELOAD": str(library), "LATENTSYNC_HEAP_TRIM_MS": "0", "MALLOC_ARENA_MAX": "2"}
    base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env = base | served | {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)} | env
    command = [str(program or sys.executable), "-c", REUSE_CHILD]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return float(out.stdout)


def test_tritonserver_receives_frames_into_reused_memory(library, tmp_path):
    """In tritonserver, messages of frames come from the arenas' pages instead of a fresh mapping each, which the
    kernel faults in and zeroes (a quarter of its CPU in the stand-in bench); other processes, and a tritonserver
    whose environment chose the allocator's settings, keep them."""
    tritonserver = tmp_path / "tritonserver"
    tritonserver.symlink_to(sys.executable)
    mapped_anew = 10  # 25 MB: ~6,400 pages, or 13 huge ones where transparent huge pages are always on
    assert faults_per_message(library, tritonserver) < 1
    assert faults_per_message(library, None) >= mapped_anew
    assert faults_per_message(library, tritonserver, MALLOC_TRIM_THRESHOLD_=str(1 << 20)) >= mapped_anew
    assert faults_per_message(library, tritonserver, MALLOC_MMAP_THRESHOLD_=str(1 << 20)) >= mapped_anew
