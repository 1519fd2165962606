"""`latentsync-serve`: the real Triton server on loopback, its admin restrictions, and a clean stop."""
import importlib.metadata
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from latentsync_serving.serve import ADMIN_HEADER, RESTRICTED_APIS, TritonServer, free_port, port_is_free, server_args

ADMIN_KEY = "test-admin-key"
GRPC_ADMIN = {f"triton-grpc-protocol-{ADMIN_HEADER}": ADMIN_KEY}   # Triton prefixes gRPC restriction headers
HTTP_ADMIN = {ADMIN_HEADER: ADMIN_KEY}

DOUBLE_MODEL = '''
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy() * 2)]) for r in requests]
'''
ENVIRONMENT_MODEL = '''
import sys
import numpy as np
import torch
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        info = np.array([sys.prefix, torch.__version__], dtype=object)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", info)]) for _ in requests]
'''


def write_python_model(repo: Path, name: str, code: str, output_type: str = "TYPE_FP32") -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(code))
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(f'''
        backend: "python"
        max_batch_size: 0
        input [ {{ name: "X" data_type: TYPE_FP32 dims: [ -1 ] }} ]
        output [ {{ name: "Y" data_type: {output_type} dims: [ -1 ] }} ]
        instance_group [ {{ count: 1 kind: KIND_CPU }} ]
    '''))


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
    server = triton_server(repo, admin_key=ADMIN_KEY, model_control_mode="explicit",
                           log_path=tmp_path_factory.mktemp("logs") / "triton.log")
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


def test_admin_endpoints_refused_without_key_and_inference_still_works(admin_server):
    x = np.ones(3, dtype=np.float32)
    with grpcclient.InferenceServerClient(admin_server.grpc_url) as g:
        for call in (g.get_model_repository_index, lambda: g.unload_model("double"),
                     lambda: g.get_inference_statistics("double"), lambda: g.get_model_config("double"),
                     g.get_system_shared_memory_status, g.get_log_settings, g.get_trace_settings):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        with pytest.raises(InferenceServerException, match="restricted"):
            g.get_model_repository_index(headers={k: "wrong-key" for k in GRPC_ADMIN})
        assert g.is_model_ready("double")          # the refused unload did nothing
    h = httpclient.InferenceServerClient(admin_server.http_url)
    try:
        for call in (h.get_model_repository_index, lambda: h.unload_model("double"),
                     lambda: h.load_model("double"), lambda: h.get_inference_statistics()):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        with pytest.raises(InferenceServerException, match="restricted"):
            h.get_model_repository_index(headers={ADMIN_HEADER: "wrong-key"})
        assert h.is_server_live() and h.is_model_ready("double")   # health and metadata stay open
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
    line = next(l for l in text.splitlines() if l.startswith('nv_inference_request_success{model="double"'))
    assert float(line.split()[-1]) >= 1
    assert "nv_inference_queue_duration_us" in text        # the autoscaling signal


def test_restriction_and_size_flags():
    args = server_args("/repo", grpc_port=1, http_port=2, metrics_port=3, admin_key="k",
                       options=frozenset({"--http-max-input-size"}), max_input_bytes=1234)
    apis = ",".join(RESTRICTED_APIS)
    assert f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}=k" in args
    assert f"--http-restricted-api={apis}:{ADMIN_HEADER}=k" in args
    assert "--http-max-input-size=1234" in args
    assert not {"health", "inference", "metadata"} & set(RESTRICTED_APIS)
    bare = server_args("/repo", grpc_port=1, http_port=2, metrics_port=3)   # no key, an old build
    assert not any("restricted" in a or "max-input" in a for a in bare)
    with pytest.raises(ValueError):
        server_args("/repo", grpc_port=1, http_port=2, metrics_port=3, model_control_mode="poll")


def children_of(pid: int) -> set[int]:
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.add(int(stat.parent.name))
    return kids


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


@pytest.mark.server
def test_cli_serves_until_sigint(tiny_repo, tmp_path):
    ports = []
    while len(ports) < 3:
        p = free_port()
        ports += [p] if p not in ports else []
    log = tmp_path / "cli.log"
    cmd = [sys.executable, "-m", "latentsync_serving.serve", str(tiny_repo), "--grpc-port", str(ports[0]),
           "--http-port", str(ports[1]), "--metrics-port", str(ports[2]), "--admin-key", ADMIN_KEY,
           "--log", str(log)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(180, proc.kill)               # a hung start fails the test instead of blocking
    watchdog.start()
    try:
        seen = []
        while not (seen and seen[-1].startswith("ready: grpc")):   # the CLI announces readiness, or exits
            line = proc.stdout.readline()
            assert line, "".join(seen)
            seen.append(line)
        assert urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=5).status == 200
        assert infer_double(f"127.0.0.1:{ports[0]}", np.ones(2, np.float32)).tolist() == [2, 2]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        out = "".join(seen) + out
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "ready: grpc" in out
    server_pid = int(out.split("tritonserver pid ")[1].split(",")[0])
    assert not alive(server_pid)
    assert all(port_is_free(p) for p in ports)
    assert "Started GRPCInferenceService" in log.read_text()


@pytest.mark.server
def test_server_dies_with_its_parent(tiny_repo, tmp_path):
    """A test run or CLI killed with SIGKILL leaves no orphaned tritonserver behind."""
    script = (f"from latentsync_serving.serve import TritonServer\n"
              f"s = TritonServer({str(tiny_repo)!r}, log_path={str(tmp_path / 'triton.log')!r}).start()\n"
              f"print(s.wait_ready(180).pid, flush=True)\n"
              f"import time; time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
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
