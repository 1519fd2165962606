"""`latentsync-serve`: the real Triton server on loopback, its admin restrictions, and a clean stop."""

import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import (
    CLI,
    DOUBLE_MODEL,
    FAST,
    assert_synced_output,
    audio_for,
    children_of,
    cut_audio,
    metric,
    run_stream,
    start_ready,
    wait_for,
    write_python_model,
)
from tritonclient.utils import InferenceServerException

from latentsync_export.export import ExportOptions, build_repository
from latentsync_serving import serve
from latentsync_serving.serve import (
    ADMIN_HEADER,
    GRPC_ADMIN_HEADER,
    MALLOC_SETTINGS,
    RESTRICTED_APIS,
    TritonServer,
    allocator_env,
    free_port,
    main,
    port_is_free,
    secret_env,
    secret_marker,
    server_args,
)

ADMIN_KEY = "test-admin-key"
GRPC_ADMIN = {GRPC_ADMIN_HEADER: ADMIN_KEY}  # Triton prefixes gRPC restriction headers
HTTP_ADMIN = {ADMIN_HEADER: ADMIN_KEY}

ENVIRONMENT_MODEL = """
import sys
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        info = np.array([sys.prefix, torch.__version__], dtype=object)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", info)]) for _ in requests]
"""


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_python_model(repo, "double", DOUBLE_MODEL)
    return repo


@pytest.fixture(scope="module")
def admin_server(triton_server, tmp_path_factory):
    """Explicit model control behind the admin key, as a deployment that allows live reloads runs it."""
    repo = tmp_path_factory.mktemp("repo_env")
    write_python_model(repo, "double", DOUBLE_MODEL)
    write_python_model(repo, "environment", ENVIRONMENT_MODEL, output_type="TYPE_STRING")
    server = triton_server(
        repo,
        admin_key=ADMIN_KEY,
        model_control_mode="explicit",
        allow_shared_memory=True,
        log_path=tmp_path_factory.mktemp("logs") / "triton.log",
    )
    yield server
    server.stop()


def infer_double(url: str, x: np.ndarray) -> np.ndarray:
    with grpcclient.InferenceServerClient(url) as client:
        inp = grpcclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer("double", [inp]).as_numpy("Y")


def test_ready_and_grpc_inference(admin_server):
    with grpcclient.InferenceServerClient(admin_server.grpc_url) as client:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("double")
    x = np.arange(5, dtype=np.float32)
    np.testing.assert_array_equal(infer_double(admin_server.grpc_url, x), 2 * x)


def test_python_backend_runs_in_this_venv(admin_server):
    with grpcclient.InferenceServerClient(admin_server.grpc_url) as client:
        inp = grpcclient.InferInput("X", [1], "FP32")
        inp.set_data_from_numpy(np.zeros(1, np.float32))
        prefix, torch_version = (v.decode() for v in client.infer("environment", [inp]).as_numpy("Y"))
    assert Path(prefix).resolve() == Path(sys.prefix).resolve()
    assert torch_version == importlib.metadata.version("torch")


def test_every_server_process_runs_with_the_malloc_settings(admin_server):
    """tritonserver and each Python stub get serve.MALLOC_SETTINGS (frames unmapped when freed, per-face tensors
    reused from the arenas); an environment that chose its own allocator keeps it."""
    pids = {admin_server.pid} | children_of(admin_server.pid)
    assert len(pids) >= 2  # the server and at least one stub
    for pid in pids:
        env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
        assert {k: env.get(k.encode()) for k in MALLOC_SETTINGS} == {
            k: str(v).encode() for k, v in MALLOC_SETTINGS.items()
        }
    assert allocator_env({"MALLOC_ARENA_MAX": "4"}) == {"MALLOC_ARENA_MAX": "4"}
    assert allocator_env({"LD_PRELOAD": "/lib/libjemalloc.so.2"}) == {"LD_PRELOAD": "/lib/libjemalloc.so.2"}
    assert allocator_env({"MALLOC_TOP_PAD_": "0"})["MALLOC_TOP_PAD_"] == "0"


def test_admin_endpoints_refused_without_key_and_inference_still_works(admin_server):
    x = np.ones(3, dtype=np.float32)
    with grpcclient.InferenceServerClient(admin_server.grpc_url) as g:
        for call in (
            g.get_model_repository_index,
            lambda: g.unload_model("double"),
            lambda: g.get_inference_statistics("double"),
            lambda: g.get_model_config("double"),
            g.get_system_shared_memory_status,
            g.get_log_settings,
            g.get_trace_settings,
        ):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        with pytest.raises(InferenceServerException, match="restricted"):
            g.get_model_repository_index(headers={k: "wrong-key" for k in GRPC_ADMIN})
        assert g.is_model_ready("double")  # the refused unload did nothing
    h = httpclient.InferenceServerClient(admin_server.http_url)
    try:
        for call in (
            h.get_model_repository_index,
            lambda: h.unload_model("double"),
            lambda: h.load_model("double"),
            lambda: h.get_inference_statistics(),
        ):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        with pytest.raises(InferenceServerException, match="restricted"):
            h.get_model_repository_index(headers={ADMIN_HEADER: "wrong-key"})
        assert h.is_server_live() and h.is_model_ready("double")  # health and metadata stay open
        assert h.get_model_metadata("double")["name"] == "double"
    finally:
        h.close()
    np.testing.assert_array_equal(infer_double(admin_server.grpc_url, x), 2 * x)

    # With the key the same calls go through: a live unload / load round trip.
    with grpcclient.InferenceServerClient(admin_server.grpc_url) as g:
        names = {m.name for m in g.get_model_repository_index(headers=GRPC_ADMIN).models}
        assert names == {"double", "environment"}
        g.unload_model("double", headers=GRPC_ADMIN)
        deadline = time.monotonic() + 30
        while g.is_model_ready("double") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not g.is_model_ready("double")
        g.load_model("double", headers=GRPC_ADMIN)
        assert g.is_model_ready("double")
    np.testing.assert_array_equal(infer_double(admin_server.grpc_url, x), 2 * x)


def test_metrics_endpoint_counts_inferences(admin_server):
    infer_double(admin_server.grpc_url, np.ones(2, np.float32))
    text = urllib.request.urlopen(admin_server.metrics_url, timeout=10).read().decode()
    line = next(ln for ln in text.splitlines() if ln.startswith('nv_inference_request_success{model="double"'))
    assert float(line.split()[-1]) >= 1
    assert "nv_inference_queue_duration_us" in text  # the autoscaling signal


def test_shared_memory_with_allow_shared_memory_needs_the_key(admin_server, tmp_path):
    """--allow-shared-memory puts registration behind the admin key (a region of our own here)."""
    region = Path("/dev/shm") / f"latentsync_test_{os.getpid()}"
    region.write_bytes(bytes(4096))
    try:
        with grpcclient.InferenceServerClient(admin_server.grpc_url) as g:
            with pytest.raises(InferenceServerException, match="restricted"):
                g.register_system_shared_memory("mine", "/" + region.name, 4096)
            g.register_system_shared_memory("mine", "/" + region.name, 4096, headers=GRPC_ADMIN)
            assert "mine" in str(g.get_system_shared_memory_status(headers=GRPC_ADMIN))
            g.unregister_system_shared_memory("mine", headers=GRPC_ADMIN)
    finally:
        region.unlink()


def test_ready_only_when_health_answers_and_grpc_and_metrics_listen(tmp_path):
    """tritonserver opens HTTP, gRPC and metrics one after another: ready over HTTP alone is not ready (a client
    connecting at once found the gRPC port closed); and a server that answers must be this one (/v2 names it), not
    another on the same port. Loopback sockets stand in for the three endpoints."""
    import http.server
    import socket

    answers = {"/v2/health/ready": b"", "/v2": b'{"name": "another server"}'}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path in answers else 404)
            self.end_headers()
            self.wfile.write(answers.get(self.path, b""))

        def log_message(self, *args):
            pass

    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    listeners = []
    try:
        server = TritonServer(tmp_path, http_port=http_server.server_address[1], admin_key=ADMIN_KEY)
        for port in (server.grpc_port, server.metrics_port):  # health answers; gRPC, then metrics, closed
            assert not server.is_ready()
            listeners.append(socket.create_server(("127.0.0.1", port)))
        assert not server.is_ready()  # every port answers, but /v2 names another server
        answers["/v2"] = json.dumps({"name": server.server_id}).encode()
        assert server.is_ready()
        http_server.shutdown()
        http_server.server_close()
        assert not server.is_ready()  # health gone
    finally:
        http_server.server_close()
        for sock in listeners:
            sock.close()


def test_restriction_and_size_flags():
    args = server_args(
        "/repo",
        grpc_port=1,
        http_port=2,
        metrics_port=3,
        options=frozenset({"--http-max-input-size"}),
        max_input_bytes=1234,
    )
    admin = ",".join(a for a in RESTRICTED_APIS if a != "shared-memory")
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):  # always locked, keys as markers
        assert f"{flag}={admin}{secret_marker('ADMIN')}" in args
        assert f"{flag}=shared-memory{secret_marker('SEALED')}" in args  # sealed unless allowed
    assert "--http-max-input-size=1234" in args
    assert not {"health", "inference", "metadata"} & set(RESTRICTED_APIS)
    secrets_ = secret_env("k")
    assert secrets_["LATENTSYNC_SECRET_ADMIN"] == f":{ADMIN_HEADER}=k"
    assert secrets_["LATENTSYNC_SECRET_SEALED"] != secret_env("k")["LATENTSYNC_SECRET_SEALED"]  # never reused
    opened = server_args(
        "/repo", grpc_port=1, http_port=2, metrics_port=3, open_apis=["statistics"], allow_shared_memory=True
    )  # an old build: no size flag
    assert (
        f"--grpc-restricted-protocol=model-repository,model-config,shared-memory,trace,logging"
        f"{secret_marker('ADMIN')}" in opened
    )
    assert not any("SEALED" in a or "max-input" in a for a in opened)
    with pytest.raises(ValueError, match="open"):
        server_args("/repo", grpc_port=1, http_port=2, metrics_port=3, open_apis=["shared-memory"])
    with pytest.raises(ValueError):
        server_args("/repo", grpc_port=1, http_port=2, metrics_port=3, model_control_mode="poll")


@pytest.mark.server
def test_unfilled_key_marker_is_refused_by_tritonserver(tiny_repo, tmp_path):
    """Fail closed: started without the argv library, the markers are malformed options and Triton exits at
    once instead of serving with an empty or public key."""
    server = TritonServer(tiny_repo)
    server._work_dir = tmp_path
    cmd = server.command()
    r = subprocess.run(cmd, env=server._env(), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "option format is '<config name>:<setting>=<value>'" in r.stdout + r.stderr


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.server
def test_stop_leaves_no_process_and_frees_ports(tiny_repo, tmp_path):
    with TritonServer(tiny_repo, log_path=tmp_path / "triton.log") as server:
        pid, ports = server.pid, (server.grpc_port, server.http_port, server.metrics_port)
        assert len(set(ports)) == 3 and not any(port_is_free(p) for p in ports)
        stubs = children_of(pid)
        assert stubs, "the python backend stub should run as a child of the server"
        assert infer_double(server.grpc_url, np.ones(1, np.float32))[0] == 2
    assert server.pid is None and not alive(pid)
    assert not any(alive(s) for s in stubs)
    assert all(port_is_free(p) for p in ports)
    assert "successfully loaded 'double'" in (tmp_path / "triton.log").read_text()


def three_free_ports() -> list[int]:
    ports = []
    while len(ports) < 3:
        p = free_port()
        ports += [p] if p not in ports else []
    return ports


def start_cli(
    repo: Path, log: Path, *args, env=None, timeout: float = 180
) -> tuple[subprocess.Popen, list[str], list[int]]:
    """`latentsync-serve REPO` on free ports; returns once it announced readiness (its output lines so far)."""
    ports = three_free_ports()
    cmd = [
        sys.executable,
        "-m",
        "latentsync_serving.serve",
        str(repo),
        "--grpc-port",
        str(ports[0]),
        "--http-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--log",
        str(log),
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    watchdog = threading.Timer(timeout, proc.kill)  # a hung start fails the test instead of blocking
    watchdog.start()
    seen = []
    try:
        while not (seen and seen[-1].startswith("ready: grpc")):  # the CLI announces readiness, or exits
            line = proc.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        watchdog.cancel()
    return proc, seen, ports


def stop_cli(proc: subprocess.Popen, seen: list[str]) -> str:
    """SIGINT; the CLI's whole output. The CLI must exit 0."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + out
    assert proc.returncode == 0, out
    return out


def process_memory(pid: int, what: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{what}").read_bytes()
    except OSError:  # gone, or another user's environ
        return b""


@pytest.mark.server
def test_cli_serves_until_sigint_and_keeps_the_key_off_every_command_line(tiny_repo, tmp_path):
    """The key given in the environment reaches Triton (it works, a wrong one does not), yet no process shows
    it in /proc/PID/cmdline (what `ps` prints to every user), the server and its stubs not even in their own
    environment, and the server log does not contain it."""
    key = "cli-key-" + os.urandom(12).hex()
    log = tmp_path / "cli.log"
    proc, seen, ports = start_cli(tiny_repo, log, env=dict(os.environ, LATENTSYNC_ADMIN_KEY=key))
    try:
        server_pid = int("".join(seen).split("tritonserver pid ")[1].split(",")[0])
        group = {server_pid} | children_of(server_pid)
        assert len(group) >= 2, "the python backend stub should run as a child of the server"
        everyone = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
        assert not [pid for pid in everyone if key.encode() in process_memory(pid, "cmdline")]
        assert b"{LATENTSYNC_SECRET_ADMIN}" in process_memory(server_pid, "cmdline")  # the marker instead
        assert not [pid for pid in group if key.encode() in process_memory(pid, "environ")]

        url = f"127.0.0.1:{ports[0]}"
        with grpcclient.InferenceServerClient(url) as g:
            assert [m.name for m in g.get_model_repository_index(headers={GRPC_ADMIN_HEADER: key}).models] == ["double"]
            for headers in (None, {GRPC_ADMIN_HEADER: "wrong-key"}):
                with pytest.raises(InferenceServerException, match="restricted"):
                    g.get_model_repository_index(headers=headers)
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=5).status == 200
        assert infer_double(url, np.ones(2, np.float32)).tolist() == [2, 2]
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    out = stop_cli(proc, seen)
    assert "ready: grpc" in out and key not in out
    assert not alive(server_pid)
    assert all(port_is_free(p) for p in ports)
    text = log.read_text()
    assert "Started GRPCInferenceService" in text and key not in text


@pytest.fixture(scope="module")
def lipsync_repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("lipsync") / "repo"
    build_repository(ExportOptions(out=repo, tiny=True))
    return repo


@pytest.mark.server
def test_cli_drains_open_streams_on_sigterm(lipsync_repo, shared_dir, clip, tmp_path):
    """SIGTERM while a CLI sync is mid-stream: latentsync-serve refuses new streams by name and lets the open one
    finish (the CLI exits 0 with its whole output; Triton alone refuses the stream's model calls with 'Server not
    ready'), then stops tritonserver and exits 0."""
    proc, seen, ports = start_cli(lipsync_repo, tmp_path / "triton.log", "--drain-timeout-s", "900", timeout=900)
    url, metrics = f"127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[2]}/metrics"
    audio, out = cut_audio(shared_dir / "media" / "demo1_audio.wav", tmp_path / "speech.wav", 1), tmp_path / "out.mp4"
    sync = None
    try:
        sync = subprocess.Popen(
            CLI + [shared_dir / "media" / "demo1_video.mp4", audio, "-o", out, "--url", url, "--steps", "1", *FAST],
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for(
            lambda: metric(metrics, "lipsync_open_streams") == 1 or sync.poll() is not None,
            300,
            "the CLI's stream to open",
        )
        assert sync.poll() is None, sync.communicate()
        proc.send_signal(signal.SIGTERM)
        seen.append(proc.stdout.readline())
        assert seen[-1].startswith("draining: new streams are refused"), "".join(seen)
        video, samples = clip
        late = run_stream(url, video[:2], audio_for(samples, 2), {"steps": 1})
        assert late.errors and "the server is shutting down and takes no new streams" in late.errors[0], late.errors
        _, stderr = sync.communicate(timeout=900)
        seen.append(proc.communicate(timeout=120)[0])  # the drain ends with the stream, then the server
        assert sync.returncode == 0, stderr + "".join(seen)
        assert_synced_output(out, audio, tmp_path)
    finally:
        for p in (proc, sync):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert proc.returncode == 0 and "drained" in seen[-1], "".join(seen)


def test_cli_says_in_one_line_that_the_repository_is_not_there(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("latentsync-serve: error: model repository") and "nope" in err and "Traceback" not in err


def test_a_server_on_ports_in_use_starts_nothing(tmp_path):
    """Any port of the three taken (another server, or one still loading its models under a lock beside its key
    file): start() refuses before it writes or launches anything, naming the ports."""
    import socket

    from latentsync_serving.serve import PortInUseError

    with socket.create_server(("127.0.0.1", 0)) as taken:
        server = TritonServer(tmp_path, http_port=taken.getsockname()[1], admin_key=ADMIN_KEY)
        with pytest.raises(PortInUseError, match=f"port {taken.getsockname()[1]} on 127.0.0.1 already in use"):
            server.start()
        assert server.pid is None and server._work_dir is None
    key_file = tmp_path / "keys" / "admin-key.1"
    key_file.parent.mkdir()
    first = TritonServer(tmp_path, admin_key_file=key_file)
    second = TritonServer(tmp_path, grpc_port=first.grpc_port, admin_key_file=key_file)
    first._key_lock = serve._lock(key_file.with_name(key_file.name + ".lock"))  # as while it loads its models
    try:
        with pytest.raises(PortInUseError, match="another latentsync-serve is starting or serving"):
            second.start()
        assert not key_file.exists() and second._key_lock is None
    finally:
        first._release_key_lock()
    again = serve._lock(key_file.with_name(key_file.name + ".lock"))  # released: free again
    assert again is not None
    os.close(again)


def test_readiness_knows_a_server_by_the_id_it_passes_or_the_one_given():
    """/v2 names a server by --id: its own unless one is passed through to tritonserver (the last counts)."""
    ours = TritonServer(Path(__file__).parent, admin_key=ADMIN_KEY)
    assert ours.server_id.startswith("latentsync-")
    args = server_args(Path(__file__).parent, grpc_port=1, http_port=2, metrics_port=3, server_id=ours.server_id)
    assert f"--id={ours.server_id}" in args
    given = TritonServer(Path(__file__).parent, extra_args=["--id", "a", "--id=b"], admin_key=ADMIN_KEY)
    assert given.server_id == "b"


def test_cli_refuses_a_key_on_its_own_command_line(tiny_repo):
    r = subprocess.run(
        [sys.executable, "-m", "latentsync_serving.serve", str(tiny_repo), "--admin-key", "k"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "LATENTSYNC_ADMIN_KEY" in r.stderr and "ps" in r.stderr


@pytest.mark.server
def test_cli_defaults_lock_admin_apis_behind_a_generated_key(tiny_repo, tmp_path):
    """`latentsync-serve REPO` with no key: the shared-memory attack (register a Python stub's own /dev/shm
    region, whose name `ps` shows, then have an inference write into it: it wedged or aborted tritonserver) is
    refused, as are logging and the other admin APIs; the server keeps serving. The key generated for the run
    is in a 0600 file named at start, unlocks the admin APIs but not shared memory, and is removed at exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTSYNC_ADMIN_KEY")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)
    proc, seen, ports = start_cli(tiny_repo, tmp_path / "cli.log", env=env)
    try:
        key_file = Path(re.search(r"with the key in (\S+) \(generated", "".join(seen)).group(1))
        assert key_file.parent == tmp_path / "latentsync" and key_file.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "latentsync").stat().st_mode & 0o777 == 0o700
        key = key_file.read_text().strip()
        server_pid = int("".join(seen).split("tritonserver pid ")[1].split(",")[0])
        stub_args = b" ".join(process_memory(pid, "cmdline") for pid in children_of(server_pid))
        region = re.search(rb"(latentsync_[0-9a-f]+_[0-9a-f-]+)", stub_args).group(1).decode()
        assert (Path("/dev/shm") / region).exists()

        url = f"127.0.0.1:{ports[0]}"
        with grpcclient.InferenceServerClient(url) as g:
            for headers in (None, {GRPC_ADMIN_HEADER: key}):  # sealed: not even with the key
                with pytest.raises(InferenceServerException, match="restricted"):
                    g.register_system_shared_memory("stub", "/" + region, 4096, headers=headers)
            for call in (
                lambda: g.update_log_settings({"log_verbose_level": 1}),
                g.get_log_settings,
                lambda: g.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}),
                g.get_model_repository_index,
                lambda: g.get_model_config("double"),
                lambda: g.get_inference_statistics("double"),
            ):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call()
            inp = grpcclient.InferInput("X", [256], "FP32")
            inp.set_data_from_numpy(np.ones(256, np.float32))
            out = grpcclient.InferRequestedOutput("Y")
            out.set_shared_memory("stub", 1024)
            with pytest.raises(InferenceServerException, match="stub"):  # no such region registered
                g.infer("double", [inp], outputs=[out], client_timeout=30)
            assert "log_verbose_level" in g.get_log_settings(headers={GRPC_ADMIN_HEADER: key}, as_json=True)["settings"]
            assert g.get_model_config("double", headers={GRPC_ADMIN_HEADER: key}).config.name == "double"
        for _ in range(2):  # still serving
            assert infer_double(url, np.ones(3, np.float32)).tolist() == [2, 2, 2]
        assert proc.poll() is None and alive(server_pid)
        # a second server on these ports stops before it writes anything: the running server's key file (named by
        # the gRPC port) is neither overwritten nor, when the second server fails, removed
        second = subprocess.run(
            [sys.executable, "-m", "latentsync_serving.serve", str(tiny_repo), "--grpc-port", str(ports[0]),
             "--http-port", str(ports[1]), "--metrics-port", str(ports[2])],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert second.returncode == 2 and "another latentsync-serve" in second.stderr, second.stdout + second.stderr
        assert "ready" not in second.stdout and key_file.read_text().strip() == key
        assert infer_double(url, np.ones(3, np.float32)).tolist() == [2, 2, 2]
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    stop_cli(proc, seen)
    assert not key_file.exists()


@pytest.mark.server
def test_server_dies_with_its_parent(tiny_repo, tmp_path):
    """A test run or CLI killed with SIGKILL leaves no orphaned tritonserver behind."""
    script = (
        f"from latentsync_serving.serve import TritonServer\n"
        f"s = TritonServer({str(tiny_repo)!r}, log_path={str(tmp_path / 'triton.log')!r}).start()\n"
        f"print(s.wait_ready(180).pid, flush=True)\n"
        f"import time; time.sleep(600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, XDG_RUNTIME_DIR=str(tmp_path)),
    )  # its key file stays there
    try:
        server_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 40
    while alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphaned = alive(server_pid)
    if orphaned:
        os.killpg(server_pid, signal.SIGKILL)
    assert not orphaned


class _FakeStart:
    """Stands in for TritonServer in start_ready: dies before ready with `log`, or becomes ready."""

    def __init__(self, log: str | None):
        self.log, self.stopped = log, False

    def start(self):
        return self

    def wait_ready(self, timeout):
        if self.log is not None:
            raise RuntimeError(f"tritonserver exited (-6):\n{self.log}")
        return self

    def log_tail(self):
        return self.log or ""

    def stop(self):
        self.stopped = True


@pytest.mark.parametrize(
    ("logs", "ready_at"),
    [
        (["terminate called ... boost::interprocess::lock_exception", None], 1),  # the upstream abort: once more
        (["terminate called ... boost::interprocess::lock_exception"] * 2, None),  # twice: fails
        (["failed to load 'vae_encoder'", None], None),  # our own failure: no second start
    ],
)
def test_start_ready_restarts_only_after_the_upstream_load_abort(logs, ready_at):
    made = []

    def new_server():
        made.append(_FakeStart(logs[len(made)]))
        return made[-1]

    if ready_at is None:
        with pytest.raises(RuntimeError):
            with pytest.warns(UserWarning) if "lock_exception" in logs[0] else nullcontext():
                start_ready(new_server, 1)
        assert len(made) == (2 if "lock_exception" in logs[0] else 1)
    else:
        with pytest.warns(UserWarning, match="started once more"):
            assert start_ready(new_server, 1) is made[ready_at]
        assert made[0].stopped and len(made) == 2
