"""Run a real Triton Inference Server on a model repository: `latentsync-serve REPO`.

The server binary comes from an NGC container (/opt/tritonserver) or, on a machine without Docker, from the
`nvidia-pytriton` wheel (Triton 2.51, Python backend only). The Python backend stub runs under *this*
interpreter's environment, so Python-backend models import whatever this venv has (torch, latentsync_core).

Admin endpoints are always locked with Triton's restricted-protocol options: the APIs in RESTRICTED_APIS answer
only requests carrying the header `ADMIN_HEADER: <key>` (gRPC metadata or HTTP header); health, metadata and
inference stay open (probes and clients need them). Without a key from the caller, each run generates one and
writes it to a file only its owner can read (`admin_key_file`). Shared-memory registration is sealed by default
(behind a key that is never stored anywhere): registering another process's /dev/shm region crashes Triton.

The key never appears on a command line: tritonserver's argv carries a marker, and a tiny LD_PRELOAD library
(ARGV_SHIM_SOURCE, compiled at start) swaps in the real value from the environment before Triton's main() runs,
then wipes it from the environment. /proc/PID/cmdline, readable by every local user, shows only the marker; a
server started without the library refuses the marker as a malformed option instead of running unlocked.

Triton cannot restrict inference per model, so the models that `lipsync` calls check a key themselves: the
server's processes get INTERNAL_KEY_ENV (derived from the admin key), `lipsync` sends it with every call, and the
others refuse requests without it (backend.ModelContext.admits). Clients reach only `lipsync` and its limits.

Stopping drains: on SIGINT/SIGTERM `latentsync-serve` first makes `lipsync` refuse new streams (a flag file
whose path the model gets in DRAIN_FILE_ENV) and waits until its open streams ended (the `lipsync_open_streams`
gauge is 0) or the drain timeout passed, then stops tritonserver. Triton itself marks the server not ready
at once on a signal, and then refuses every new request, the BLS calls of open streams included.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
import hashlib
import hmac
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

# Everything that changes or reveals the server beyond "is it up" and "run this model".
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
# What a caller may open to everyone (load tools such as perf_analyzer read configs and statistics over gRPC,
# where it cannot send headers); shared memory never.
OPENABLE_APIS = ("model-config", "statistics")
ADMIN_HEADER = "admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"  # Triton prefixes restricted gRPC headers
# Largest HTTP request body (Triton's own default is 64 MiB); a 16-frame 1080p window is ~100 MB.
DEFAULT_MAX_INPUT_BYTES = 256 << 20
# Python backend shared memory per model instance; grows in steps of the same size for video tensors.
PYTHON_SHM_BYTES = 16 << 20
NGC_HOME = Path("/opt/tritonserver")
# While the file this variable names exists, the lipsync model refuses new streams (open ones go on).
DRAIN_FILE_ENV = "LATENTSYNC_DRAIN_FILE"
# The models that `lipsync` calls answer only requests carrying this request parameter with the key that this
# variable gives their processes (internal_key): clients reach them only through lipsync's checks and limits.
INTERNAL_KEY_ENV = "LATENTSYNC_INTERNAL_KEY"
INTERNAL_KEY_PARAMETER = "latentsync_internal_key"
# How long a stop waits for open streams (a stream of the longest audio, 300 s, at real-time speed).
DEFAULT_DRAIN_TIMEOUT_S = 300
LOG_TO_STDOUT = "-"


# ---------------------------------------------------------------------------------------------------- install
def triton_home(explicit: str | os.PathLike | None = None) -> Path:
    """Folder holding bin/tritonserver and backends/: an explicit one, the NGC image's, or the pytriton wheel's."""
    if explicit or os.environ.get("TRITON_HOME"):
        return Path(explicit or os.environ["TRITON_HOME"])
    if (NGC_HOME / "bin" / "tritonserver").exists():
        return NGC_HOME
    try:
        import pytriton
    except ImportError as e:
        raise RuntimeError(
            "no Triton server found: install nvidia-pytriton (the [server] extra) "
            "or set TRITON_HOME to a folder with bin/tritonserver"
        ) from e
    return Path(pytriton.__file__).parent / "tritonserver"


def _pytriton_libs(home: Path) -> list[Path]:
    """Bundled shared libraries of the pytriton wheel (its RPATHs are relative to site-packages)."""
    libs = home.parents[1] / "nvidia_pytriton.libs"
    return [libs] if libs.is_dir() else []


def prepare_backends(home: Path, work_dir: Path) -> Path:
    """A backend folder whose python backend has the stub for this Python version.

    The NGC image already has it; the wheel keeps one stub per Python version aside, so link its files into a
    writable folder of our own and leave site-packages untouched.
    """
    stubs = home / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
    if not stubs.is_dir():
        return home / "backends"
    backends = work_dir / "backends"
    for src in (home / "backends").iterdir():
        if src.name != "python":
            (backends / src.name).parent.mkdir(parents=True, exist_ok=True)
            (backends / src.name).symlink_to(src)
    python = backends / "python"
    python.mkdir(parents=True)
    for src in (home / "backends" / "python").iterdir():
        if src.is_file():
            (python / src.name).symlink_to(src)
    (python / "triton_python_backend_stub").symlink_to(stubs / "triton_python_backend_stub")
    return backends


@functools.cache
def supported_options(binary: str, ld_library_path: str = "") -> frozenset[str]:
    """Long options this tritonserver build knows (e.g. --http-max-input-size is newer than 2.51)."""
    env = dict(os.environ, LD_LIBRARY_PATH=ld_library_path)
    out = subprocess.run([binary, "--help"], capture_output=True, text=True, env=env, timeout=30)
    return frozenset(w.split("<")[0].strip() for w in (out.stdout + out.stderr).split() if w.startswith("--"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on the port (closed connections in TIME_WAIT do not count, as for Triton's own bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


# ---------------------------------------------------------------------------------------------------- secrets
SECRET_ENV_PREFIX = "LATENTSYNC_SECRET_"
ARGV_SHIM_SOURCE = r"""
/* LD_PRELOAD library for tritonserver: before main() runs, replace every "{LATENTSYNC_SECRET_<NAME>}" marker in
   argv by the value of the environment variable LATENTSYNC_SECRET_<NAME>, then wipe and unset those variables.
   main() parses the real option; /proc/PID/cmdline (the original argv memory) still shows the marker. glibc
   passes (argc, argv, envp) to constructors, and main() gets the same argv array. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PREFIX "LATENTSYNC_SECRET_"

static const char *lookup(char **envp, const char *name, size_t len) {
  for (; *envp; envp++)
    if (strncmp(*envp, name, len) == 0 && (*envp)[len] == '=') return *envp + len + 1;
  return NULL;
}

/* A copy of arg with its markers filled, or NULL if it has none or one has no variable (left as it is). */
static char *fill(const char *arg, char **envp) {
  const char *at = strstr(arg, "{" PREFIX), *end = at ? strchr(at, '}') : NULL;
  const char *value = end ? lookup(envp, at + 1, (size_t)(end - at - 1)) : NULL;
  if (!value) return NULL;
  char *rest = fill(end + 1, envp);
  const char *tail = rest ? rest : end + 1;
  size_t size = (size_t)(at - arg) + strlen(value) + strlen(tail) + 1;
  char *out = malloc(size);
  if (out) snprintf(out, size, "%.*s%s%s", (int)(at - arg), arg, value, tail);
  free(rest);
  return out;
}

__attribute__((constructor)) static void fill_argv(int argc, char **argv, char **envp) {
  char names[16][64];
  int n = 0;
  if (!envp) return;
  for (int i = 1; i < argc; i++) {
    char *filled = fill(argv[i], envp);
    if (filled) argv[i] = filled;
  }
  for (char **e = envp; *e; e++) {
    char *eq = strchr(*e, '=');
    if (strncmp(*e, PREFIX, strlen(PREFIX)) != 0 || !eq) continue;
    memset(eq + 1, 0, strlen(eq + 1));          /* also gone from /proc/PID/environ */
    if (n < 16 && eq - *e < 64) {
      memcpy(names[n], *e, (size_t)(eq - *e));
      names[n++][eq - *e] = 0;
    }
  }
  for (int i = 0; i < n; i++) unsetenv(names[i]);   /* backend stubs and their children never see them */
}
"""

HEAP_TRIM_SOURCE = r"""
/* Built into the same LD_PRELOAD library, so it runs in tritonserver and in every backend stub (they inherit
   LD_PRELOAD): a thread that gives the free pages inside glibc's malloc arenas back to the system every
   LATENTSYNC_HEAP_TRIM_MS milliseconds (default 2000, 0 = never) with malloc_trim(0). Freed gRPC message slices
   and frame buffers otherwise stay in the arenas, fragmented: ~250 MB in tritonserver and ~100 MB per stub after
   a few 1080p streams (docs/OPERATIONS.md "Memory"). Only a process that was idle over the last period (under
   a tenth of a core) is trimmed: a busy one reuses those pages at once, and trimming it made every page it
   touched fault in again (the served UNet loop ran measurably slower than in-process). A trim walks the free
   chunks: well under 1 ms when idle. */
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static unsigned trim_ms = 2000;

static double cpu_seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void *trim_heap(void *unused) {
  double last = cpu_seconds(), now;
  (void)unused;
  for (;;) {
    usleep(trim_ms * 1000);
    now = cpu_seconds();
    if (now - last < 1e-4 * trim_ms) malloc_trim(0); /* idle: under 0.1 core over the period */
    last = cpu_seconds();
  }
  return NULL;
}

/* In tritonserver only: blocks up to FRAME_BLOCK_BYTES come from the arenas, which keep up to HEAP_KEEP_BYTES free
   at their top while busy, instead of a new mapping per block above the environment's 4 MiB threshold. Every
   gRPC message of frames (25 MB for four 1080p frames) was otherwise received into fresh pages that the kernel
   faulted in and zeroed: a quarter of tritonserver's CPU in the stand-in bench. The trim above gives the pages
   back once the server is idle. Left alone where the environment chose (jemalloc preloaded, a trim threshold,
   another mmap threshold): the same rule as backend.reuse_frame_memory, which the face detector's stub applies to
   itself. The values come from serve.heap_defines(). */
#include <errno.h>
#if !defined(FRAME_BLOCK_BYTES) || !defined(HEAP_KEEP_BYTES) || !defined(DEFAULT_MMAP_THRESHOLD)
#error "build with serve.build_argv_shim: it defines FRAME_BLOCK_BYTES, HEAP_KEEP_BYTES, DEFAULT_MMAP_THRESHOLD"
#endif

__attribute__((constructor)) static void server_frame_memory(void) {
  const char *mmap_env = getenv("MALLOC_MMAP_THRESHOLD_"), *preload = getenv("LD_PRELOAD");
  if (strcmp(program_invocation_short_name, "tritonserver") != 0) return;
  if (getenv("MALLOC_TRIM_THRESHOLD_") || (preload && strstr(preload, "jemalloc"))) return;
  if (mmap_env && *mmap_env && strcmp(mmap_env, DEFAULT_MMAP_THRESHOLD) != 0) return;
  mallopt(M_MMAP_THRESHOLD, FRAME_BLOCK_BYTES);
  mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES);
}

__attribute__((constructor)) static void start_heap_trim(void) {
  const char *ms = getenv("LATENTSYNC_HEAP_TRIM_MS");
  pthread_t thread;
  pthread_attr_t attr;
  if (ms) trim_ms = (unsigned)strtoul(ms, NULL, 10);
  if (!trim_ms) return;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  pthread_attr_setstacksize(&attr, 64 << 10);
  pthread_create(&thread, &attr, trim_heap, NULL);
  pthread_attr_destroy(&attr);
}
"""


def heap_defines() -> list[str]:
    """The C library's allocator constants, the ones the Python side uses (written once)."""
    return [
        "-D_GNU_SOURCE",  # program_invocation_short_name
        f"-DFRAME_BLOCK_BYTES={FRAME_BLOCK_BYTES}",
        f"-DHEAP_KEEP_BYTES={HEAP_KEEP_BYTES}",
        f'-DDEFAULT_MMAP_THRESHOLD="{MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"]}"',
    ]


def build_argv_shim(out: str | os.PathLike) -> Path:
    """Compile ARGV_SHIM_SOURCE and HEAP_TRIM_SOURCE into the shared library `out` with the C compiler ($CC, cc,
    gcc or clang)."""
    out = Path(out)
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        raise RuntimeError(
            "latentsync-serve needs a C compiler (cc, gcc or clang) to build the library that keeps "
            "the admin key off the process list, or env LATENTSYNC_ARGV_SHIM naming a prebuilt one"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        source, built = Path(tmp) / "argv_secret.c", Path(tmp) / "argv_secret.so"
        source.write_text(ARGV_SHIM_SOURCE + HEAP_TRIM_SOURCE)
        r = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-pthread", *heap_defines(), "-o", str(built), str(source)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise RuntimeError(f"building the argv library with {compiler} failed:\n{r.stderr}")
        os.replace(built, out)
    return out


def secret_marker(name: str) -> str:
    """What tritonserver's command line shows in place of the secret LATENTSYNC_SECRET_<name>."""
    return "{" + SECRET_ENV_PREFIX + name + "}"


def internal_key(admin_key: str) -> str:
    """The key of the internal models (INTERNAL_KEY_ENV), derived from the admin key: whoever holds the admin key
    can also benchmark a model alone (perf_analyzer --request-parameter), and the stubs' environment, which
    carries it, does not reveal the admin key."""
    return hmac.new(admin_key.encode(), b"latentsync internal models", hashlib.sha256).hexdigest()


def check_admin_key(key: str) -> str:
    key = key.strip()
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError("the admin key must be non-empty printable text without spaces (e.g. openssl rand -hex 32)")
    return key


def key_folder() -> Path:
    """Where generated admin keys go: $XDG_RUNTIME_DIR/latentsync, else <tmp>/latentsync-<uid>; a folder only its
    owner can enter (an existing one that is a link, someone else's or open to others is refused)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = (
        Path(runtime) / "latentsync"
        if runtime and Path(runtime).is_dir()
        else Path(tempfile.gettempdir()) / f"latentsync-{os.getuid()}"
    )
    folder.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{folder}: not a private folder of this user (mode {st.st_mode & 0o777:o}); remove it")
    return folder


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` with mode 0600 (a new file renamed into place, never through a link)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by a killed run with this pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------- flags
def server_args(
    model_repository: str | os.PathLike,
    *,
    grpc_port: int,
    http_port: int,
    metrics_port: int,
    address: str = "127.0.0.1",
    model_control_mode: str = "none",
    load_models: Sequence[str] = (),
    max_input_bytes: int | None = DEFAULT_MAX_INPUT_BYTES,
    exit_timeout_s: int = 30,
    options: frozenset[str] = frozenset(),
    shm_prefix: str | None = None,
    open_apis: Sequence[str] = (),
    allow_shared_memory: bool = False,
    server_id: str | None = None,
) -> list[str]:
    """tritonserver command-line flags (without the binary and backend directory).

    The restrictions carry secret markers: the admin APIs (RESTRICTED_APIS less `open_apis`) take the key of
    LATENTSYNC_SECRET_ADMIN, shared memory that one too with `allow_shared_memory`, else the never-stored
    LATENTSYNC_SECRET_SEALED (see `secret_env`). Each secret starts with the ':' Triton's option format needs,
    so an unfilled marker is a malformed option and tritonserver refuses to start.
    `shm_prefix` names the Python backend's /dev/shm regions, so the regions of one server can be found and
    removed after it was killed (a SIGKILLed server leaves them behind, 16+ MB per model instance)."""
    if model_control_mode not in ("none", "explicit"):
        raise ValueError("model_control_mode must be 'none' (load everything, fixed) or 'explicit'")
    args = [
        f"--model-repository={Path(model_repository).resolve()}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        f"--model-control-mode={model_control_mode}",
        "--strict-readiness=true",  # /v2/health/ready only once every model loaded
        f"--exit-timeout-secs={exit_timeout_s}",  # drain in-flight windows (and idle HTTP keep-alives)
        f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_BYTES}",
        # gRPC request/response objects are not kept for reuse: a kept one holds the buffers of the largest
        # message it ever held (a whole window of frames, ~100 MB at 1080p; a 256 MiB request left 256 MiB in
        # tritonserver for good, measured on 2.51); freeing them costs page faults, not copies
        "--grpc-infer-allocation-pool-size=0",
    ]
    if shm_prefix:
        args.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    if server_id:  # /v2 names it: a readiness check knows its own server from another on the same port
        args.append(f"--id={server_id}")
    if model_control_mode == "explicit":
        args += [f"--load-model={m}" for m in (load_models or ["*"])]
    if not set(open_apis) <= set(OPENABLE_APIS):
        raise ValueError(f"only {', '.join(OPENABLE_APIS)} may be open to everyone, not {', '.join(open_apis)}")
    groups = {
        "ADMIN": [a for a in RESTRICTED_APIS if a not in open_apis and (allow_shared_memory or a != "shared-memory")],
        "SEALED": [] if allow_shared_memory else ["shared-memory"],
    }
    for secret, apis in groups.items():
        if apis:
            args += [
                f"--grpc-restricted-protocol={','.join(apis)}{secret_marker(secret)}",
                f"--http-restricted-api={','.join(apis)}{secret_marker(secret)}",
            ]
    if max_input_bytes and "--http-max-input-size" in options:
        args.append(f"--http-max-input-size={max_input_bytes}")
    return args


def secret_env(admin_key: str) -> dict[str, str]:
    """The values of the markers in `server_args`: the admin key, and a random one sealing shared memory."""
    return {
        f"{SECRET_ENV_PREFIX}ADMIN": f":{ADMIN_HEADER}={admin_key}",
        f"{SECRET_ENV_PREFIX}SEALED": f":{ADMIN_HEADER}={secrets.token_hex(32)}",
    }


# glibc malloc settings of every server process (allocator_env). Blocks from the mmap threshold up are mapped on
# their own and unmapped when freed: a 1080p frame (6.2 MB) and a request's frames go back to the system at once.
# Smaller blocks (the per-face tensors of alignment and paste-back, up to ~4 MB at 512 px) come from the arenas,
# which keep the top pad when they shrink: reused pages, not fresh ones that fault in on every frame (a 1 MB
# threshold without a pad cost ~3 ms of page faults per 512 px align + paste, +35 %; docs/PERFORMANCE.md). The
# preload library's malloc_trim every 2 s gives the arenas' other free pages back (LATENTSYNC_HEAP_TRIM_MS).
MALLOC_SETTINGS = {"MALLOC_ARENA_MAX": 2, "MALLOC_MMAP_THRESHOLD_": 4 << 20, "MALLOC_TOP_PAD_": 16 << 20}
# Where whole frames arrive (tritonserver, the face detector's stub), larger blocks come from the arenas instead
# (the preload library's server_frame_memory, backend.reuse_frame_memory):
FRAME_BLOCK_BYTES = 32 << 20  # glibc's largest mmap threshold; a request of four 1080p frames (25 MB) is under it
HEAP_KEEP_BYTES = 64 << 20  # free memory an arena keeps at its top while busy


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with MALLOC_SETTINGS, unless it already chose (MALLOC_ARENA_MAX, or jemalloc preloaded). Fixed values
    also stop glibc's dynamic threshold, which rises to the size of each mapped block freed (up to 32 MB): a
    stream's 6 MB frames and 25 MB requests would then come from the arenas and stay there until trimmed (peak
    per 1080p stream: ~400 -> ~300 MB, RESULTS.md)."""
    if "MALLOC_ARENA_MAX" not in env and "jemalloc" not in env.get("LD_PRELOAD", ""):
        for name, value in MALLOC_SETTINGS.items():
            env.setdefault(name, str(value))
    return env


# ---------------------------------------------------------------------------------------------------- server
class TritonServer:
    """A tritonserver child process on loopback; a context manager that always stops it.

    `grpc_url` / `http_url` are `host:port` as tritonclient takes them; `metrics_url` is the full Prometheus URL.
    Admin APIs need `admin_key` (`grpc_admin_headers` for tritonclient.grpc): the caller's, or one generated for
    this run and written to `admin_key_file` (default <key_folder()>/admin-key.<grpc port>, removed by stop()).
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        extra_args: Sequence[str] = (),
        log_path: str | os.PathLike | None = None,
        *,
        admin_key: str | None = None,
        admin_key_file: str | os.PathLike | None = None,
        open_apis: Sequence[str] = (),
        allow_shared_memory: bool = False,
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        address: str = "127.0.0.1",
        max_input_bytes: int | None = DEFAULT_MAX_INPUT_BYTES,
        exit_timeout_s: int = 30,
        home: str | os.PathLike | None = None,
    ):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} is not a folder")
        self.home = triton_home(home)
        self.host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
        ports = [p if p is not None else 0 for p in (grpc_port, http_port, metrics_port)]
        while 0 in ports:  # automatic ports: free now and distinct from each other
            p = free_port(self.host)
            if p not in ports:
                ports[ports.index(0)] = p
        self.grpc_port, self.http_port, self.metrics_port = ports
        self.address = address
        self.admin_key = check_admin_key(admin_key) if admin_key else secrets.token_hex(32)
        self.admin_key_file = None if admin_key else Path(admin_key_file or key_folder() / f"admin-key.{ports[0]}")
        self.open_apis, self.allow_shared_memory = tuple(open_apis), allow_shared_memory
        self.model_control_mode, self.load_models = model_control_mode, tuple(load_models)
        self.max_input_bytes, self.exit_timeout_s = max_input_bytes, exit_timeout_s
        self.extra_args = tuple(extra_args)
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._key_lock: int | None = None  # a file descriptor holding the lock beside the admin key file
        self._work_dir: Path | None = None
        self.shm_prefix = f"latentsync_{uuid.uuid4().hex[:12]}_"  # this server's /dev/shm regions
        self.server_id = _given_id(self.extra_args) or f"latentsync-{uuid.uuid4().hex[:12]}"  # /v2's name for it

    grpc_url = property(lambda self: f"{self.host}:{self.grpc_port}")
    http_url = property(lambda self: f"{self.host}:{self.http_port}")
    metrics_url = property(lambda self: f"http://{self.host}:{self.metrics_port}/metrics")
    pid = property(lambda self: self._proc.pid if self._proc else None)
    grpc_admin_headers = property(lambda self: {GRPC_ADMIN_HEADER: self.admin_key})
    internal_key = property(lambda self: internal_key(self.admin_key))
    # request parameters that let a client call an internal model directly (tests, benchmarks of one model)
    internal_parameters = property(lambda self: {INTERNAL_KEY_PARAMETER: self.internal_key})

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()  # keys reach the server only through secret_env()
            if not k.startswith(("LATENTSYNC_ADMIN_KEY", SECRET_ENV_PREFIX, INTERNAL_KEY_ENV))
        }
        libs = [str(p) for p in _pytriton_libs(self.home)] + [sysconfig.get_config_var("LIBDIR") or ""]
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, libs + [env.get("LD_LIBRARY_PATH", "")]))
        # The stub's embedded interpreter finds its prefix through `python3` on PATH: put this venv's bin/
        # first, unresolved (a venv is recognised by the pyvenv.cfg beside bin/, not by the real binary).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        # glibc gives every thread that allocates its own arena and rarely returns their memory: tritonserver
        # and the stubs (gRPC, one thread per stream) grew ~500 MB under 8 streams before levelling off, vs
        # ~180 MB with two arenas (docs/OPERATIONS.md). Unless the caller chose (e.g. LD_PRELOAD=jemalloc).
        return allocator_env(env)

    def command(self) -> list[str]:
        env = self._env()
        binary = str(self.home / "bin" / "tritonserver")
        options = supported_options(binary, env["LD_LIBRARY_PATH"])
        return [
            binary,
            f"--backend-directory={prepare_backends(self.home, self._work_dir)}",
            *server_args(
                self.model_repository,
                grpc_port=self.grpc_port,
                http_port=self.http_port,
                metrics_port=self.metrics_port,
                address=self.address,
                model_control_mode=self.model_control_mode,
                load_models=self.load_models,
                max_input_bytes=self.max_input_bytes,
                exit_timeout_s=self.exit_timeout_s,
                options=options,
                shm_prefix=self.shm_prefix,
                open_apis=self.open_apis,
                allow_shared_memory=self.allow_shared_memory,
                server_id=self.server_id,
            ),
            *self.extra_args,
        ]

    def _launch_env(self) -> dict[str, str]:
        """The server's environment: the secrets for the argv markers, and the library that fills them."""
        env = self._env()
        shim = os.environ.get("LATENTSYNC_ARGV_SHIM") or build_argv_shim(self._work_dir / "argv_secret.so")
        env["LD_PRELOAD"] = " ".join(filter(None, [str(shim), env.get("LD_PRELOAD", "")]))
        env[DRAIN_FILE_ENV] = str(self.drain_file)
        env[INTERNAL_KEY_ENV] = self.internal_key
        return env | secret_env(self.admin_key)

    def _prepare(self) -> list[str]:
        self._work_dir = Path(tempfile.mkdtemp(prefix="latentsync-triton-"))
        if self.admin_key_file is not None:
            write_private(self.admin_key_file, self.admin_key)
        return self.command()

    def start(self) -> TritonServer:
        if self._proc is not None:
            raise RuntimeError("server already started")
        try:
            return self._start()
        except BaseException:
            self._release_key_lock()
            raise

    def _start(self) -> TritonServer:
        # Before anything is written (the admin key file is named by the gRPC port): a second server on a port in
        # use would overwrite a running server's key file, then remove it when it failed to bind. Triton opens its
        # ports only once every model loaded (minutes), so a server still loading holds a lock beside its key file.
        if self.admin_key_file is not None:
            self._key_lock = _lock(self.admin_key_file.with_name(self.admin_key_file.name + ".lock"))
            if self._key_lock is None:
                raise PortInUseError(
                    f"another latentsync-serve is starting or serving with gRPC port {self.grpc_port} "
                    f"({self.admin_key_file}): stop it, or choose --grpc-port/--http-port/--metrics-port"
                )
        busy = [
            port
            for port in (self.grpc_port, self.http_port, self.metrics_port)
            if not port_is_free(port, self._bind_host)
        ]
        if busy:
            raise PortInUseError(
                f"port{'s' if len(busy) > 1 else ''} {', '.join(map(str, busy))} on {self.address} already in use "
                "(another latentsync-serve or Triton?): stop it, or choose --grpc-port/--http-port/--metrics-port"
            )
        if self.log_path is None:  # kept after stop() for post-mortems
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        to_stdout = str(self.log_path) == LOG_TO_STDOUT
        if not to_stdout:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self._prepare()
        sys.stdout.flush()
        with nullcontext() if to_stdout else open(self.log_path, "ab") as log:
            # Own process group: stop() can signal the server and its backend stubs, nothing else.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._launch_env(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs (or was never started)."""
        return self._proc.poll() if self._proc else None

    _bind_host = property(lambda self: "0.0.0.0" if self.address in ("0.0.0.0", "::") else self.address)

    def is_ready(self) -> bool:
        """Every model loaded (/v2/health/ready) and every endpoint listening: tritonserver opens its endpoints
        one after another, so a ready answer over HTTP alone does not mean the gRPC and metrics ports listen yet
        (a client, or /metrics read at once, then found the port closed). And this server answered (/v2 names
        it), not another one listening on the port."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                if r.status != 200:
                    return False
            with urllib.request.urlopen(f"http://{self.http_url}/v2", timeout=2) as r:
                if json.loads(r.read()).get("name") != self.server_id:
                    return False
            for port in (self.grpc_port, self.metrics_port):
                socket.create_connection((self.host, port), timeout=2).close()
            return True
        except (urllib.error.URLError, OSError, ValueError):  # ValueError: /v2 answered something else than JSON
            return False

    def wait_ready(self, timeout: float = 120.0) -> TritonServer:
        """Block until /v2/health/ready answers 200; raise with the log tail if the server dies or times out."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.poll() is not None or self._proc is None:
                raise RuntimeError(f"tritonserver exited ({self.poll()}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except (OSError, AttributeError):  # no file (or the log went to stdout)
            return ""

    # ------------------------------------------------------------------------------------------ drain
    drain_file = property(lambda self: self._work_dir / "draining" if self._work_dir else None)

    def open_streams(self) -> float | None:
        """The `lipsync_open_streams` gauge summed over instances, None if no model exports it (OSError if the
        metrics endpoint does not answer)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            text = r.read().decode()
        values = [
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("lipsync_open_streams{")
        ]
        return sum(values) if values else None

    def drain(self, timeout: float, stop_now=lambda: False) -> bool:
        """Make `lipsync` refuse new streams, then wait until its open streams ended, `timeout` seconds passed,
        `stop_now()` or the server died. True if no stream was left open."""
        self.drain_file.touch()
        deadline = time.monotonic() + timeout
        while self.poll() is None and not stop_now():
            try:
                if not self.open_streams():
                    return True
            except OSError:  # a busy server may answer late: ask again
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return False

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGINT (Triton drains and unloads), then SIGKILL to the whole process group after `timeout`
        (default: Triton's own exit timeout plus a margin). Returns the server's exit code."""
        timeout = self.exit_timeout_s + 10 if timeout is None else timeout
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(proc.pid)  # stubs that outlived the server, or the server itself
            code = proc.wait()
            for region in self.shm_regions():  # left behind when the server or a stub was killed
                region.unlink(missing_ok=True)
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        if self.admin_key_file is not None and (_read_or_none(self.admin_key_file) or "").strip() == self.admin_key:
            self.admin_key_file.unlink()  # this run's key dies with it (another run's, written since, stays)
        self._release_key_lock()
        return code

    def _release_key_lock(self) -> None:
        if self._key_lock is not None:
            os.close(self._key_lock)  # the lock goes with the descriptor
            self._key_lock = None

    def shm_regions(self) -> list[Path]:
        """The Python backend's shared-memory regions of this server (in /dev/shm)."""
        return sorted(Path("/dev/shm").glob(f"{self.shm_prefix}*"))

    def __enter__(self) -> TritonServer:
        if self._proc is not None:  # `with server.start():` manages an already started one
            return self
        try:
            return self.start().wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        if getattr(self, "_proc", None) is not None:
            try:
                self.stop(timeout=5)
            except Exception:  # interpreter shutdown: the parent-death signal still applies
                pass


class PortInUseError(OSError):
    """A port the server would listen on is taken: nothing was started or written."""


def _given_id(args: Sequence[str]) -> str | None:
    """The `--id` among tritonserver arguments passed through (the last one counts, as for tritonserver)."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith("--id="):
            found = arg.split("=", 1)[1]
        elif arg == "--id" and i + 1 < len(args):
            found = args[i + 1]
    return found


def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive flock on `path` (created 0600), or None if another process holds it.
    The kernel drops the lock when the descriptor is closed or its process dies: a killed server leaves no lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _read_or_none(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the parent dies (even by SIGKILL), so no server is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------------- cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="latentsync-serve",
        description=__doc__.split("\n\n")[0],
        epilog="Flags after a lone -- go to tritonserver unchanged.",
    )
    p.add_argument("repository", help="model repository folder")
    p.add_argument("--grpc-port", type=int, default=8001, help="0: any free port (also --http/--metrics-port)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--address", default="127.0.0.1", help="bind address (0.0.0.0 inside a container)")
    p.add_argument(
        "--admin-key-file",
        default=os.environ.get("LATENTSYNC_ADMIN_KEY_FILE"),
        help=f"file holding the key that header '{ADMIN_HEADER}: KEY' must carry for "
        f"{', '.join(RESTRICTED_APIS)} (default: env LATENTSYNC_ADMIN_KEY_FILE, env "
        "LATENTSYNC_ADMIN_KEY, else a key generated for this run, written to a file only you can "
        "read: its path is printed)",
    )
    p.add_argument("--admin-key", help=argparse.SUPPRESS)  # refused: other users would see it in `ps`
    p.add_argument(
        "--open-api",
        action="append",
        choices=OPENABLE_APIS,
        default=[],
        help="open this admin API to everyone (perf_analyzer reads configs and statistics over gRPC, "
        "where it sends no headers)",
    )
    p.add_argument(
        "--allow-shared-memory",
        action="store_true",
        help="allow shared-memory registration with the admin key (default: refused even with it; "
        "a key holder could crash the server through another process's /dev/shm region)",
    )
    p.add_argument(
        "--model-control-mode",
        choices=("none", "explicit"),
        default="none",
        help="none: load all models at start, repository fixed (production); "
        "explicit: load/unload through the (restricted) repository API",
    )
    p.add_argument("--load-model", action="append", default=[], help="with explicit mode (default: all)")
    p.add_argument(
        "--max-input-bytes",
        type=int,
        default=DEFAULT_MAX_INPUT_BYTES,
        help="largest HTTP request body, where this Triton build supports it",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        help="on SIGINT/SIGTERM, new streams are refused and open ones get this long to finish before "
        "tritonserver is stopped (a second signal stops at once)",
    )
    p.add_argument(
        "--exit-timeout-secs",
        type=int,
        default=30,
        help="tritonserver's own wait for in-flight requests once it is stopped",
    )
    p.add_argument(
        "--log", help="server log file, '-' for this process's stdout (default: a temporary file, printed at start)"
    )
    p.add_argument("--triton-home", help="folder with bin/tritonserver (default: /opt/tritonserver or pytriton)")
    p.add_argument(
        "--exit-when-ready",
        action="store_true",
        help="start, wait until every model loaded (builds engine caches), stop; exit 0 if it was ready",
    )
    p.add_argument("--ready-timeout", type=float, default=3600.0, help="seconds, with --exit-when-ready")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a, extra = p.parse_args(argv[:cut]), argv[cut + 1 :]
    if a.admin_key is not None:
        p.error(
            "--admin-key puts the key on the command line, where every local user sees it (ps): "
            "use --admin-key-file FILE or env LATENTSYNC_ADMIN_KEY"
        )
    try:
        key = Path(a.admin_key_file).read_text() if a.admin_key_file else os.environ.get("LATENTSYNC_ADMIN_KEY")
        key = check_admin_key(key) if key is not None else None
    except (OSError, ValueError) as e:
        p.error(f"admin key ({a.admin_key_file or 'LATENTSYNC_ADMIN_KEY'}): {e}")

    ports = [port or None for port in (a.grpc_port, a.http_port, a.metrics_port)]  # 0 -> automatic
    try:
        return _serve(a, ports, extra, key)
    except (FileNotFoundError, PortInUseError) as e:  # nothing started: a one-line error, as for bad options
        print(f"latentsync-serve: error: {e}", file=sys.stderr)
        return 2


def _serve(a: argparse.Namespace, ports: list[int | None], extra: list[str], key: str | None) -> int:
    server = TritonServer(
        a.repository,
        *ports,
        extra,
        a.log,
        admin_key=key,
        open_apis=a.open_api,
        allow_shared_memory=a.allow_shared_memory,
        model_control_mode=a.model_control_mode,
        load_models=a.load_model,
        address=a.address,
        max_input_bytes=a.max_input_bytes,
        exit_timeout_s=a.exit_timeout_secs,
        home=a.triton_home,
    )
    if a.exit_when_ready:
        with server.start():
            try:
                server.wait_ready(a.ready_timeout)
            except (RuntimeError, TimeoutError) as e:
                print(e, file=sys.stderr)
                return 1
        print(f"ready, stopped: {server.model_repository}", flush=True)
        return 0
    return serve_foreground(server, a.drain_timeout_s)


def serve_foreground(server: TritonServer, drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> int:
    """Run until SIGINT/SIGTERM or until the server dies; on a signal drain the open streams (a second signal
    cuts the drain short), then stop the server. Exit code: the server's (0 after a clean stop)."""
    signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: signals.append(s))
    server.start()
    log = "stdout" if str(server.log_path) == LOG_TO_STDOUT else server.log_path
    print(f"tritonserver pid {server.pid}, log {log}", flush=True)
    key = f"in {server.admin_key_file} (generated for this run)" if server.admin_key_file else "you gave"
    print(f"admin APIs need header '{ADMIN_HEADER}' (gRPC: '{GRPC_ADMIN_HEADER}') with the key {key}", flush=True)
    try:
        while not signals and not server.is_ready() and server.poll() is None:
            time.sleep(0.2)
        ready = not signals and server.poll() is None
        if ready:
            print(f"ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}", flush=True)
        while not signals and server.poll() is None:
            time.sleep(0.5)
        died = server.poll()
        if died is not None:
            print(f"tritonserver exited with {died}:\n{server.log_tail()}", file=sys.stderr)
            return died or 1
        if ready:
            print(
                f"draining: new streams are refused, open streams get up to {drain_timeout_s:g} s to finish "
                "(signal again to stop now)",
                flush=True,
            )
            drained = server.drain(drain_timeout_s, stop_now=lambda: len(signals) > 1)
            print("drained" if drained else "stopping with streams still open", flush=True)
        code = server.stop()
        return 0 if code == 0 else 1
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
