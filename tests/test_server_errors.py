"""A stream that fails on the server's side (here: a model behind `lipsync` raises) tells its client only that it
failed and under which id the server logged why; the exception's text, which names models, paths and memory, goes
to the server's log alone (docs/THREAT-MODEL.md). A real tritonserver serves a stand-in repository whose
`vae_decoder` always fails; failures in `execute` itself, which no model can be made to cause, are raised in the
service under a stand-in of the stub's pb_utils."""

from __future__ import annotations

import re
import textwrap

import pytest
from helpers import LipsyncPb, LipsyncRequest, audio_for, run_stream

from latentsync_contract import SAMPLE_RATE, WINDOW, internal_error_message
from latentsync_export.export import ExportOptions, build_repository
from latentsync_serving import lipsync_service
from latentsync_serving.lipsync_service import SEQUENCE_END, SEQUENCE_START, LipSyncService, ServiceSettings

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


def error_id(message: str, stream_id: int) -> str | None:
    """The id in `message` if it is exactly the contract's internal error of `stream_id`, else None."""
    pattern = re.escape(internal_error_message(stream_id, "@")).replace("@", "([0-9a-f]{8})")
    found = re.fullmatch(pattern, message)
    return found and found[1]


def test_a_model_failure_reaches_the_client_as_an_error_id_and_the_log_as_its_details(server, clip):
    frames, samples = clip
    n = WINDOW + 2  # a request that fills the first window, then one after it
    got = run_stream(server.grpc_url, frames[:n], audio_for(samples, n), {"steps": 1}, sequence_id=4242)
    assert len(got.errors) == 2 and not got.frames, got.errors
    found = error_id(got.errors[0], 4242)
    assert found, got.errors
    # the request after the failing one is told the same id, and no error names the server's internals
    assert f"error {found};" in got.errors[1], got.errors
    for text in ("CUDA", "GiB", SECRET, "vae_decoder", "RuntimeError", "ModelCallError"):
        assert not any(text in e for e in got.errors), (text, got.errors)
    # the server's log has them, with the id the client got
    log = server.log_path.read_text(errors="replace")
    line = next((x for x in log.splitlines() if f"error {found}:" in x), None)
    assert line is not None and "stream 4242" in line, log[-4000:]
    details = log[log.index(line) :]
    assert SECRET in details and "vae_decoder" in details and "Traceback" in details, details[:4000]


# ---------------------------------------------------------------------------------------------------- execute
def test_a_failure_while_execute_takes_a_request_fails_its_stream_in_order_without_details(monkeypatch, capsys):
    """What fails in `execute` itself (here: the copy of a request's frames) would reach the client through Triton
    with its text and traceback; the service answers it as a model failure, on the stream's thread, in order."""
    take = lipsync_service._Incoming.take

    def failing_take(pb, request, sender):
        if "FRAMES" in request.tensors:
            raise MemoryError(f"cannot allocate 25165824 bytes for {SECRET}")
        return take(pb, request, sender)

    monkeypatch.setattr(lipsync_service._Incoming, "take", staticmethod(failing_take))
    service = LipSyncService(LipsyncPb(), ServiceSettings({"1.5": "denoiser_1.5"}))
    try:
        requests = [
            LipsyncRequest(9, SEQUENCE_START, audio=SAMPLE_RATE),
            LipsyncRequest(9, frames=2),
            LipsyncRequest(9, SEQUENCE_END),
        ]
        for r in requests:
            service.submit(r)
        for s in list(service.running):
            s.thread.join(10)
        assert not service.running
    finally:
        service.close()
    assert not requests[0].sender.errors()
    found = error_id(requests[1].sender.errors()[0], 9)
    assert found, requests[1].sender.errors()
    assert requests[2].sender.errors() == [f"stream 9 already failed: {requests[1].sender.errors()[0]}"]
    log = capsys.readouterr().out
    assert f"error {found}:" in log and SECRET in log and "MemoryError" in log, log


def test_a_failure_before_a_request_reaches_a_stream_is_answered_without_details(monkeypatch, capsys):
    def broken(token):
        raise RuntimeError(f"token check failed in {SECRET}")

    monkeypatch.setattr(lipsync_service, "check_stream_token", broken)
    service = LipSyncService(LipsyncPb(), ServiceSettings({"1.5": "denoiser_1.5"}))
    try:
        request = LipsyncRequest(10, SEQUENCE_START, audio=SAMPLE_RATE)
        service.submit(request)  # must not raise: Triton would send the exception's text
    finally:
        service.close()
    assert error_id(request.sender.errors()[0], 10) and not service.running, request.sender.errors()
    assert SECRET in capsys.readouterr().out
