"""The stubs' process set-up (files read as UTF-8), and where BLS callees answer a stream on a GPU: tensors the
stream computes on stay in device memory, outputs it reads on the host (detections, pasted regions, audio features)
are asked for in host memory. On a GPU the Python backend allocates every output where the request prefers
(request_executor.cc ResponseAlloc), so a detector's boxes asked for in device memory would reach `.numpy()` as
CUDA tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from latentsync_serving.backend import ModelContext, owned_copy, row_major, serve_batch
from latentsync_serving.bls import ModelNames, TritonModels
from latentsync_serving.metrics import Metrics
from latentsync_serving.serve import INTERNAL_KEY_PARAMETER


@dataclass(frozen=True)
class PreferredMemory:
    kind: str
    device_id: int = 0


class FakePbUtils:
    """The part of triton_python_backend_utils that TritonModels uses; records each request's preferred memory
    and answers with host outputs of the shapes the callers read."""

    TRITONSERVER_MEMORY_CPU, TRITONSERVER_MEMORY_GPU = "cpu", "gpu"
    PreferredMemory = PreferredMemory

    def __init__(self, answers):
        self.answers, self.preferred, self.parameters = answers, {}, {}

    class Tensor:
        def __init__(self, name, array):
            self._name, self.array = name, np.asarray(array)

        def is_cpu(self):
            return True

        def as_numpy(self):
            return self.array

    def InferenceRequest(self, model_name, requested_output_names, inputs, preferred_memory=None, parameters=None):  # noqa: N802
        self.preferred[model_name] = preferred_memory
        self.parameters[model_name] = parameters
        outputs = self.answers[model_name]({t._name: t.array for t in inputs})
        response = type("Response", (), {"has_error": lambda self: False, "outputs": outputs})()
        return type("Request", (), {"exec": lambda self, decoupled=False: response})()

    @staticmethod
    def get_output_tensor_by_name(response, name):
        return FakePbUtils.Tensor(name, response.outputs[name])


def test_outputs_read_on_the_host_are_asked_for_in_host_memory_the_rest_in_the_streams_device_memory():
    pb = FakePbUtils(
        {
            "face_detector": lambda x: {
                "BOX": np.zeros((len(x["FRAMES"]), 4), np.float32),
                "POINTS": np.zeros((len(x["FRAMES"]), 3, 2), np.float32),
                "FOUND": np.ones((len(x["FRAMES"]), 1), bool),
            },
            "audio_encoder": lambda x: {"FEATURES": np.zeros((len(x["MEL"]), 1500, 1, 384), np.float32)},
            "restorer": lambda x: {"RESTORED": x["REGIONS"]},
            "vae_decoder": lambda x: {"PIXELS": np.zeros((len(x["LATENTS"]), 3, 8, 8), np.float32)},
        }
    )
    key = "k" * 64  # the internal models' key (serve.INTERNAL_KEY_ENV): every call carries it
    models = TritonModels(pb, ModelNames(), 0.18215, Metrics(pb, "lipsync"), torch.device("cuda:1"), internal_key=key)

    detections = models.detect(np.zeros((2, 8, 8, 3), np.uint8))
    features = models.encode_audio(torch.zeros(3, 80, 3000))
    regions = [np.full((4, 5, 3), 7, np.uint8), np.full((3, 6, 3), 9, np.uint8)]
    pasted = models.paste_regions(regions, torch.zeros(2, 3, 8, 8), np.zeros((2, 2, 3)), [(0, 4, 0, 5)] * 2, (8, 8))
    (pixels,) = models.call("vae_decoder", {"LATENTS": torch.zeros(1, 4, 1, 1)}, ["PIXELS"])

    host, device = PreferredMemory("cpu", 0), PreferredMemory("gpu", 1)
    assert pb.preferred == {"face_detector": host, "audio_encoder": host, "restorer": host, "vae_decoder": device}
    assert pb.parameters == dict.fromkeys(pb.preferred, {INTERNAL_KEY_PARAMETER: key})
    assert detections.found.tolist() == [True, True] and features.shape == (3, 1500, 1, 384)
    assert [p.tolist() for p in pasted] == [r.tolist() for r in regions] and pixels.shape == (1, 3, 8, 8)


def test_a_process_started_in_the_c_locale_reads_files_as_utf8_after_utf8_locale():
    """Triton's stub starts Python as here: C locale, no coercion, no UTF-8 mode (files decode as ASCII)."""
    code = (
        "import locale; before = locale.getpreferredencoding(False); "
        "from latentsync_serving.backend import utf8_locale; ok = utf8_locale(); "
        "print(before, ok, open('/dev/null').encoding)"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    before, ok, after = out.split()
    assert before != "UTF-8" and ok == "True" and after == "UTF-8"


def test_a_gauge_is_sent_to_the_server_only_when_its_value_changes():
    """Each metric update is a round trip from the stub to the server process: an unchanged gauge is not resent."""

    class Family:
        COUNTER, GAUGE = "counter", "gauge"
        sent: list = []

        def __init__(self, name, description, kind):
            self.name = name

        def Metric(self, labels):  # noqa: N802 - pb_utils' name
            family = self

            class Metric:
                def set(self, value):
                    Family.sent.append((family.name, value))

            return Metric()

    class Pb:
        MetricFamily = Family

    metrics = Metrics(Pb(), "lipsync", gauges={"open": "streams"})
    for value in (0, 0, 1, 1, 1, 0, 0):
        metrics.set("open", value)
    assert Family.sent == [("open", 0), ("open", 1), ("open", 0)]
    assert metrics.values[("open",)] == 0


def test_a_gpu_instance_sets_its_device_and_only_network_models_allow_tf32(monkeypatch):
    """A KIND_GPU instance makes its GPU the current device (DLPack hand-overs synchronise with that device's
    stream), and TF32 is allowed only where a model runs networks: the orchestrator's and the restorer's
    alignment geometry (3x3 products on the GPU) stays float32. CUDA is patched in: this machine has none."""
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    args = {
        "model_config": json.dumps({"name": "lipsync", "parameters": {}}),
        "model_instance_kind": "GPU",
        "model_instance_device_id": "1",
        "model_repository": "/repo/lipsync",
        "model_version": "1",
    }
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        assert ModelContext.from_args(args).device == torch.device("cuda:1")
        assert devices == [torch.device("cuda:1")]
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        ModelContext.from_args(args, tf32=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def test_an_owned_copy_outlives_the_buffer_it_was_made_from():
    """A request's or response's tensor is a view of Triton's buffer: the copy must not share it."""
    buffer = np.arange(12, dtype=np.float32)
    view = torch.from_numpy(buffer).view(3, 4)
    copy = owned_copy(view)
    buffer[:] = -1  # the buffer released and reused
    assert torch.equal(copy, torch.arange(12, dtype=torch.float32).view(3, 4))


def test_serve_batch_leaves_host_inputs_in_host_memory():
    """Inputs a model reads on the host (the restorer's regions, affines, windows) are not sent to its device and
    back; the others are batched on the device ("meta" here, for want of a GPU)."""
    pb = FakePbUtils({})
    pb.get_input_tensor_by_name = lambda request, name: request[name]
    pb.InferenceResponse = lambda output_tensors=None, error=None: output_tensors or error
    requests = [{n: pb.Tensor(n, np.full((1, 2), k, np.float32)) for n in ("FACES", "REGIONS")} for k in range(2)]
    seen = {}

    def run(faces, regions):
        seen.update(faces=faces.device.type, regions=regions.device.type)
        return [regions * 2]

    ctx = ModelContext("restorer", Path("."), {}, torch.device("meta"), 8)
    responses = serve_batch(pb, requests, ["FACES", "REGIONS"], ["OUT"], run, ctx, ("REGIONS",))
    assert seen == {"faces": "meta", "regions": "cpu"}
    assert [r[0].array.tolist() for r in responses] == [[[0.0, 0.0]], [[2.0, 2.0]]]


class ParamRequest(dict):
    """A request's tensors, and its parameters as Triton hands them over (a JSON text)."""

    def __init__(self, tensors, parameters: str):
        super().__init__(tensors)
        self.parameters = lambda: parameters


def test_an_internal_model_serves_only_requests_with_its_key_and_the_rest_of_their_batch():
    """With an internal key set (latentsync-serve sets one), requests without it, with another or with a malformed
    one are refused without reading their tensors; the lipsync model's requests batched with them are served."""
    pb = FakePbUtils({})
    pb.get_input_tensor_by_name = lambda request, name: request[name]
    pb.InferenceResponse = lambda output_tensors=None, error=None: output_tensors or error
    pb.TritonError = lambda message: f"error: {message}"
    key = "k" * 64
    parameters = [
        json.dumps({INTERNAL_KEY_PARAMETER: key}),
        "{}",
        json.dumps({INTERNAL_KEY_PARAMETER: "x" + key[1:]}),
        json.dumps({INTERNAL_KEY_PARAMETER: 1}),
        "not json",
        json.dumps({INTERNAL_KEY_PARAMETER: key, "other": 3}),
    ]
    requests = [
        ParamRequest({"X": pb.Tensor("X", np.full((1, 2), k, np.float32))}, p) for k, p in enumerate(parameters)
    ]
    seen = []

    def run(x):
        seen.append(x[:, 0].tolist())
        return [x * 2]

    ctx = ModelContext("vae_decoder", Path("."), {}, torch.device("cpu"), 8, internal_key=key)
    responses = serve_batch(pb, requests, ["X"], ["Y"], run, ctx)
    assert seen == [[0.0, 5.0]]  # one run of the two admitted requests, together
    assert responses[0][0].array.tolist() == [[0.0, 0.0]] and responses[5][0].array.tolist() == [[10.0, 10.0]]
    for refused in responses[1:5]:
        assert refused == "error: model 'vae_decoder' is internal: send streams to the 'lipsync' model"
    # without a key (a server not started by latentsync-serve) every request is served
    open_ctx = ModelContext("vae_decoder", Path("."), {}, torch.device("cpu"), 8)
    assert all(not isinstance(r, str) for r in serve_batch(pb, requests, ["X"], ["Y"], run, open_ctx))


def test_dlpack_tensors_cross_with_row_major_strides():
    """A one-face window's latents, (4, 1, h, w) out of a (1, 4, h, w) batch, keep strides (hw, 4hw, w, 1): valid,
    but older Python backends refuse such DLPack tensors. They cross as the same memory with row-major strides."""
    odd = torch.arange(2 * 4 * 3 * 5, dtype=torch.float32).view(2, 4, 3, 5)[:1].transpose(0, 1)
    assert odd.is_contiguous() and odd.stride() == (15, 60, 5, 1)
    crossing = row_major(odd)
    assert crossing.stride() == (15, 15, 5, 1) and crossing.data_ptr() == odd.data_ptr()
    assert torch.equal(crossing, odd)
    strided = torch.zeros(3, 4)[:, ::2]
    assert row_major(strided).stride() == (2, 1)  # not contiguous at all: copied, as before


def test_lipsync_stops_numpy_advising_huge_pages_unless_the_operator_chose(monkeypatch):
    """The stub copies each request (25 MB of frames) into a fresh numpy array; advised into 2 MB huge pages, the
    kernel zeroed them at 10-14 ms of lipsync's CPU per frame (RESULTS.md, fourteenth round). An operator's
    NUMPY_MADVISE_HUGEPAGE is left alone."""
    from latentsync_serving.backend import numpy_huge_pages
    from latentsync_serving.lipsync_service import LipSyncService

    class Family:
        COUNTER, GAUGE = "counter", "gauge"

        def __init__(self, *args, **kwargs):
            pass

        def Metric(self, labels):  # noqa: N802 - pb_utils' name
            return type("Metric", (), {"set": lambda self, v: None, "increment": lambda self, v: None})()

    pb = type("Pb", (), {"MetricFamily": Family})()
    params = {"denoiser_models": {"string_value": "v15=unet_v15"}}
    args = {
        "model_config": json.dumps({"name": "lipsync", "parameters": params}),
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
        "model_repository": "/repo/lipsync",
        "model_version": "1",
    }
    previous = numpy_huge_pages(True)
    try:
        for operator_chose in (False, True):
            if operator_chose:
                monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")
            else:
                monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
            numpy_huge_pages(True)
            LipSyncService.from_args(args, pb).close()
            assert numpy_huge_pages(True) is operator_chose
    finally:
        numpy_huge_pages(previous)


def test_the_denoiser_refuses_a_window_that_would_not_batch_with_the_others():
    """One window of other shapes in a step would fail the whole step, every stream's windows in it: it is refused
    alone, before its tensors are copied."""
    from latentsync_serving.denoiser import check_window

    def window(frames=16, size=32, audio_frames=None, mask_channels=1):
        return {
            "LATENTS": torch.zeros(4, frames, size, size),
            "MASK": torch.zeros(mask_channels, frames, size, size),
            "MASKED": torch.zeros(4, frames, size, size),
            "REFERENCE": torch.zeros(4, frames, size, size),
            "AUDIO": torch.zeros(frames if audio_frames is None else audio_frames, 50, 384),
        }

    check_window(window(), 32)
    check_window(window(frames=3), 32)  # a stream's last window
    check_window(window(size=64), None)  # a repository built before `latent_size`: consistent in itself
    with pytest.raises(ValueError, match="a window is"):
        check_window({**window(size=64), "MASK": torch.zeros(1, 16, 32, 32)}, None)
    for bad in (window(size=33), window(frames=17), window(frames=0), window(audio_frames=15), window(mask_channels=4)):
        with pytest.raises(ValueError, match="a window is 1..16 frames"):
            check_window(bad, 32)


def test_the_denoiser_copies_a_windows_inputs_onto_its_device_in_one_copy_each(monkeypatch):
    """Host inputs (a `lipsync` on the CPU) are uploaded by owned_copy, which on a GPU does it off the stream where
    the loop's UNet steps are queued: a plain `.to(device)` there would wait for the step in flight. The window's
    tensors end up on the model's device ("meta" here, for want of a GPU), not sharing the request's buffers."""
    from latentsync_serving import denoiser

    calls = []
    real_owned_copy = denoiser.owned_copy

    def recording_owned_copy(tensor, device=None):
        calls.append((tensor.device.type, torch.device(device).type if device is not None else None))
        return real_owned_copy(tensor, device)

    monkeypatch.setattr(denoiser, "owned_copy", recording_owned_copy)
    pb = FakePbUtils({})
    pb.get_input_tensor_by_name = getattr
    shapes = {"LATENTS": (4, 16, 8, 8), "MASK": (1, 16, 8, 8), "MASKED": (4, 16, 8, 8), "REFERENCE": (4, 16, 8, 8)}
    arrays = {n: np.ones(s, np.float32) for n, s in {**shapes, "AUDIO": (16, 50, 384)}.items()}
    request = SimpleNamespace(parameters=lambda: "{}", **{n: pb.Tensor(n, a) for n, a in arrays.items()})
    service = denoiser.DenoiserService.__new__(denoiser.DenoiserService)
    service.pb, service.latent_size, service.device, service.dtype = pb, 8, torch.device("meta"), torch.float32
    job = service._job(request)
    assert sorted(calls) == [("cpu", "meta")] * 5
    assert job.latents.device.type == "meta"
    assert real_owned_copy(torch.from_numpy(arrays["AUDIO"]), "cpu").data_ptr() != arrays["AUDIO"].ctypes.data


def test_the_denoisers_backlog_gauges_exist_from_the_start_per_instance_and_reset_after_a_failed_step():
    """The autoscaler reads denoiser_waiting_windows: the series must exist before the first window (a pod with
    none could block the HPA's scale-down), carry the instance (instances on several GPUs would overwrite one
    shared series), and fall back to 0 when a step fails (a stale backlog would scale towards maxReplicas)."""
    from helpers import NoMetricsPb

    from latentsync_serving.denoiser import DenoiserService

    def broken_unet(*args):
        raise RuntimeError("out of memory")

    service = DenoiserService(
        NoMetricsPb(), broken_unet, torch.device("cpu"), torch.float32, 1, "denoiser_x", 8, None, "denoiser_x_0"
    )
    try:
        assert service.ready.wait(30)
        keys = {
            name: (name, ("instance", "denoiser_x_0"))
            for name in ("denoiser_active_windows", "denoiser_waiting_windows")
        }
        deadline = time.monotonic() + 10
        while not all(k in service.metrics.values for k in keys.values()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {name: service.metrics.values.get(key) for name, key in keys.items()} == dict.fromkeys(keys, 0)

        answered = []
        service._answer = lambda w, error=None: answered.append(error)
        for _ in range(2):  # windows whose step fails (these jobs are not even windows)
            service.metrics.set("denoiser_waiting_windows", 1, instance="denoiser_x_0")  # as if a backlog was seen
            with service._cond:
                service._pending.append(SimpleNamespace(job=SimpleNamespace(done=False)))
                service._cond.notify()
        deadline = time.monotonic() + 10
        while len(answered) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert len(answered) == 2 and all(answered)  # both windows answered with the step's error
        assert service.metrics.values[keys["denoiser_waiting_windows"]] == 0
        assert service.metrics.values[keys["denoiser_active_windows"]] == 0
    finally:
        with service._cond:
            service._stop = True
            service._cond.notify()
