"""One gRPC bidirectional stream to the `lipsync` model: audio first, then frames; synced frames back.

The server answers with what changed in each frame (its face region, REGION_BOX and REGIONS): the client keeps the
frames it sent until they are answered and pastes the regions into them. It keeps at most `max_inflight_frames`
frames between "sent" and "handed to the caller", so a fast decoder never queues the video in memory and a slow
consumer (the encoder) slows the upload down. Audio requests, and requests of frames that complete no window, are
paced by their (empty) final responses, at most UNANSWERED_REQUESTS of them unanswered: a long track is never
queued whole, and a server that falls behind (it then acknowledges frames as it takes them in, not on arrival) holds
a few requests of whole frames for the stream, not all of `max_inflight_frames`.

While it holds back (waiting for windows, or while the caller is busy with a frame), a keep-alive thread sends an
empty request whenever nothing was sent for `keepalive_s`: Triton's sequence idle clock restarts only when a
request arrives, and a stream idle for the server's timeout is dropped.
"""

from __future__ import annotations

import collections
import itertools
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from latentsync_contract import (
    AUDIO,
    FACE_FOUND,
    FRAME_INDEX,
    FRAMES,
    MAX_AUDIO_SAMPLES,
    MAX_AUDIO_SECONDS,
    MAX_FRAMES_PER_REQUEST,
    MAX_UNANSWERED_FRAMES,
    MODEL_NAME,
    REGION_BOX,
    REGIONS,
    SAMPLE_RATE,
    STREAM_TOKEN,
    UNANSWERED_REQUESTS,
    WINDOW,
    ContractError,
    StreamParams,
    apply_regions,
    completes_window,
    is_no_face_error,
    is_server_busy_error,
    is_stream_dropped_error,
    min_audio_samples,
    num_frames_for_audio,
    request_spans,
)

from .errors import (
    ClientError,
    InputError,
    NoFaceError,
    ServerBusy,
    ServerError,
    ServerUnreachable,
    StreamExpired,
)
from .grpc_stream import InferStream, encode_request

# gRPC status codes that mean the connection, not the request, failed.
_CONNECTION_CODES = ("UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "UNKNOWN", "INTERNAL")
_NO_SHAPE_FRAMES = np.zeros((0, 1, 1, 3), np.uint8)  # FRAMES of an audio request
_NO_AUDIO = np.zeros((0,), np.float32)  # AUDIO of a frames request


@dataclass(frozen=True)
class SyncedFrame:
    index: int  # 0-based position in the stream
    frame: np.ndarray  # RGB uint8 (H, W, 3), read-only: the frame that was sent, with the synced region pasted
    face_found: bool  # False: no face, the frame came back unchanged


FramesArg = Iterable[np.ndarray] | Callable[[int], Iterable[np.ndarray]]


class LipsyncClient:
    """Client of a Triton server serving `lipsync`; each `stream()` call opens its own gRPC stream."""

    def __init__(
        self,
        url: str = "localhost:8001",
        model: str = MODEL_NAME,
        *,
        max_inflight_frames: int = 2 * WINDOW + 4,  # two windows: the server works on two at once
        frames_per_request: int = 4,
        audio_chunk_samples: int = 10 * SAMPLE_RATE,
        response_timeout: float | None = 600.0,
        connect_timeout: float = 10.0,
        keepalive_s: float | None = 1.0,
    ):
        if not 1 <= frames_per_request <= MAX_FRAMES_PER_REQUEST:
            raise InputError(f"frames_per_request must be 1..{MAX_FRAMES_PER_REQUEST}")
        if not WINDOW + frames_per_request <= max_inflight_frames <= MAX_UNANSWERED_FRAMES:
            # at least a window and a request (the server answers only whole windows); at most what the server
            # keeps of a stream before it fails it
            raise InputError(f"max_inflight_frames must be {WINDOW + frames_per_request}..{MAX_UNANSWERED_FRAMES}")
        self.url, self.model = url, model
        self.max_inflight_frames, self.frames_per_request = max_inflight_frames, frames_per_request
        self.response_timeout, self.connect_timeout = response_timeout, connect_timeout
        self.audio_chunk_samples = audio_chunk_samples
        self.max_unanswered_requests = UNANSWERED_REQUESTS
        self.keepalive_s = keepalive_s  # None: never (the server's idle timeout then applies)

    def _connect(self) -> grpcclient.InferenceServerClient:
        """A gRPC client to a live server whose `lipsync` model is ready, or a ClientError saying why not."""
        try:
            client = grpcclient.InferenceServerClient(self.url)
        except InferenceServerException as e:
            raise InputError(f"bad server URL {self.url!r}: {e.message()}") from None
        try:
            client.is_server_live(client_timeout=self.connect_timeout)
            ready = client.is_model_ready(self.model, client_timeout=self.connect_timeout)
        except InferenceServerException as e:
            client.close()
            raise ServerUnreachable(
                f"cannot reach a Triton server at {self.url} ({_first_line(e.message())})"
            ) from None
        if not ready:
            client.close()
            raise ServerError(f"the server at {self.url} has no ready model {self.model!r}")
        return client

    def check(self) -> None:
        """Raise ServerUnreachable / ServerError unless the server and model are up."""
        self._connect().close()

    def stream(
        self, audio: np.ndarray | Iterable[np.ndarray], frames: FramesArg, params: StreamParams | None = None
    ) -> Iterator[SyncedFrame]:
        """Sync `frames` to `audio`, yielding synced frames in order as the server finishes them.

        audio: 16 kHz mono float32 samples in [-1, 1], one array or an iterable of chunks (sent as they come).
        frames: RGB uint8 (H, W, 3) frames at 25 fps, exactly `num_frames_for_audio(total samples)` of them;
            or a callable taking that count and returning them (the count is known once the audio is sent).
        Closing the generator early (or an exception) cancels the stream.
        """
        params = params or StreamParams()
        self.check()
        responses: queue.Queue = queue.Queue()
        stream = InferStream(self.url, callback=lambda result, error: responses.put((result, error)))
        sequence_id = secrets.randbits(63) | 1
        owner = {STREAM_TOKEN: secrets.token_hex(16)}  # on every request: the id is this stream's alone
        request_count = itertools.count()
        state = {"started": False, "ended": False, "completed": False, "sent_at": 0.0}
        lock = threading.Lock()  # the keep-alive thread sends too

        def request(
            frames_batch: np.ndarray, audio_chunk: np.ndarray, *, start=False, end=False, keepalive=False
        ) -> str | None:
            """Send one request (InferenceServerException if the stream broke); a keep-alive only when due."""
            with lock:
                if keepalive and (
                    not state["started"] or state["ended"] or time.monotonic() - state["sent_at"] < self.keepalive_s
                ):
                    return None
                request_id = f"{sequence_id}-{next(request_count)}"
                stream.send(
                    encode_request(
                        self.model,
                        [(FRAMES, frames_batch), (AUDIO, audio_chunk)],
                        request_id=request_id,
                        sequence_id=sequence_id,
                        sequence_start=start,
                        sequence_end=end,
                        parameters={**params.as_parameters(), **owner} if start else owner,
                    )
                )
                state.update(started=True, ended=end, sent_at=time.monotonic())
            return request_id

        def send(frames_batch: np.ndarray, audio_chunk: np.ndarray, *, start=False, end=False) -> str:
            try:
                return request(frames_batch, audio_chunk, start=start, end=end)
            except InferenceServerException:  # the stream broke: its callback said why
                state["ended"] = True
                raise self._stream_error(responses) from None

        stop_keepalive = threading.Event()

        def keep_alive() -> None:
            while not stop_keepalive.wait(self.keepalive_s / 4):
                try:
                    request(_NO_SHAPE_FRAMES, _NO_AUDIO, keepalive=True)  # answered by an empty final response
                except InferenceServerException:  # broken: the stream itself reports it
                    return

        keeper = threading.Thread(target=keep_alive, name="lipsync-keepalive", daemon=True)
        if self.keepalive_s:
            keeper.start()

        received = 0  # frames answered
        held: collections.deque[np.ndarray] = collections.deque()  # sent, not yet answered: pasted into
        unanswered: set[str] = set()  # audio and frame requests waiting for their final response, except those
        # that complete a window: the server acknowledges them as it takes them in (UNANSWERED_REQUESTS)

        def take() -> tuple[list[SyncedFrame], str | None]:
            """The next response's synced frames, and the request it completed (None if none)."""
            nonlocal received
            synced, finished = self._next_response(responses, received, held)
            received += len(synced)
            unanswered.discard(finished)
            return synced, finished

        try:
            n_samples = 0
            for chunk in self._audio_pieces(audio):
                if n_samples + chunk.size > MAX_AUDIO_SAMPLES:
                    raise InputError(
                        f"the audio is longer than the server's limit of {MAX_AUDIO_SECONDS} s: sync it in parts"
                    )
                if chunk.size:
                    while len(unanswered) >= self.max_unanswered_requests:
                        take()  # no frames yet: an audio request's final response
                    unanswered.add(send(_NO_SHAPE_FRAMES, chunk, start=n_samples == 0))
                    n_samples += chunk.size
            if n_samples < min_audio_samples():
                raise InputError(f"the audio is too short ({n_samples / SAMPLE_RATE * 1000:.0f} ms)")
            n_frames = num_frames_for_audio(n_samples)
            source = iter(frames(n_frames) if callable(frames) else frames)

            sent, filled, batch, last_request, shape = 0, 0, None, None, None
            # Requests end at each window's end, its last frame alone: the server holds only that one open.
            sizes = iter([stop - start for start, stop in request_spans(n_frames, self.frames_per_request)])
            for position, frame in enumerate(itertools.islice(source, n_frames)):
                if shape is None:
                    if frame.ndim != 3 or frame.shape[2] != 3:
                        raise InputError(f"frames must be RGB (H, W, 3), got shape {frame.shape}")
                    shape = frame.shape
                elif frame.shape != shape:
                    raise InputError(f"frame {position} is {frame.shape}, the first one {shape}")
                if batch is None:
                    batch = np.empty((next(sizes), *shape), np.uint8)  # kept until answered
                batch[filled] = frame
                filled += 1
                is_last = position + 1 == n_frames
                if filled < len(batch):
                    continue
                acknowledged = not completes_window(sent + filled, n_frames)  # else answered with its window
                while sent + filled - received > self.max_inflight_frames or (  # backpressure
                    acknowledged and len(unanswered) >= self.max_unanswered_requests
                ):
                    yield from take()[0]
                last_request = send(batch[:filled], _NO_AUDIO, end=is_last)
                if acknowledged:
                    unanswered.add(last_request)
                held.extend(batch[:filled])
                sent, filled, batch = sent + filled, 0, None
            if sent < n_frames:
                raise InputError(f"the video gave {sent} frames, the audio needs {n_frames}")

            finished = None
            while finished != last_request:
                synced, finished = take()
                yield from synced
            if received != n_frames:
                raise ServerError(f"the server ended the stream after {received} of {n_frames} frames")
            state["completed"] = True
        except ServerUnreachable:
            state["ended"] = True  # nobody left to tell
            raise
        finally:
            stop_keepalive.set()
            if keeper.is_alive():
                keeper.join()
            try:
                if state["started"] and not state["ended"]:
                    self._end_sequence(send, responses)
            finally:
                stream.close(cancel=not state["completed"])

    def _end_sequence(self, send, responses: queue.Queue, wait: float = 1.0) -> None:
        """On abort, tell the server the sequence is over (frees its state and sequence slot), briefly."""
        try:
            request_id = send(_NO_SHAPE_FRAMES, _NO_AUDIO, end=True)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                result, error = responses.get(timeout=left)
                if result is not None and result.get_response().id == request_id:
                    final = result.get_response().parameters.get("triton_final_response")
                    if final is not None and final.bool_param:
                        return
        except (ClientError, InferenceServerException, queue.Empty):
            pass

    def _audio_pieces(self, audio: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """float32 pieces of at most `audio_chunk_samples`, whatever the caller's chunking."""
        for chunk in [audio] if isinstance(audio, np.ndarray) else audio:
            chunk = np.asarray(chunk, np.float32).reshape(-1)
            for start in range(0, len(chunk), self.audio_chunk_samples):
                yield np.ascontiguousarray(chunk[start : start + self.audio_chunk_samples])

    def _next_response(
        self, responses: queue.Queue, received: int, held: collections.deque
    ) -> tuple[list[SyncedFrame], str | None]:
        """The synced frames of the next response (its regions pasted into the `held` frames it answers, taken
        from the left), and the id of the request it completed (None if none)."""
        try:
            result, error = responses.get(timeout=self.response_timeout)
        except queue.Empty:
            raise ServerError(f"no response from the server for {self.response_timeout:.0f} s") from None
        if error is not None:
            raise _classify(error, self.url)
        synced = []
        index = result.as_numpy(FRAME_INDEX)
        if index is not None and len(index):
            faces, boxes, regions = (result.as_numpy(name) for name in (FACE_FOUND, REGION_BOX, REGIONS))
            if faces is None or boxes is None or regions is None or len(faces) != len(index) or len(held) < len(index):
                raise ServerError("malformed response: FRAME_INDEX, FACE_FOUND and REGION_BOX differ in length")
            if not np.array_equal(index, np.arange(received, received + len(index))):
                raise ServerError(f"frames came back out of order: expected index {received}, got {index[0]}")
            frames = [held.popleft() for _ in index]
            try:
                apply_regions(frames, boxes, regions)
            except ContractError as e:
                raise ServerError(f"malformed response: {e}") from None
            for frame in frames:
                frame.flags.writeable = False
            synced = [SyncedFrame(int(i), frame, bool(face)) for i, frame, face in zip(index, frames, faces)]
        response = result.get_response()
        final = response.parameters.get("triton_final_response")
        return synced, response.id if final is not None and final.bool_param else None

    def _stream_error(self, responses: queue.Queue) -> Exception:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                _, error = responses.get(timeout=0.1)
            except queue.Empty:
                continue
            if error is not None:
                return _classify(error, self.url)
        return ServerUnreachable(f"lost the stream to the server at {self.url}")


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else "no details"


def _classify(error: InferenceServerException, url: str) -> Exception:
    status = str(error.status() or "")
    if any(status.endswith(code) for code in _CONNECTION_CODES):
        return ServerUnreachable(f"lost the connection to the server at {url} ({_first_line(error.message())})")
    message = _first_line(error.message())
    if is_stream_dropped_error(message):
        # lipsync (or Triton) no longer knows the sequence: it was dropped after the server's idle timeout
        return StreamExpired(
            f"server error: the server dropped the stream as idle (no request reached it within "
            f"its idle timeout, latentsync-export --idle-timeout-s): {message}"
        )
    if is_server_busy_error(message):
        return ServerBusy(f"server error: {message}")
    return (NoFaceError if is_no_face_error(message) else ServerError)(f"server error: {message}")
