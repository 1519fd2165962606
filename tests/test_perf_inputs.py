"""perf_analyzer's input data (latentsync_load.perf_inputs) is accepted by the models it is written for: every
model of a repository gets a file, and one entry of each, sent as perf_analyzer would (batch 1, streaming for
the decoupled models), is answered without error by the real server when it carries the server's internal key
(run_perf_analyzer sends it), and refused without it: only lipsync may call the other models."""

from __future__ import annotations

import base64
import json
import queue
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from latentsync_export.export import ExportOptions, build_repository
from latentsync_load import perf_inputs


@pytest.fixture(scope="module")
def served(tmp_path_factory, triton_server, shared_dir):
    repo = tmp_path_factory.mktemp("perf") / "repo"
    build_repository(ExportOptions(out=repo, tiny=True, stand_ins=True, variants=("1.5",)))
    data = tmp_path_factory.mktemp("perf_inputs")
    index = perf_inputs.generate(repo, shared_dir / "media" / "demo1_video.mp4", data, streams=1, seconds=0.8)
    return triton_server(repo, timeout=600), repo, index


def decode(entry: dict, metadata) -> dict[str, np.ndarray]:
    dtypes = {i.name: triton_to_np_dtype(i.datatype) for i in metadata.inputs}
    return {
        name: np.frombuffer(base64.b64decode(t["content"]["b64"]), dtypes[name]).reshape(t["shape"])
        for name, t in entry.items()
    }


def infer(client, model: str, arrays: dict[str, np.ndarray], batched: bool, decoupled: bool, parameters=None):
    inputs = []
    for name, x in arrays.items():
        x = x[None] if batched else x
        inputs.append(grpcclient.InferInput(name, list(x.shape), grpcclient.np_to_triton_dtype(x.dtype)))
        inputs[-1].set_data_from_numpy(x)
    if not decoupled:
        return client.infer(model, inputs, parameters=parameters)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(
            model, inputs, sequence_id=7 if model == "lipsync" else 0, sequence_start=True, parameters=parameters
        )
        result, error = results.get(timeout=300)
        if error is not None:
            raise error
        return result
    finally:
        client.stop_stream()


def test_every_model_has_input_data_its_server_accepts(served):
    server, repo, index = served
    models = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file())
    assert set(models) <= set(index), set(models) - set(index)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    for model in models:
        if model == "lipsync":  # a whole stream: audio, then frames (test_bench and the perf_analyzer run cover it)
            continue
        config = client.get_model_config(model, headers=server.grpc_admin_headers).config
        data = json.loads(Path(index[model]["input_data"]).read_text())["data"]
        arrays = decode(data[0], client.get_model_metadata(model, headers=server.grpc_admin_headers))
        names = {i.name for i in config.input}
        assert {i.name for i in config.input if not i.optional} <= set(arrays) <= names, (model, set(arrays))
        batched, decoupled = config.max_batch_size > 0, config.model_transaction_policy.decoupled
        # the models lipsync calls answer only requests with the server's internal key (serve.INTERNAL_KEY_ENV)
        with pytest.raises(InferenceServerException, match=f"model '{model}' is internal"):
            infer(client, model, arrays, batched, decoupled)
        result = infer(client, model, arrays, batched, decoupled, server.internal_parameters)
        for output in config.output:
            assert result.as_numpy(output.name) is not None, (model, output.name)


def test_perf_analyzer_sends_the_internal_key_to_every_model_but_lipsync(tmp_path):
    """latentsync-perf-analyzer measures each model alone: its requests to the models lipsync calls carry the key
    they ask for (from the server it starts, or derived from --admin-key-file), lipsync's carry its parameters."""
    from types import SimpleNamespace

    from latentsync_load.run_perf_analyzer import command
    from latentsync_serving.serve import INTERNAL_KEY_PARAMETER, internal_key

    key = internal_key("admin" * 8)
    a = SimpleNamespace(concurrency="1", requests=3, stability=10, max_trials=3, steps=2, internal_key=key)
    spec = {"input_data": str(tmp_path / "x.json"), "variant": "1.5"}
    vae = command("perf_analyzer", "vae_decoder", spec, "127.0.0.1:8001", a, tmp_path / "x.csv")
    lipsync = command("perf_analyzer", "lipsync", spec, "127.0.0.1:8001", a, tmp_path / "x.csv")
    assert vae[vae.index("--request-parameter") + 1] == f"{INTERNAL_KEY_PARAMETER}:{key}:string"
    assert not any(INTERNAL_KEY_PARAMETER in arg for arg in lipsync)
    assert key != internal_key("other" * 8) and len(key) == 64


def test_a_failed_perf_analyzer_run_says_why_in_the_summary():
    """A run that failed names perf_analyzer's own reason (e.g. no server at --url), not only its exit code."""
    import subprocess

    from latentsync_load.run_perf_analyzer import failure_reason

    refused = (  # perf_analyzer 2.51 at a port where nothing listens (exit 99)
        "error: failed to get model metadata: failed to connect to all addresses; last error: UNKNOWN: "
        "ipv4:127.0.0.1:9: Failed to connect to remote host: Connection refused\n"
    )
    reason = failure_reason(subprocess.CompletedProcess([], 99, "*** Measurement Settings ***\n", refused))
    assert reason.startswith("error: failed to get model metadata: failed to connect") and len(reason) <= 200
    assert failure_reason(subprocess.CompletedProcess([], 1, "", "")) == "no output"
    key = "k" * 64  # redacted before the line is cut: no part of the key is left at the cut
    leaked = failure_reason(subprocess.CompletedProcess([], 1, "", "error: " + "x" * 180 + key + "\n"), key)
    assert "kkkk" not in leaked and leaked.endswith("<internal key")
