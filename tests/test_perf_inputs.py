"""perf_analyzer's input data (latentsync_load.perf_inputs) is accepted by the models it is written for: every
model of a repository gets a file, and one entry of each, sent as perf_analyzer would (batch 1, streaming for
the decoupled models), is answered without error by the real server."""

from __future__ import annotations

import base64
import json
import queue
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

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


def infer(client, model: str, arrays: dict[str, np.ndarray], batched: bool, decoupled: bool):
    inputs = []
    for name, x in arrays.items():
        x = x[None] if batched else x
        inputs.append(grpcclient.InferInput(name, list(x.shape), grpcclient.np_to_triton_dtype(x.dtype)))
        inputs[-1].set_data_from_numpy(x)
    if not decoupled:
        return client.infer(model, inputs)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, sequence_id=7 if model == "lipsync" else 0, sequence_start=True)
        result, error = results.get(timeout=300)
        assert error is None, error
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
        result = infer(client, model, arrays, config.max_batch_size > 0, config.model_transaction_policy.decoupled)
        for output in config.output:
            assert result.as_numpy(output.name) is not None, (model, output.name)
