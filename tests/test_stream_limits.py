"""What one client can make the `lipsync` model hold, whatever it sends (docs/THREAT-MODEL.md): frames it does not
wait for fail its stream instead of queueing, a refused END still ends the stream Triton has ended, and streams
open or finishing are bounded. The service runs with a stand-in of the stub's pb_utils and a stream thread that
holds each request until released, so the queue fills as it would behind a busy stream."""

from __future__ import annotations

import threading

import pytest
from helpers import LipsyncPb, LipsyncRequest

from latentsync_contract import MAX_AUDIO_SAMPLES, MAX_UNANSWERED_FRAMES, SAMPLE_RATE, WINDOW
from latentsync_serving import lipsync_service
from latentsync_serving.lipsync_service import SEQUENCE_END, SEQUENCE_START, LipSyncService, ServiceSettings


@pytest.fixture
def service(monkeypatch):
    """A lipsync service whose streams hold each request in `_handle` until `release` is set; `handled` lists what
    they took, in order."""
    release, handled = threading.Event(), []

    def handle(stream, req, incoming):
        release.wait(30)
        handled.append(incoming)
        if incoming.overrun is not None and stream.error is None:  # as Stream._handle: the first error fails it
            stream._fail(lipsync_service.ContractError(incoming.overrun), req)
        else:
            stream._close(req)  # "already failed" once it failed

    monkeypatch.setattr(lipsync_service.Stream, "_handle", handle)
    svc = LipSyncService(LipsyncPb(), ServiceSettings({"1.5": "denoiser_1.5"}, max_streams=2))
    svc.release, svc.handled = release, handled
    yield svc
    release.set()
    svc.close()


def wait_finished(svc: LipSyncService, timeout: float = 10.0) -> None:
    threads = [s.thread for s in list(svc.running)]
    for t in threads:
        t.join(timeout)
    assert not svc.running, "streams still running"


def test_frames_beyond_the_unanswered_bound_fail_the_stream_and_are_not_queued(service):
    audio = 10 * SAMPLE_RATE  # 10 s: 252 frames may come
    service.submit(LipsyncRequest(7, SEQUENCE_START, audio=audio))
    requests = [LipsyncRequest(7, frames=WINDOW) for _ in range(MAX_UNANSWERED_FRAMES // WINDOW + 2)]
    for r in requests:
        service.submit(r)
    # the stream's thread holds the audio request: the frame requests wait in its queue, up to the bound
    service.release.set()
    service.submit(LipsyncRequest(7, SEQUENCE_END))
    wait_finished(service)
    frames = [i for i in service.handled if i.overrun is None and i.frames is not None]
    overrun = [i for i in service.handled if i.overrun is not None]
    assert sum(len(i.frames) for i in frames) == MAX_UNANSWERED_FRAMES  # what fits was kept, nothing more
    assert len(overrun) == 2 and all(i.frames is None for i in overrun)
    message = requests[-2].sender.errors()
    assert message and f"more than {MAX_UNANSWERED_FRAMES} frames that are not answered yet" in message[0]
    assert "already failed" in requests[-1].sender.errors()[0]


def test_audio_beyond_a_whole_track_fails_the_stream_and_is_not_queued(service):
    first = LipsyncRequest(8, SEQUENCE_START, audio=MAX_AUDIO_SAMPLES)
    extra = LipsyncRequest(8, audio=SAMPLE_RATE)
    service.submit(first)
    service.submit(extra)
    service.release.set()
    service.submit(LipsyncRequest(8, SEQUENCE_END))
    wait_finished(service)
    assert service.handled[1].audio is None and "the stream's audio is longer than 300 s" in extra.sender.errors()[0]


def test_an_end_with_another_token_is_refused_and_still_ends_the_stream(service):
    """Triton frees the sequence's slot at any END: the stream cannot get another request, so lipsync drops it
    too instead of holding its state (audio features: up to ~576 MB) until the idle timeout."""
    service.submit(LipsyncRequest(9, SEQUENCE_START, token="A", audio=SAMPLE_RATE))
    foreign = LipsyncRequest(9, SEQUENCE_END, token="B")
    service.submit(foreign)
    assert "is not the one its stream was started with" in foreign.sender.errors()[0]
    assert 9 not in service.streams
    service.release.set()
    wait_finished(service)


def test_streams_open_or_finishing_are_bounded_at_twice_the_slots(service):
    """Triton frees a slot at END while lipsync still finishes that stream, so START/END bursts could otherwise
    open any number of streams at once."""
    for stream_id in (1, 2, 3, 4):  # each ended at once: Triton's slots are free again, lipsync still works on them
        service.submit(LipsyncRequest(stream_id, SEQUENCE_START | SEQUENCE_END, audio=SAMPLE_RATE))
    refused = LipsyncRequest(5, SEQUENCE_START, audio=SAMPLE_RATE)
    service.submit(refused)
    assert "the server is busy: 4 streams are open or finishing" in refused.sender.errors()[0]
    assert 5 not in service.streams
    service.release.set()
    wait_finished(service)
    again = LipsyncRequest(5, SEQUENCE_START, audio=SAMPLE_RATE)
    service.submit(again)
    assert not again.sender.errors() and 5 in service.streams


def test_the_client_keeps_no_more_frames_unanswered_than_a_stream_may_have_waiting():
    """latentsync-client's flow control stays within the server's bound, so a stream of it never fails on it."""
    from latentsync_client import LipsyncClient
    from latentsync_client.errors import InputError

    assert LipsyncClient("localhost:1").max_inflight_frames <= MAX_UNANSWERED_FRAMES
    LipsyncClient("localhost:1", max_inflight_frames=MAX_UNANSWERED_FRAMES)
    for bad in (MAX_UNANSWERED_FRAMES + 1, WINDOW + 3):
        with pytest.raises(InputError, match=f"max_inflight_frames must be {WINDOW + 4}..{MAX_UNANSWERED_FRAMES}"):
            LipsyncClient("localhost:1", max_inflight_frames=bad)


def test_the_client_reports_a_busy_server_as_retryable():
    """The refusal's text is the contract's (written once), and the client library raises ServerBusy for it."""
    from tritonclient.utils import InferenceServerException

    from latentsync_client import ServerBusy, ServerError
    from latentsync_client.stream import _classify
    from latentsync_contract import busy_message

    error = _classify(InferenceServerException(busy_message(48, 48)), "localhost:8001")
    assert isinstance(error, ServerBusy) and isinstance(error, ServerError) and "start again" in str(error)
    assert type(_classify(InferenceServerException("other"), "localhost:8001")) is ServerError


def test_restarting_a_stream_does_not_get_past_the_bound(service):
    """A START with the live stream's own token replaces it, but the old one still finishes its queue: it counts."""
    for attempt in range(4):
        restart = LipsyncRequest(11, SEQUENCE_START, token="A", audio=SAMPLE_RATE)
        service.submit(restart)
        assert not restart.sender.errors(), attempt
    refused = LipsyncRequest(11, SEQUENCE_START, token="A", audio=SAMPLE_RATE)
    service.submit(refused)
    assert "the server is busy: 4 streams" in refused.sender.errors()[0]


def test_a_stream_taken_out_of_service_ends_even_if_its_answer_cannot_be_sent(service):
    service.submit(LipsyncRequest(12, SEQUENCE_START, token="A", audio=SAMPLE_RATE))
    foreign = LipsyncRequest(12, SEQUENCE_END, token="B")

    def broken(response=None, flags=0):
        raise RuntimeError("the client is gone")

    foreign.sender.send = broken
    service.submit(foreign)  # the refusal cannot be sent: logged, not raised into execute
    service.release.set()
    wait_finished(service)  # closed anyway: it does not stay running (and counted) for good
