"""The `lipsync` model's stream handling: one `Stream` per Triton sequence, each served on its own thread.

Contract: docs/PROTOCOL.md. Triton's sequence batcher ("oldest" strategy) hands this decoupled model the
requests of up to max_candidate_sequences streams at once; `execute` only routes each request to its stream's
queue and returns, so the BLS calls of concurrent streams are in flight together and the composing models'
dynamic batchers can merge them. Within a stream, requests are handled strictly in order. State is freed at
sequence end, on the first error, on cancellation and after an idle timeout.
"""

from __future__ import annotations

import ctypes
import hmac
import json
import os
import queue
import secrets
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from latentsync_contract import (
    AUDIO,
    FACE_FOUND,
    FRAME_INDEX,
    FRAMES,
    MAX_UNANSWERED_FRAMES,
    REGION_BOX,
    REGIONS,
    STREAM_TOKEN,
    WINDOW,
    ContractError,
    StreamParams,
    busy_message,
    check_audio_length,
    check_audio_range,
    check_audio_shape,
    check_frames_shape,
    check_stream_frames,
    check_stream_token,
    draining_message,
    idle_drop_message,
    internal_error_message,
    num_frames_for_audio,
)
from latentsync_core.configs import VAE_SCALING_FACTOR, VARIANTS, get_variant
from latentsync_core.face.enhance import EnhanceSpec
from latentsync_core.face.mask import fixed_mask
from latentsync_core.face.warm_up import warm_up
from latentsync_core.pipeline import LipSyncStream, WindowedStream, WindowResult

from .backend import ModelContext, avoid_huge_pages, private_array
from .bls import FRAME_CALL_BYTES, TRAFFIC, CallSlots, ModelNames, TritonModels
from .metrics import Metrics, log
from .serve import DRAIN_FILE_ENV, INTERNAL_KEY_ENV

SEQUENCE_START, SEQUENCE_END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_*
CPU = torch.device("cpu")
RESPONSES = "<responses>"  # the CallSlots key of the window responses sent to clients
INGEST_BACKLOG_FRAMES = 4  # queued frames of a stream past which a request's final waits for its ingestion


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ServiceSettings:
    """The lipsync model's config parameters (written by latentsync-export)."""

    denoisers: dict[str, str]  # variant -> denoiser model name; the first is the default variant
    names: ModelNames = field(default_factory=ModelNames)
    vae_scale: float = VAE_SCALING_FACTOR
    audio_max_batch: int = 8
    idle_timeout_s: float = 300.0
    random_weights: bool = False
    track_faces: bool = False  # face_detector policy "track": send each stream's previous box
    overlap: bool = True  # prepare a stream's next window while the current one denoises
    calls_per_model: int = 2  # BLS calls (and responses) in flight per callee (bls.CallSlots); 0: no limit
    frame_call_bytes: int = FRAME_CALL_BYTES  # frames or faces per face_detector / restorer call (bls.call_spans)
    ingest_backlog_frames: int = INGEST_BACKLOG_FRAMES  # see Stream._answered_on_arrival
    max_streams: int = 0  # Triton's sequence slots (--max-streams); streams open or finishing: at most twice that

    @classmethod
    def from_params(cls, p: Mapping[str, str]) -> ServiceSettings:
        denoisers = dict(item.split("=", 1) for item in p["denoiser_models"].split(",") if item.strip())
        names = ModelNames(
            **{
                k: p[f"{k}_model"]
                for k in ("face_detector", "audio_encoder", "vae_encoder", "vae_decoder", "restorer", "enhancer")
                if f"{k}_model" in p
            }
        )
        flag = lambda key, default: p.get(key, default).strip().lower() == "true"  # noqa: E731
        return cls(
            {k.strip(): v.strip() for k, v in denoisers.items()},
            names,
            vae_scale=float(p.get("vae_scaling_factor", VAE_SCALING_FACTOR)),
            audio_max_batch=int(p.get("audio_encoder_max_batch", 8)),
            idle_timeout_s=float(p.get("stream_idle_timeout_s", 300)),
            random_weights=flag("random_weights", "false"),
            track_faces=p.get("face_policy", "largest") == "track",
            overlap=flag("overlap_windows", "true"),
            calls_per_model=int(p.get("calls_per_model", 2)),
            # repositories built before the restorer's calls were split name it detector_call_bytes
            frame_call_bytes=int(p.get("frame_call_bytes", p.get("detector_call_bytes", FRAME_CALL_BYTES))),
            ingest_backlog_frames=int(p.get("ingest_backlog_frames", INGEST_BACKLOG_FRAMES)),
            max_streams=int(p.get("max_streams", 0)),  # 0: a repository built before the bound
        )


# ---------------------------------------------------------------------------------------------------- stream
@dataclass(eq=False)
class _Request:
    """A request of the stream: its windows' responses and then its final response go to its sender."""

    sender: Any
    closed: bool = False


@dataclass(eq=False)
class _Incoming:
    """What a stream needs of one request, taken out of it in `execute`: a request's input tensors stay in the
    Python backend's shared-memory pool for as long as the request object lives, and that pool never shrinks, so
    requests queued behind a stream's windows would grow it by their frames (docs/OPERATIONS.md "Memory"). The
    stub's arrays of them are its own copies, which outlive the request (backend.private_array)."""

    sender: Any
    flags: int
    parameters: str
    frames: np.ndarray | None
    audio: np.ndarray | None
    request: _Request | None = None  # its responses' state, made when it arrives
    acknowledge_when_taken: bool = False  # its final response waits until the stream thread takes it
    overrun: str | None = None  # why its tensors were not queued (Stream.put): the stream fails with this
    failure: Exception | None = None  # what failed while execute took it (Stream.put_failed): the stream fails

    @classmethod
    def take(cls, pb, request, sender) -> _Incoming:
        def owned(name: str) -> np.ndarray | None:
            tensor = pb.get_input_tensor_by_name(request, name)
            return None if tensor is None else private_array(tensor.as_numpy())

        return cls(sender, request.flags(), request.parameters() or "", owned(FRAMES), owned(AUDIO))


class Stream:
    """One client stream: the requests of one sequence, handled in order on this stream's thread; with overlap,
    each window's denoising and paste-back finish on a second thread while the next window is prepared."""

    def __init__(self, service: LipSyncService, stream_id, token: str | None = None):
        self.service, self.pb, self.id = service, service.pb, stream_id
        self.token = token  # its owner's STREAM_TOKEN (None: an old client sent none)
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.params: StreamParams | None = None
        self.audio: list[np.ndarray] = []
        self.samples = 0  # audio samples received
        self.windows: WindowedStream | None = None  # once the first frames arrived
        self.error: str | None = None
        self.busy = False
        self.last_active = time.monotonic()
        self.arrived_samples = self.arrived_frames = 0  # counted in execute, as requests arrive
        self.arrived_shape: tuple | None = None
        self.taken_frames = 0  # frames of requests the stream thread took from its queue (written by it alone)
        self._send_lock = threading.Lock()
        self._error_lock = threading.Lock()  # a window worker and the stream thread may fail it at once
        self.thread = threading.Thread(target=self._run, name=f"lipsync-stream-{stream_id}", daemon=True)
        self.thread.start()

    def put(self, incoming: _Incoming) -> None:
        self.last_active = time.monotonic()
        incoming.request = _Request(incoming.sender)
        queued = self.arrived_frames - self.taken_frames  # frames waiting in the queue, before this request
        incoming.overrun = self._overrun(incoming, queued)
        if incoming.overrun is not None:  # not kept: the stream fails, in order, on its thread
            incoming.frames = incoming.audio = None
        elif self._acknowledgeable(incoming):
            if queued < self.service.settings.ingest_backlog_frames:
                self._send(incoming.request, None, final=True)  # Triton frees the request and its gRPC message now
            else:
                incoming.acknowledge_when_taken = True
        self.requests.put(incoming)

    def put_failed(self, sender, flags: int, failure: Exception) -> None:
        """A request that execute could not take (`LipSyncService.submit`): the stream fails with it, in order, on
        its thread, which answers it."""
        self.last_active = time.monotonic()
        self.requests.put(_Incoming(sender, flags, "", None, None, request=_Request(sender), failure=failure))

    def _overrun(self, incoming: _Incoming, queued: int) -> str | None:
        """Why the request would queue more than a stream may hold, if it would: its frames beyond
        MAX_UNANSWERED_FRAMES waiting (a client that does not wait for answers), or audio beyond a stream's whole
        track. A client within the contract never gets there; one that is not cannot make the server hold
        unbounded video or audio for it (docs/THREAT-MODEL.md)."""
        frames = 0 if incoming.frames is None else len(incoming.frames)
        if frames and queued + frames > MAX_UNANSWERED_FRAMES:
            return (
                f"stream {self.id} sent more than {MAX_UNANSWERED_FRAMES} frames that are not answered yet: wait for "
                "the answers (latentsync_contract.MAX_UNANSWERED_FRAMES)"
            )
        if incoming.audio is not None and incoming.audio.size:
            try:  # the contract's check on the stream's audio so far, as the stream thread makes it again later
                check_audio_shape((incoming.audio.size,), self.arrived_samples)
            except ContractError as e:
                return str(e)
        return None

    def _acknowledgeable(self, incoming: _Incoming) -> bool:
        """Called in arrival order, in execute. A request of frames that completes no window, does not end the
        stream and passes every check that can fail on its own (shape, audio first, one frame size, within the
        audio's frame count) will get nothing but its final response, its acknowledgement. It is sent at once if
        fewer than `ingest_backlog_frames` of the stream's frames wait in its queue, else when the stream thread
        takes the request from the queue. A client that keeps at most two such requests unanswered
        (latentsync_contract.UNANSWERED_REQUESTS) is so held back while the server falls behind: whole frames
        waiting for ingestion stay a few requests, not all that the client may send ahead (docs/OPERATIONS.md
        "Memory"). Other requests stay open until the stream thread has handled them (errors) and their windows are
        sent to them."""
        frames, audio, before = incoming.frames, incoming.audio, self.arrived_frames
        if audio is not None and audio.size:
            self.arrived_samples += audio.size
        if frames is None or not len(frames):
            return False
        self.arrived_frames += len(frames)
        shape, self.arrived_shape = self.arrived_shape, self.arrived_shape or frames.shape[1:]
        try:  # the rules the stream thread applies (_consume, WindowedStream.push), on the counts so far
            check_frames_shape(frames.shape)
            check_stream_frames(shape, frames.shape, before, num_frames_for_audio(self.arrived_samples))
        except ContractError:
            return False
        return (
            self.error is None
            and not incoming.flags & SEQUENCE_END
            and (audio is None or not audio.size)
            and self.arrived_samples > 0
            and before // WINDOW == self.arrived_frames // WINDOW  # completes no window
        )

    def close(self) -> None:
        self.requests.put(None)  # after the requests already queued

    def idle_for(self) -> float:
        working = self.busy or not self.requests.empty() or (self.windows is not None and self.windows.in_flight)
        return 0.0 if working else time.monotonic() - self.last_active

    def _run(self) -> None:
        while (incoming := self.requests.get()) is not None:
            self.busy = True
            self.taken_frames += 0 if incoming.frames is None else len(incoming.frames)
            if incoming.acknowledge_when_taken and self.error is None:  # out of the queue: the client may send more
                self._send(incoming.request, None, final=True)
            try:
                self._handle(incoming.request or _Request(incoming.sender), incoming)
            finally:
                self.busy, self.last_active = False, time.monotonic()
        if self.windows is not None:
            done = threading.Event()
            self.windows.after(done.set)  # the windows still in flight, then this stream is finished
            self.windows.close()
            done.wait()
        self.windows, self.audio = None, []
        _return_free_memory()
        self.service.finished(self)

    # ------------------------------------------------------------------------------------------ one request
    def _handle(self, req: _Request, incoming: _Incoming) -> None:
        if self.error is not None:
            self._send(req, self._error(f"stream {self.id} already failed: {self.error}"), final=True)
            return
        if incoming.overrun is not None or incoming.failure is not None:
            self._fail(incoming.failure or ContractError(incoming.overrun), req)
            return
        try:
            if self.params is None:
                settings = self.service.settings
                self.params = StreamParams.parse(
                    json.loads(incoming.parameters or "{}"),
                    list(settings.denoisers),
                    enhancer=bool(settings.names.enhancer),
                )
            answers = self._consume(incoming, req)
        except Exception as e:  # noqa: BLE001 - every failure ends the stream with a message to the client
            self._fail(e, req)
            return
        if answers:
            self.windows.after(lambda: self._close(req))
        else:  # nothing more will go to this request: final now, which releases it and its inputs in Triton
            self._close(req)

    def _consume(self, incoming: _Incoming, req: _Request) -> bool:
        """Take a request's audio and frames; True if it completed a window or ended the stream (its final response
        then waits for those windows, which are sent to it)."""
        audio, frames = incoming.audio, incoming.frames
        if audio is not None and audio.size:
            if self.windows is not None:
                raise ContractError(
                    "AUDIO arrived after FRAMES: send the whole audio track first "
                    "(upstream normalises the log-mel over the whole track)"
                )
            check_audio_shape(audio.shape, self.samples)  # the 300 s limit over the whole stream
            check_audio_range(float(audio.min()), float(audio.max()))
            self.audio.append(audio)  # owned: copied out in execute
            self.samples += audio.size
        if frames is not None and len(frames):
            check_frames_shape(frames.shape)
            if self.windows is None:
                self.windows = WindowedStream(
                    self._start(), self._deliver, self._fail, overlap=self.service.settings.overlap
                )
            self._check_cancelled(req)
            incoming.frames = None  # the windows hold what they need of them
            answers = self.windows.push(frames, req) > 0
        else:
            answers = False
        if incoming.flags & SEQUENCE_END and self.windows is not None:
            self._check_cancelled(req)
            self.windows.end(req)
            answers = True
        return answers

    def _start(self) -> LipSyncStream:
        if not self.audio:
            raise ContractError("FRAMES before AUDIO: send the whole 16 kHz audio track first")
        p = self.params
        enhance = EnhanceSpec(p.enhance_blend, p.enhance_min_sharpness) if p.enhance else None
        lipsync = LipSyncStream(
            self.service.backend(p.variant),
            p.variant,
            p.steps,
            p.guidance,
            p.seed,
            device=self.service.device,
            sampler=p.sampler,
            deepcache=p.deepcache,
            enhance=enhance,
            max_yaw=p.max_yaw,
        )
        samples, self.audio = np.concatenate(self.audio), []
        check_audio_length(samples.size)  # what else set_audio raises is the server's (a model call, memory)
        lipsync.set_audio(samples)
        return lipsync

    @staticmethod
    def _check_cancelled(req: _Request) -> None:
        if not req.closed and req.sender.is_cancelled():
            raise ContractError("the client cancelled the stream")

    # ------------------------------------------------------------------------------------------ responses
    def _deliver(self, result: WindowResult, req: _Request) -> None:
        with self.service.slots(RESPONSES):  # the regions are copied into the pool until the response is sent
            self._send(req, self._response(result))

    def _close(self, req: _Request) -> None:
        """A request's final response, after its windows (an error if the stream failed meanwhile)."""
        if self.error is not None:
            self._send(req, self._error(f"stream {self.id} already failed: {self.error}"), final=True)
        else:
            self._send(req, None, final=True)

    def _fail(self, e: BaseException, req: _Request) -> None:
        """The first error ends the stream: it answers the request it happened in; later ones get 'already failed'."""
        if self._first_error(lambda: client_text(self.pb, self.id, e)):
            self.audio = []
            if self.windows is not None:
                self.windows.failed = self.windows.failed or e
        self._send(req, self._error(self.error), final=True)

    def _first_error(self, describe) -> bool:
        """Set the stream's error to `describe()` unless it has one (only the first is described, logged and told)."""
        with self._error_lock:
            if self.error is not None:
                return False
            self.error = describe()
            return True

    def _send(self, req: _Request, response, final: bool = False) -> None:
        """Send on the request's sender. A send that fails (the client is gone, the pool cannot grow) closes the
        request and fails the stream, never the thread that sent: the stream must still reach `finished`."""
        with self._send_lock:
            if req.closed:
                return
            req.closed = final
            flags = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
            try:
                if response is None:
                    req.sender.send(flags=flags)
                else:
                    req.sender.send(response, flags=flags)
            except Exception as e:  # noqa: BLE001 - logged; the stream ends with it
                if not final:  # one try to complete the request anyway, or Triton keeps it until the client leaves
                    try:
                        req.sender.send(flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    except Exception:  # noqa: BLE001, S110 - the client is gone: nothing more to do
                        pass
                req.closed = True
                if self._first_error(lambda: "a response could not be sent (the client left, or the server failed)"):
                    if self.windows is not None:
                        self.windows.failed = self.windows.failed or e
                # the details for the log only (later requests of the stream are told `self.error`)
                log(
                    self.pb, "warn", f"lipsync: stream {self.id}: a response could not be sent: {type(e).__name__}: {e}"
                )

    def _response(self, r: WindowResult):
        pb = self.pb
        return pb.InferenceResponse(
            output_tensors=[
                pb.Tensor(FRAME_INDEX, r.indices.astype(np.int64)),
                pb.Tensor(FACE_FOUND, r.face_found.astype(bool)),
                pb.Tensor(REGION_BOX, np.ascontiguousarray(r.boxes, np.int32)),
                pb.Tensor(REGIONS, r.packed_regions()),
            ]
        )

    def _error(self, message: str):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message))


# ---------------------------------------------------------------------------------------------------- service
class LipSyncService:
    """Routes requests to their streams; frees streams at end, on error (at the end) and when idle.

    A sequence id belongs to the client that started it: requests of a live stream must carry its STREAM_TOKEN
    (or none, if its START had none), and a START on a live id is refused unless it carries that token. While
    latentsync-serve drains (its flag file exists) new streams are refused and open ones finish."""

    def __init__(
        self,
        pb_utils,
        settings: ServiceSettings,
        model: str = "lipsync",
        device: torch.device = CPU,
        mask_image: Path | None = None,
    ):
        self.pb, self.settings, self.device, self.mask_image = pb_utils, settings, device, mask_image
        self.streams: dict[Any, Stream] = {}
        self.dropped: dict[Any, float] = {}  # stream id -> when it was dropped as idle (for the message)
        self.drain_file = os.environ.get(DRAIN_FILE_ENV)
        self.internal_key = os.environ.get(INTERNAL_KEY_ENV, "")  # what the models it calls ask of each call
        self.lock = threading.Lock()
        self.running: set[Stream] = set()  # streams whose thread has not finished
        self.slots = CallSlots(settings.calls_per_model)  # shared by the streams: bounds the pools' growth
        self.metrics = Metrics(
            pb_utils,
            model,
            counters=TRAFFIC,
            gauges={
                "lipsync_open_streams": "Streams started and not yet finished (last response sent), failed-and-ended "
                "or dropped as idle"
            },
        )
        self._count()  # the gauge exists from the start (at 0), not from the first stream or reaper tick
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_idle, name="lipsync-reaper", daemon=True)
        self._reaper.start()

    @classmethod
    def from_args(cls, args: Mapping[str, str], pb_utils) -> LipSyncService:
        ctx = ModelContext.from_args(args, internal=False)  # the model clients call; also applies torch_threads
        avoid_huge_pages()  # the stub's copy of each request: 25 MB of fresh memory
        settings = ServiceSettings.from_params(ctx.params)
        if settings.random_weights:
            log(pb_utils, "warn", "lipsync: this repository uses RANDOM test weights; output is not lip-synced")
        mask = ctx.path("mask") if ctx.params.get("mask") else None  # upstream's mask.png, if the weights had it
        if mask is not None:
            for variant in settings.denoisers:  # read now: a bad image fails the model's load, not each stream
                fixed_mask(get_variant(variant).resolution, mask)
        resolutions = {VARIANTS[v].resolution for v in settings.denoisers if v in VARIANTS}  # others fail per stream
        seconds = sum(warm_up(resolution) for resolution in sorted(resolutions))
        log(pb_utils, "info", f"{ctx.name}: face path compiled and ready in {seconds:.1f} s")
        return cls(pb_utils, settings, ctx.name, ctx.device, mask)

    def backend(self, variant: str) -> TritonModels:
        """A stream's model calls: its variant's denoiser, on this instance's device."""
        names = ModelNames(**{**self.settings.names.__dict__, "denoiser": self.settings.denoisers[variant]})
        return TritonModels(
            self.pb,
            names,
            self.settings.vae_scale,
            self.metrics,
            self.device,
            self.settings.audio_max_batch,
            self.settings.track_faces,
            self.slots,
            self.settings.frame_call_bytes,
            self.internal_key,
            self.mask_image,
        )

    def submit(self, request) -> None:
        """Route one request to its stream (on execute's thread). What fails unexpectedly here (memory for the
        request's copy, a thread that cannot start) is answered as `client_text` answers it, never by Triton, which
        would send the client the exception's text and traceback; the stream it was meant for fails with it."""
        sender, stream_id, flags = request.get_response_sender(), request.correlation_id(), request.flags()
        stream = None
        try:
            stream = self._admitted(request, sender)
            if stream is not None:
                stream.put(_Incoming.take(self.pb, request, sender))
        except Exception as e:  # noqa: BLE001 - see above
            if stream is not None:
                stream.put_failed(sender, flags, e)
            else:
                _answer_failure(self.pb, sender, stream_id, client_text(self.pb, stream_id, e))
        finally:
            if stream is not None and flags & SEQUENCE_END:
                stream.close()

    def _admitted(self, request, sender) -> Stream | None:
        """The stream a request goes to, started by it if it has START; None if it was refused (and answered)."""
        stream_id, flags = request.correlation_id(), request.flags()
        try:
            token, refusal = check_stream_token(json.loads(request.parameters() or "{}").get(STREAM_TOKEN)), None
        except ContractError as e:
            token, refusal = None, str(e)
        with self.lock:
            stream = self.streams.get(stream_id)
            refusal = refusal or self._refusal(stream_id, flags, stream, token)
            if refusal is None:
                if flags & SEQUENCE_START:
                    if stream is not None:
                        stream.close()
                    stream = self.streams[stream_id] = Stream(self, stream_id, token)
                    self.running.add(stream)
                    self.dropped.pop(stream_id, None)
                if flags & SEQUENCE_END:
                    del self.streams[stream_id]
                self._count()
            elif flags & SEQUENCE_END and stream is not None:
                # Triton ended the sequence and freed its slot whatever lipsync answers: the stream can get no more
                # requests. It ends here too (with what it has), or a refused END would leave its state behind
                # Triton's bound on streams until the idle timeout.
                del self.streams[stream_id]
            else:
                stream = None
        if refusal is not None:  # the stream of this id, if any, is left as it was (or closed: see above)
            try:
                _answer_failure(self.pb, sender, stream_id, refusal)
            finally:  # a stream out of `streams` must still end, or it is running (and counted) for good
                if stream is not None:
                    stream.close()
            return None
        return stream

    def _refusal(self, stream_id, flags: int, stream: Stream | None, token: str | None) -> str | None:
        """Why a request may not touch the stream of its id (None: it may)."""
        if flags & SEQUENCE_START:
            if self.drain_file and os.path.exists(self.drain_file):
                return draining_message(stream_id)
            cap = 2 * self.settings.max_streams
            if cap and len(self.running) >= cap:
                # Triton frees a slot at its stream's END, while lipsync finishes that stream's last windows (and a
                # restarted stream's old one finishes too)
                return busy_message(len(self.running), cap)
            if stream is not None and not (stream.token is not None and _same_token(stream.token, token)):
                return (
                    f"sequence_id {stream_id} is in use by another stream: a new stream needs an id of its own "
                    "(or end the open one first)"
                )
            return None
        if stream is None:
            if stream_id in self.dropped:
                return idle_drop_message(stream_id, self.settings.idle_timeout_s)
            return f"unknown stream {stream_id}: its first request must set sequence_start"
        if not _same_token(stream.token, token):
            return (
                f"sequence_id {stream_id} is in use by another client: this request's '{STREAM_TOKEN}' is not the "
                "one its stream was started with"
            )
        return None

    def _reap_idle(self) -> None:
        period = max(0.2, min(5.0, self.settings.idle_timeout_s / 4))
        while not self._stop.wait(period):
            with self.lock:
                now = time.monotonic()
                idle = [k for k, s in self.streams.items() if s.idle_for() > self.settings.idle_timeout_s]
                for k in idle:
                    self.streams.pop(k).close()
                    self.dropped[k] = now
                # Triton keeps a dropped sequence's slot for up to another idle timeout (latentsync-export sets
                # its own timeout to twice ours); after that Triton itself refuses the id's requests.
                for k in [k for k, t in self.dropped.items() if now - t > self.settings.idle_timeout_s]:
                    del self.dropped[k]
                self._count()

    def finished(self, stream: Stream) -> None:
        """A stream's thread is done: it sent its last response and freed its state."""
        with self.lock:
            self.running.discard(stream)
            self._count()

    def _count(self) -> None:
        self.metrics.set("lipsync_open_streams", len(self.running))

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self.lock:
            streams, self.streams = list(self.streams.values()), {}
        for s in streams:
            s.close()
        for s in streams:
            s.thread.join(timeout)


def client_text(pb_utils, stream_id, e: BaseException) -> str:
    """What a client is told of its stream's failure `e`. A ContractError names the client's own mistake and is
    sent as it is. Anything else is the server's (a model call, the device, memory, a bug): its text names models,
    devices, paths and sizes, which are not the client's business (docs/THREAT-MODEL.md), so it goes to the
    server's log with its traceback under a random id, and the client gets only that id to quote."""
    if isinstance(e, ContractError):
        return str(e)
    error_id = secrets.token_hex(4)
    details = "".join(traceback.format_exception(e)).rstrip()
    log(pb_utils, "error", f"lipsync: stream {stream_id}: error {error_id}: {details}")
    return internal_error_message(stream_id, error_id)


def _answer_failure(pb_utils, sender, stream_id, message: str) -> None:
    """A request's final response, an error, sent from execute; a send that fails leaves it to Triton (the client
    left)."""
    try:
        sender.send(
            pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
        )
    except Exception as e:  # noqa: BLE001 - nothing more can be done for this request
        log(pb_utils, "warn", f"lipsync: stream {stream_id}: an error could not be sent: {e}")


def _same_token(a: str | None, b: str | None) -> bool:
    """Both absent, or both present and equal (compared in constant time)."""
    return a is None and b is None or a is not None and b is not None and hmac.compare_digest(a.encode(), b.encode())


def _return_free_memory() -> None:
    """Hand the heap an ended stream freed back to the OS: glibc keeps freed blocks in its arenas otherwise (a
    300 s stream left ~90 MB resident in this process for good)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
