"""Run a real Triton Inference Server on a model repository: `latentsync-serve REPO`.

The server binary comes from an NGC container (/opt/tritonserver) or, on a machine without Docker, from the
`nvidia-pytriton` wheel (Triton 2.51, Python backend only). The Python backend stub runs under *this*
interpreter's environment, so Python-backend models import whatever this venv has (torch, latentsync_core).

Admin endpoints are locked with Triton's restricted-protocol options: with an admin key, the APIs in
RESTRICTED_APIS answer only requests carrying the header `ADMIN_HEADER: <key>` (gRPC metadata or HTTP header);
health, metadata and inference stay open (probes and clients need them).
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Sequence

# Everything that changes or reveals the server beyond "is it up" and "run this model".
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
ADMIN_HEADER = "admin-key"
# Largest HTTP request body (Triton's own default is 64 MiB); a 16-frame 1080p window is ~100 MB.
DEFAULT_MAX_INPUT_BYTES = 256 << 20
# Python backend shared memory per model instance; grows in steps of the same size for video tensors.
PYTHON_SHM_BYTES = 16 << 20
NGC_HOME = Path("/opt/tritonserver")


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
        raise RuntimeError("no Triton server found: install nvidia-pytriton (the [server] extra) "
                           "or set TRITON_HOME to a folder with bin/tritonserver") from e
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


# ---------------------------------------------------------------------------------------------------- flags
def server_args(model_repository: str | os.PathLike, *, grpc_port: int, http_port: int, metrics_port: int,
                address: str = "127.0.0.1", admin_key: str | None = None, model_control_mode: str = "none",
                load_models: Sequence[str] = (), max_input_bytes: int | None = DEFAULT_MAX_INPUT_BYTES,
                exit_timeout_s: int = 30, options: frozenset[str] = frozenset(),
                shm_prefix: str | None = None) -> list[str]:
    """tritonserver command-line flags (without the binary and backend directory).

    `shm_prefix` names the Python backend's /dev/shm regions, so the regions of one server can be found and
    removed after it was killed (a SIGKILLed server leaves them behind, 16+ MB per model instance)."""
    if model_control_mode not in ("none", "explicit"):
        raise ValueError("model_control_mode must be 'none' (load everything, fixed) or 'explicit'")
    args = [f"--model-repository={Path(model_repository).resolve()}",
            f"--grpc-address={address}", f"--grpc-port={grpc_port}",
            f"--http-address={address}", f"--http-port={http_port}",
            f"--metrics-address={address}", f"--metrics-port={metrics_port}",
            f"--model-control-mode={model_control_mode}",
            "--strict-readiness=true",          # /v2/health/ready only once every model loaded
            f"--exit-timeout-secs={exit_timeout_s}",  # drain in-flight windows (and idle HTTP keep-alives)
            f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_BYTES}"]
    if shm_prefix:
        args.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")
    if model_control_mode == "explicit":
        args += [f"--load-model={m}" for m in (load_models or ["*"])]
    if admin_key:
        apis = ",".join(RESTRICTED_APIS)
        args += [f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}",
                 f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}"]
    if max_input_bytes and "--http-max-input-size" in options:
        args.append(f"--http-max-input-size={max_input_bytes}")
    return args


def allocator_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with two glibc malloc arenas, unless it already chose (MALLOC_ARENA_MAX, or jemalloc preloaded)."""
    if "MALLOC_ARENA_MAX" not in env and "jemalloc" not in env.get("LD_PRELOAD", ""):
        env["MALLOC_ARENA_MAX"] = "2"
    return env


# ---------------------------------------------------------------------------------------------------- server
class TritonServer:
    """A tritonserver child process on loopback; a context manager that always stops it.

    `grpc_url` / `http_url` are `host:port` as tritonclient takes them; `metrics_url` is the full Prometheus URL.
    """

    def __init__(self, model_repository: str | os.PathLike, grpc_port: int | None = None,
                 http_port: int | None = None, metrics_port: int | None = None, extra_args: Sequence[str] = (),
                 log_path: str | os.PathLike | None = None, *, admin_key: str | None = None,
                 model_control_mode: str = "none", load_models: Sequence[str] = (), address: str = "127.0.0.1",
                 max_input_bytes: int | None = DEFAULT_MAX_INPUT_BYTES, exit_timeout_s: int = 30,
                 home: str | os.PathLike | None = None):
        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} is not a folder")
        self.home = triton_home(home)
        self.host = "127.0.0.1" if address in ("0.0.0.0", "::") else address
        ports = [p if p is not None else 0 for p in (grpc_port, http_port, metrics_port)]
        while 0 in ports:                       # automatic ports: free now and distinct from each other
            p = free_port(self.host)
            if p not in ports:
                ports[ports.index(0)] = p
        self.grpc_port, self.http_port, self.metrics_port = ports
        self.address, self.admin_key = address, admin_key
        self.model_control_mode, self.load_models = model_control_mode, tuple(load_models)
        self.max_input_bytes, self.exit_timeout_s = max_input_bytes, exit_timeout_s
        self.extra_args = tuple(extra_args)
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen | None = None
        self._work_dir: Path | None = None
        self.shm_prefix = f"latentsync_{uuid.uuid4().hex[:12]}_"   # this server's /dev/shm regions

    grpc_url = property(lambda self: f"{self.host}:{self.grpc_port}")
    http_url = property(lambda self: f"{self.host}:{self.http_port}")
    metrics_url = property(lambda self: f"http://{self.host}:{self.metrics_port}/metrics")
    pid = property(lambda self: self._proc.pid if self._proc else None)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
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
        return [binary, f"--backend-directory={prepare_backends(self.home, self._work_dir)}",
                *server_args(self.model_repository, grpc_port=self.grpc_port, http_port=self.http_port,
                             metrics_port=self.metrics_port, address=self.address, admin_key=self.admin_key,
                             model_control_mode=self.model_control_mode, load_models=self.load_models,
                             max_input_bytes=self.max_input_bytes, exit_timeout_s=self.exit_timeout_s,
                             options=options, shm_prefix=self.shm_prefix),
                *self.extra_args]

    def exec(self) -> None:
        """Replace this process by tritonserver (stdout logging): signals and exit code are the server's own."""
        self._work_dir = Path(tempfile.mkdtemp(prefix="latentsync-triton-"))
        cmd = self.command()
        sys.stdout.flush()
        os.execve(cmd[0], cmd, self._env())

    def start(self) -> TritonServer:
        if self._proc is not None:
            raise RuntimeError("server already started")
        self._work_dir = Path(tempfile.mkdtemp(prefix="latentsync-triton-"))
        if self.log_path is None:               # kept after stop() for post-mortems
            fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            # Own process group: stop() can signal the server and its backend stubs, nothing else.
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=self._env(), start_new_session=True, preexec_fn=_die_with_parent)
        return self

    def poll(self) -> int | None:
        """The server's exit code, or None while it runs (or was never started)."""
        return self._proc.poll() if self._proc else None

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
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
        except (OSError, AttributeError):
            return ""

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
            _kill_group(proc.pid)               # stubs that outlived the server, or the server itself
            code = proc.wait()
            for region in self.shm_regions():   # left behind when the server or a stub was killed
                region.unlink(missing_ok=True)
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
        return code

    def shm_regions(self) -> list[Path]:
        """The Python backend's shared-memory regions of this server (in /dev/shm)."""
        return sorted(Path("/dev/shm").glob(f"{self.shm_prefix}*"))

    def __enter__(self) -> TritonServer:
        if self._proc is not None:              # `with server.start():` manages an already started one
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
            except Exception:                   # interpreter shutdown: the parent-death signal still applies
                pass


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the parent dies (even by SIGKILL), so no server is orphaned."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------------- cli
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="latentsync-serve", description=__doc__.split("\n\n")[0],
                                epilog="Flags after a lone -- go to tritonserver unchanged.")
    p.add_argument("repository", help="model repository folder")
    p.add_argument("--grpc-port", type=int, default=8001, help="0: any free port (also --http/--metrics-port)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--address", default="127.0.0.1", help="bind address (0.0.0.0 inside a container)")
    p.add_argument("--admin-key", default=os.environ.get("LATENTSYNC_ADMIN_KEY"),
                   help=f"require header '{ADMIN_HEADER}: KEY' for {', '.join(RESTRICTED_APIS)} "
                        "(default: env LATENTSYNC_ADMIN_KEY, which keeps it out of this command line)")
    p.add_argument("--model-control-mode", choices=("none", "explicit"), default="none",
                   help="none: load all models at start, repository fixed (production); "
                        "explicit: load/unload through the (restricted) repository API")
    p.add_argument("--load-model", action="append", default=[], help="with explicit mode (default: all)")
    p.add_argument("--max-input-bytes", type=int, default=DEFAULT_MAX_INPUT_BYTES,
                   help="largest HTTP request body, where this Triton build supports it")
    p.add_argument("--exit-timeout-secs", type=int, default=30, help="drain time for in-flight requests")
    p.add_argument("--log", help="server log file (default: a temporary file, printed at start)")
    p.add_argument("--triton-home", help="folder with bin/tritonserver (default: /opt/tritonserver or pytriton)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exec", action="store_true",
                      help="replace this process by tritonserver, logging to stdout (container PID 1)")
    mode.add_argument("--exit-when-ready", action="store_true",
                      help="start, wait until every model loaded (builds engine caches), stop; exit 0 if it was ready")
    p.add_argument("--ready-timeout", type=float, default=3600.0, help="seconds, with --exit-when-ready")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a, extra = p.parse_args(argv[:cut]), argv[cut + 1:]

    ports = [port or None for port in (a.grpc_port, a.http_port, a.metrics_port)]   # 0 -> automatic
    server = TritonServer(a.repository, *ports, extra, a.log,
                          admin_key=a.admin_key, model_control_mode=a.model_control_mode,
                          load_models=a.load_model, address=a.address, max_input_bytes=a.max_input_bytes,
                          exit_timeout_s=a.exit_timeout_secs, home=a.triton_home)
    if a.exec:
        server.exec()
    if a.exit_when_ready:
        with server.start():
            try:
                server.wait_ready(a.ready_timeout)
            except (RuntimeError, TimeoutError) as e:
                print(e, file=sys.stderr)
                return 1
        print(f"ready, stopped: {server.model_repository}", flush=True)
        return 0
    return serve_foreground(server, announce_key=bool(a.admin_key))


def serve_foreground(server: TritonServer, announce_key: bool = False) -> int:
    """Run until SIGINT/SIGTERM or until the server dies; always stop it."""
    stop = {"sig": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _frame: stop.update(sig=s))
    server.start()
    print(f"tritonserver pid {server.pid}, log {server.log_path}", flush=True)
    try:
        while stop["sig"] is None and not server.is_ready() and server.poll() is None:
            time.sleep(0.2)
        if stop["sig"] is None and server.poll() is None:
            print(f"ready: grpc {server.grpc_url}  http {server.http_url}  metrics {server.metrics_url}"
                  + ("  (admin APIs need the key)" if announce_key else ""), flush=True)
        while stop["sig"] is None and server.poll() is None:
            time.sleep(0.5)
        died = server.poll()
        if died is not None:
            print(f"tritonserver exited with {died}:\n{server.log_tail()}", file=sys.stderr)
            return died or 1
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
