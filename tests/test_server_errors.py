"""A stream that fails on the server's side (here: a model behind `lipsync` raises) tells its client only that it
failed and under which id the server logged why; the exception's text, which names models, paths and memory, goes
to the server's log alone (docs/THREAT-MODEL.md). A real tritonserver serves a stand-in repository whose
`vae_decoder` always fails."""

from __future__ import annotations

import re
import textwrap

import pytest
from helpers import audio_for, run_stream

from latentsync_contract import WINDOW, internal_error_message
from latentsync_export.export import ExportOptions, build_repository

SECRET = "/srv/weights/private-7f3a.pt"  # what an exception's text may carry: a path, a size, a device

FAILING_DECODER = f"""
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB while reading {SECRET}")
"""


@pytest.fixture(scope="module")
def server(triton_server, tmp_path_factory):
    repo = tmp_path_factory.mktemp("errors") / "repo"
    build_repository(ExportOptions(out=repo, tiny=True, stand_ins=True, variants=("1.5",)))
    (repo / "vae_decoder" / "1" / "model.py").write_text(textwrap.dedent(FAILING_DECODER))
    return triton_server(repo, timeout=600)


def test_a_model_failure_reaches_the_client_as_an_error_id_and_the_log_as_its_details(server, clip):
    frames, samples = clip
    got = run_stream(server.grpc_url, frames[:WINDOW], audio_for(samples, WINDOW), {"steps": 1}, sequence_id=4242)
    assert got.errors and not got.frames, got.errors
    pattern = re.escape(internal_error_message(4242, "@")).replace("@", "([0-9a-f]{8})")
    found = re.fullmatch(pattern, got.errors[0])
    assert found, got.errors
    # the request after the failing one is told the same, and no error names the server's internals
    assert all(f"error {found[1]}" in e for e in got.errors[1:]), got.errors
    for text in ("CUDA", "GiB", SECRET, "vae_decoder", "RuntimeError", "ModelCallError"):
        assert not any(text in e for e in got.errors), (text, got.errors)
    # the server's log has them, with the id the client got
    log = server.log_path.read_text(errors="replace")
    line = next((x for x in log.splitlines() if f"error {found[1]}:" in x), None)
    assert line is not None and "stream 4242" in line, log[-4000:]
    details = log[log.index(line) :]
    assert SECRET in details and "vae_decoder" in details and "Traceback" in details, details[:4000]
