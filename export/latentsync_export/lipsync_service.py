"""The `lipsync` model's stream handling: one `Stream` per Triton sequence, each served on its own thread.

Contract: docs/PROTOCOL.md. Triton's sequence batcher ("oldest" strategy) hands this decoupled model the
requests of up to max_candidate_sequences streams at once; `execute` only routes each request to its stream's
queue and returns, so the BLS calls of concurrent streams are in flight together and the composing models'
dynamic batchers can merge them. Within a stream, requests are handled strictly in order. State is freed at
sequence end, on the first error, on cancellation and after an idle timeout.
"""
from __future__ import annotations

import json
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from latentsync_core.configs import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, NUM_FRAMES
from latentsync_core.pipeline import LipSyncStream, WindowResult

from .backend_utils import ModelContext
from .bls import ModelNames, TritonModels

SEQUENCE_START, SEQUENCE_END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_*
MAX_STEPS = 100
MAX_GUIDANCE = 20.0
MAX_FRAME_SIDE = 4096   # pixels per side (4K UHD either way up); one window of such frames is ~800 MB as float
PARAMETERS = ("steps", "guidance", "seed", "variant")


class StreamError(ValueError):
    """A problem with what the client sent; the message names the input or parameter."""


# ---------------------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class StreamParams:
    variant: str
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = DEFAULT_SEED

    @classmethod
    def parse(cls, raw: Mapping[str, Any], variants: Sequence[str]) -> "StreamParams":
        """Request parameters of the first request -> validated stream parameters (defaults for absent ones)."""
        unknown = sorted(k for k in raw if k not in PARAMETERS)
        if unknown:
            raise StreamError(f"unknown parameter '{unknown[0]}'; expected some of {', '.join(PARAMETERS)}")
        steps = _number(raw, "steps", DEFAULT_STEPS, int)
        if not 1 <= steps <= MAX_STEPS:
            raise StreamError(f"parameter 'steps' must be in 1..{MAX_STEPS}, got {steps}")
        guidance = _number(raw, "guidance", DEFAULT_GUIDANCE, float)
        if not (math.isfinite(guidance) and 1.0 <= guidance <= MAX_GUIDANCE):
            raise StreamError(f"parameter 'guidance' must be in [1, {MAX_GUIDANCE:g}] (1 = no guidance), got {guidance}")
        seed = _number(raw, "seed", DEFAULT_SEED, int)
        if not 0 <= seed < 2**63:
            raise StreamError(f"parameter 'seed' must be in 0..2^63-1, got {seed}")
        variant = str(raw.get("variant", variants[0]))
        if variant not in variants:
            raise StreamError(f"parameter 'variant' must be one of {', '.join(variants)} "
                              f"(the variants this repository was built with), got {variant!r}")
        return cls(variant, steps, guidance, seed)


def _number(raw: Mapping[str, Any], key: str, default, kind):
    value = raw.get(key, default)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise StreamError(f"parameter '{key}' must be {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}") from None


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ServiceSettings:
    """The lipsync model's config parameters (written by latentsync-export)."""

    unet_models: dict[str, str]       # variant -> UNet model name; the first is the default variant
    names: ModelNames = field(default_factory=ModelNames)
    vae_scale: float = 0.18215
    audio_max_batch: int = 8
    idle_timeout_s: float = 300.0
    random_weights: bool = False
    track_faces: bool = False          # face_detector policy "track": send each stream's previous box
    unet_step_batching: bool = False   # merge concurrent streams' UNet steps here (step_batcher.StepBatcher)
    unet_max_batch: int = 8

    @classmethod
    def from_params(cls, p: Mapping[str, str]) -> "ServiceSettings":
        unet = dict(item.split("=", 1) for item in p["unet_models"].split(",") if item.strip())
        names = ModelNames(**{k: p[f"{k}_model"] for k in ("face_detector", "audio_encoder", "vae_encoder",
                                                           "vae_decoder", "restorer") if f"{k}_model" in p})
        flag = lambda key: p.get(key, "false").strip().lower() == "true"  # noqa: E731
        return cls({k.strip(): v.strip() for k, v in unet.items()}, names,
                   vae_scale=float(p.get("vae_scaling_factor", 0.18215)),
                   audio_max_batch=int(p.get("audio_encoder_max_batch", 8)),
                   idle_timeout_s=float(p.get("stream_idle_timeout_s", 300)),
                   random_weights=flag("random_weights"), track_faces=p.get("face_policy", "largest") == "track",
                   unet_step_batching=flag("unet_step_batching"), unet_max_batch=int(p.get("unet_max_batch", 8)))

    def backend(self, pb_utils, variant: str, unet_batcher=None) -> TritonModels:
        names = ModelNames(**{**self.names.__dict__, "unet": self.unet_models[variant]})
        return TritonModels(pb_utils, names, self.vae_scale, self.audio_max_batch, self.track_faces, unet_batcher)


# ---------------------------------------------------------------------------------------------------- stream
class Stream:
    """One client stream: the requests of one sequence, handled in order on this stream's thread."""

    def __init__(self, service: "LipSyncService", stream_id):
        self.service, self.pb, self.id = service, service.pb, stream_id
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.params: StreamParams | None = None
        self.audio: list[np.ndarray] = []
        self.lipsync: LipSyncStream | None = None
        self.pending: list[np.ndarray] = []   # received frames not yet in a window
        self.frame_hw: tuple[int, int] | None = None
        self.received = self.done = self.with_face = 0
        self.error: str | None = None
        self.busy = False
        self.last_active = time.monotonic()
        self.thread = threading.Thread(target=self._run, name=f"lipsync-stream-{stream_id}", daemon=True)
        self.thread.start()

    def put(self, request) -> None:
        self.last_active = time.monotonic()
        self.requests.put(request)

    def close(self) -> None:
        self.requests.put(None)  # after the requests already queued

    def idle_for(self) -> float:
        return 0.0 if self.busy or not self.requests.empty() else time.monotonic() - self.last_active

    def _run(self) -> None:
        while (request := self.requests.get()) is not None:
            self.busy = True
            self.service.working(+1)
            try:
                self._handle(request)
            finally:
                self.busy, self.last_active = False, time.monotonic()
                self.service.working(-1)
        self._free()

    def _free(self) -> None:
        self.lipsync, self.audio, self.pending = None, [], []

    # ------------------------------------------------------------------------------------------ one request
    def _handle(self, request) -> None:
        sender = request.get_response_sender()
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if self.error is not None:
            sender.send(self._error(f"stream {self.id} already failed: {self.error}"), flags=final)
            return
        try:
            if self.params is None:
                self.params = StreamParams.parse(json.loads(request.parameters() or "{}"),
                                                 list(self.service.settings.unet_models))
            for result in self._consume(request, sender):
                sender.send(self._response(result))
            sender.send(flags=final)
        except Exception as e:  # noqa: BLE001 - every failure ends the stream with a message to the client
            self.error = str(e) if isinstance(e, StreamError) else f"{type(e).__name__}: {e}"
            self._free()
            sender.send(self._error(self.error), flags=final)

    def _consume(self, request, sender):
        audio, frames = self._input(request, "AUDIO"), self._input(request, "FRAMES")
        if audio is not None and audio.size:
            if self.lipsync is not None:
                raise StreamError("AUDIO arrived after FRAMES: send the whole audio track first "
                                  "(upstream normalises the log-mel over the whole track)")
            if audio.ndim != 1:
                raise StreamError(f"AUDIO must be 1-D 16 kHz samples, got shape {list(audio.shape)}")
            self.audio.append(np.array(audio, np.float32, copy=True))
        if frames is not None and len(frames):
            self._add_frames(frames)
            while sum(map(len, self.pending)) >= NUM_FRAMES:
                yield self._window(sender, NUM_FRAMES)
        if request.flags() & SEQUENCE_END:
            if self.pending:
                yield self._window(sender, sum(map(len, self.pending)))
            if self.done and not self.with_face:
                raise StreamError(f"no face found in any of the {self.done} frames of the stream")

    def _add_frames(self, frames: np.ndarray) -> None:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise StreamError(f"FRAMES must be [n, H, W, 3] RGB uint8, got shape {list(frames.shape)}")
        if len(frames) > NUM_FRAMES:
            raise StreamError(f"FRAMES holds {len(frames)} frames; at most {NUM_FRAMES} per request")
        if max(frames.shape[1:3]) > MAX_FRAME_SIDE:
            raise StreamError(f"FRAMES are {frames.shape[2]}x{frames.shape[1]} pixels; at most {MAX_FRAME_SIDE} "
                              "per side (scale the video down)")
        if self.frame_hw is None:
            self.frame_hw = frames.shape[1:3]
        elif frames.shape[1:3] != self.frame_hw:
            raise StreamError(f"FRAMES size changed from {list(self.frame_hw)} to {list(frames.shape[1:3])} "
                              "within the stream")
        if self.lipsync is None:
            self._start()
        total = self.lipsync.num_frames
        if self.received + len(frames) > total:
            raise StreamError(f"FRAMES: frame {total} and later are past the end of the audio, which covers "
                              f"{total} frames (send num_frames_for_audio(len(audio)) frames)")
        self.received += len(frames)
        self.pending.append(np.array(frames, copy=True))  # the request's memory is released after execute

    def _start(self) -> None:
        if not self.audio:
            raise StreamError("FRAMES before AUDIO: send the whole 16 kHz audio track first")
        p = self.params
        backend = self.service.settings.backend(self.pb, p.variant, self.service.unet_batchers.get(p.variant))
        self.lipsync = LipSyncStream(backend, p.variant, p.steps, p.guidance, p.seed)
        samples, self.audio = np.concatenate(self.audio), []
        try:
            self.lipsync.set_audio(samples)
        except ValueError as e:
            raise StreamError(f"AUDIO: {e}") from None

    def _window(self, sender, n: int) -> WindowResult:
        if sender.is_cancelled():
            raise StreamError("the client cancelled the stream")
        frames = np.concatenate(self.pending)
        window, rest = frames[:n], frames[n:]
        self.pending = [rest] if len(rest) else []
        result = self.lipsync.process(window)
        self.done += len(window)
        self.with_face += int(result.face_found.sum())
        return result

    # ------------------------------------------------------------------------------------------ tensors
    def _input(self, request, name: str) -> np.ndarray | None:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _response(self, r: WindowResult):
        pb = self.pb
        return pb.InferenceResponse(output_tensors=[
            pb.Tensor("FRAMES", np.ascontiguousarray(r.frames)),
            pb.Tensor("FRAME_INDEX", r.indices.astype(np.int64)),
            pb.Tensor("FACE_FOUND", r.face_found.astype(bool))])

    def _error(self, message: str):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message))


# ---------------------------------------------------------------------------------------------------- service
class LipSyncService:
    """Routes requests to their streams; frees streams at end, on error (at the end) and when idle."""

    def __init__(self, pb_utils, settings: ServiceSettings, model: str = "lipsync"):
        self.pb, self.settings = pb_utils, settings
        self.streams: dict[Any, Stream] = {}
        self.lock = threading.Lock()
        self.metrics = _gauge(pb_utils, "lipsync_open_streams",
                              "Streams started and not yet ended, failed-and-ended or timed out", model)
        self._working, self._working_lock = 0, threading.Lock()
        self.unet_batchers: dict[str, Any] = {}
        if settings.unet_step_batching:
            from .step_batcher import StepBatcher

            transport = settings.backend(pb_utils, next(iter(settings.unet_models)))
            self.unet_batchers = {
                v: StepBatcher(lambda inputs, m=m: transport.call(m, dict(inputs), ["NOISE_PRED"]),
                               expected=self.working_streams, max_batch=settings.unet_max_batch)
                for v, m in settings.unet_models.items()}
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_idle, name="lipsync-reaper", daemon=True)
        self._reaper.start()

    @classmethod
    def from_args(cls, args: Mapping[str, str], pb_utils) -> "LipSyncService":
        ctx = ModelContext.from_args(args)  # also applies torch_threads
        settings = ServiceSettings.from_params(ctx.params)
        if settings.random_weights:
            _log(pb_utils, "warn", "lipsync: this repository uses RANDOM test weights; output is not lip-synced")
        return cls(pb_utils, settings, ctx.name)

    def submit(self, request) -> None:
        stream_id, flags = request.correlation_id(), request.flags()
        with self.lock:
            stream = self.streams.get(stream_id)
            if flags & SEQUENCE_START:
                if stream is not None:
                    stream.close()
                stream = self.streams[stream_id] = Stream(self, stream_id)
            if stream is not None and flags & SEQUENCE_END:
                del self.streams[stream_id]
            self._count()
        if stream is None:
            request.get_response_sender().send(
                self.pb.InferenceResponse(error=self.pb.TritonError(
                    f"unknown stream {stream_id}: its first request must set sequence_start "
                    f"(or it was dropped after {self.settings.idle_timeout_s:g} s idle)")),
                flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        stream.put(request)
        if flags & SEQUENCE_END:
            stream.close()

    def _reap_idle(self) -> None:
        period = max(0.2, min(5.0, self.settings.idle_timeout_s / 4))
        while not self._stop.wait(period):
            with self.lock:
                idle = [k for k, s in self.streams.items() if s.idle_for() > self.settings.idle_timeout_s]
                for k in idle:
                    self.streams.pop(k).close()
                self._count()

    def working(self, delta: int) -> None:
        with self._working_lock:
            self._working += delta

    def working_streams(self) -> int:
        """Streams handling a request right now (those whose next UNet step may join a batch)."""
        return self._working

    def _count(self) -> None:
        if self.metrics is not None:
            self.metrics[1].set(len(self.streams))

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with self.lock:
            streams, self.streams = list(self.streams.values()), {}
        for s in streams:
            s.close()
        for s in streams:
            s.thread.join(timeout)


def _gauge(pb_utils, name: str, description: str, model: str):
    """(family, gauge) on Triton's metrics endpoint (Python backend custom metrics), if available.

    The family must outlive its metric, so both are kept."""
    cls = getattr(pb_utils, "MetricFamily", None)
    if cls is None:
        return None
    family = cls(name=name, description=description, kind=cls.GAUGE)
    return family, family.Metric(labels={"model": model})


def _log(pb_utils, level: str, message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        getattr(logger, f"log_{level}")(message)
    else:
        print(message, flush=True)
