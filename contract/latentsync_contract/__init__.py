"""The `lipsync` stream contract, written once for the server, the client and the test double.

Tensor names, limits, defaults, stream parameters with their validation (the server's own messages) and the
frame-count arithmetic of docs/PROTOCOL.md. Pure Python: the client imports it without torch or numpy, and
whatever the client refuses here is exactly what the server would refuse.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

MODEL_NAME = "lipsync"

# Tensors: requests carry FRAMES and/or AUDIO. Responses carry FRAME_INDEX and FACE_FOUND, and only what changed
# in those frames: REGION_BOX (where) and REGIONS (the pixels). The client already has the frames it sent; the
# server keeps no whole frame past a window's alignment and sends none back (docs/PROTOCOL.md).
FRAMES, AUDIO, FRAME_INDEX, FACE_FOUND = "FRAMES", "AUDIO", "FRAME_INDEX", "FACE_FOUND"
REGION_BOX, REGIONS = "REGION_BOX", "REGIONS"

FPS = 25  # frames are sent and returned at 25 fps
SAMPLE_RATE = 16_000  # audio is 16 kHz mono float32
HOP_LENGTH = 160  # audio samples per log-mel frame (whisper)
WINDOW = 16  # frames per window: the server answers window by window
MAX_FRAMES_PER_REQUEST = WINDOW
# Requests a client keeps without their final response, not counting those that complete a window: audio, and
# frames, which the server acknowledges on arrival while it keeps up and as it takes them in when it falls behind;
# so a client that waits for them never has more than a few requests of whole frames queued there
# (docs/PROTOCOL.md).
UNANSWERED_REQUESTS = 2
# Frames of a stream sent and not yet answered, at most: a stream that has more waiting in the server's queue (a
# client that does not wait for its answers) fails, so that one client cannot queue unbounded video there.
MAX_UNANSWERED_FRAMES = 4 * WINDOW
MAX_FRAME_SIDE = 4096  # pixels per side (4K UHD either way up); a window of such frames is ~800 MB as float
MIN_FRAME_SIDE = 2  # pixels per side: an h264 (yuv420p) video needs even sizes >= 2
MAX_AUDIO_SECONDS = 300  # per stream: the server keeps ~1.9 MB of whisper features per second (PROTOCOL.md)
MAX_AUDIO_SAMPLES = MAX_AUDIO_SECONDS * SAMPLE_RATE
MAX_AUDIO_AMPLITUDE = 2.0  # |sample| bound: full scale is 1; room for a float decoder's overshoot, no more
STREAM_TOKEN = "stream_token"  # request parameter: the secret tying a sequence id to the client that started it
MAX_TOKEN_LENGTH = 128
VARIANTS = ("1.5", "1.6")  # LatentSync releases: 256 px and 512 px faces

DEFAULT_STEPS, MAX_STEPS = 20, 100
DEFAULT_GUIDANCE, MAX_GUIDANCE = 1.5, 20.0
DEFAULT_SEED, MAX_SEED = 1247, 2**63 - 1
SAMPLERS = ("ddim", "dpmsolver++")  # upstream's DDIM; DPM-Solver++ (2nd order) reaches it in fewer steps
MAX_DEEPCACHE = 10  # DeepCache interval: full UNet every k-th step (upstream's scripts: 3)


class ContractError(ValueError):
    """What a client sent breaks the contract; the message names the tensor or parameter."""


# ---------------------------------------------------------------------------------------------------- arithmetic
def num_frames_for_audio(n_samples: int) -> int:
    """Frames of a stream with `n_samples` of audio: upstream's feature2chunks count at 25 fps.

    mel frames = n // 160, whisper steps = mel // 2 (50 per second), chunks = steps // 2 + 2."""
    return n_samples // HOP_LENGTH // 2 // 2 + 2


def min_audio_samples() -> int:
    """The shortest track that gives one whisper feature step (20 ms)."""
    return 2 * HOP_LENGTH


def window_sizes(n_frames: int) -> list[int]:
    """Sizes of the windows a stream of `n_frames` is cut into: full windows, then the rest."""
    return [WINDOW] * (n_frames // WINDOW) + ([n_frames % WINDOW] if n_frames % WINDOW else [])


def completes_window(stop: int, n_frames: int) -> bool:
    """Whether a request of frames ending at frame `stop` (exclusive) of `n_frames` completes a window or the
    stream: the server keeps it open until that window is answered (its final response then comes last)."""
    return stop % WINDOW == 0 or stop == n_frames


def request_spans(n_frames: int, per_request: int) -> list[tuple[int, int]]:
    """How a client cuts a stream's frames into requests, as (start, stop): at most `per_request` frames each,
    never across a window's end, and the frame that completes a window (or the stream) in a request of its own.
    The server keeps a request that completes a window open, with its frames in Triton, until the window is
    answered; every other request of frames is final on arrival, or as the server takes it in (docs/PROTOCOL.md).
    So a window in flight holds one whole frame there, not `per_request` (4 per window: [4, 4, 4, 3, 1])."""
    if per_request < 1:
        raise ValueError("per_request must be at least 1")
    spans, start = [], 0
    while start < n_frames:
        last = min((start // WINDOW + 1) * WINDOW, n_frames) - 1  # the frame that completes this window
        stop = start + 1 if start == last else min(start + per_request, last)
        spans.append((start, stop))
        start = stop
    return spans


def no_face_message(n_frames: int, turned: int = 0) -> str:
    """The error that ends a stream in which no frame had a (frontal enough) face."""
    more = f"; {turned} had a face turned further than max_yaw" if turned else ""
    return f"no face found in any of the {n_frames} frames of the stream{more}"


def is_no_face_error(message: str) -> bool:
    return "no face found in any of the" in message


def idle_drop_message(stream_id, idle_s: float) -> str:
    """The error for a request of a stream the server dropped as idle (it must start a new sequence)."""
    return (
        f"stream {stream_id} was dropped after {idle_s:g} s without requests (the server's idle timeout); "
        "start a new stream (its first request must set sequence_start)"
    )


def is_stream_dropped_error(message: str) -> bool:
    """The server (lipsync, or Triton itself for a sequence it released) no longer knows the stream."""
    return any(phrase in message for phrase in ("must specify the START flag", "must set sequence_start"))


def busy_message(open_streams: int, cap: int) -> str:
    """The error of a START refused because the instance has `cap` streams open or finishing (a retry may pass)."""
    return (
        f"the server is busy: {open_streams} streams are open or finishing their last windows (at most {cap} per "
        "lipsync instance); start again in a few seconds"
    )


def is_server_busy_error(message: str) -> bool:
    return "the server is busy:" in message


def internal_error_message(stream_id, error_id: str) -> str:
    """The error of a stream that failed on the server's side (a model, the device, memory): not the client's
    mistake, so it names none of the server's internals (docs/THREAT-MODEL.md); the server logs the details under
    `error_id`, which the client can quote to its operator."""
    return f"stream {stream_id} failed on the server (error {error_id}; the server's log has the details)"


def draining_message(stream_id) -> str:
    return f"stream {stream_id} refused: the server is shutting down and takes no new streams (use another server)"


# ---------------------------------------------------------------------------------------------------- tensors
def check_frames_shape(shape: Sequence[int]) -> None:
    """A FRAMES request tensor: [n, H, W, 3] with n <= 16 and MIN_FRAME_SIDE <= H, W <= MAX_FRAME_SIDE; a request
    without frames (n = 0, as audio requests send them) may have any H, W."""
    if len(shape) != 4 or shape[-1] != 3:
        raise ContractError(f"FRAMES must be [n, H, W, 3] RGB uint8, got shape {list(shape)}")
    if shape[0] > MAX_FRAMES_PER_REQUEST:
        raise ContractError(f"FRAMES holds {shape[0]} frames; at most {MAX_FRAMES_PER_REQUEST} per request")
    if shape[0]:
        check_frame_size(shape[1], shape[2])


def check_stream_frames(first_shape: Sequence[int] | None, shape: Sequence[int], received: int, total: int) -> None:
    """A FRAMES tensor `shape` within its stream: the size of the stream's first frames (`first_shape`, None for
    the first request of frames), and at most `total` frames in all (the audio's count) after `received`."""
    if first_shape is not None and tuple(shape[1:]) != tuple(first_shape):
        raise ContractError(f"FRAMES size changed from {list(first_shape[:2])} to {list(shape[1:3])} within the stream")
    if received + shape[0] > total:
        raise ContractError(
            f"FRAMES: frame {total} and later are past the end of the audio, which covers "
            f"{total} frames (send num_frames_for_audio(len(audio)) frames)"
        )


def check_frame_size(height: int, width: int) -> None:
    if max(height, width) > MAX_FRAME_SIDE:
        raise ContractError(
            f"FRAMES are {width}x{height} pixels; at most {MAX_FRAME_SIDE} per side (scale the video down)"
        )
    if min(height, width) < MIN_FRAME_SIDE:
        raise ContractError(f"FRAMES are {width}x{height} pixels; at least {MIN_FRAME_SIDE} per side")


def check_audio_shape(shape: Sequence[int], received: int = 0) -> None:
    """An AUDIO request tensor [m], after `received` samples of the stream: at most MAX_AUDIO_SAMPLES in all."""
    if len(shape) != 1:
        raise ContractError(f"AUDIO must be 1-D 16 kHz samples, got shape {list(shape)}")
    if received + shape[0] > MAX_AUDIO_SAMPLES:
        raise ContractError(
            f"AUDIO: the stream's audio is longer than {MAX_AUDIO_SECONDS} s "
            f"({received + shape[0]} samples, at most {MAX_AUDIO_SAMPLES} at 16 kHz); "
            "sync longer audio in parts"
        )


def check_audio_length(n_samples: int) -> None:
    """A stream's whole track, once its frames start: at least one whisper feature step (20 ms)."""
    if n_samples < min_audio_samples():
        raise ContractError(
            f"AUDIO: the track is shorter than 20 ms ({n_samples} samples; at least {min_audio_samples()} at 16 kHz)"
        )


def check_audio_range(low: float, high: float) -> None:
    """The smallest and largest sample of an AUDIO tensor (NaN if any is NaN): finite, within MAX_AUDIO_AMPLITUDE.
    One NaN, inf or huge sample would rescale the whole track's log-mel (normalised by its maximum)."""
    if not -MAX_AUDIO_AMPLITUDE <= low <= high <= MAX_AUDIO_AMPLITUDE:
        raise ContractError(
            f"AUDIO samples must be finite and within [-{MAX_AUDIO_AMPLITUDE:g}, "
            f"{MAX_AUDIO_AMPLITUDE:g}] (float audio is [-1, 1]), got values from {low} to {high}"
        )


def check_stream_token(token) -> str | None:
    """The `stream_token` request parameter: None (an old client) or 1..MAX_TOKEN_LENGTH printable characters."""
    if token is None:
        return None
    if not (isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH and token.isprintable()):
        raise ContractError(
            f"parameter '{STREAM_TOKEN}' must be a string of 1..{MAX_TOKEN_LENGTH} printable characters"
        )
    return token


# ---------------------------------------------------------------------------------------------------- responses
def region_sizes(boxes: Sequence[Sequence[int]]) -> list[int]:
    """Bytes of each frame's region in REGIONS: REGION_BOX rows (y0, y1, x0, x1), RGB; 0 for an empty box."""
    return [max(int(y1) - int(y0), 0) * max(int(x1) - int(x0), 0) * 3 for y0, y1, x0, x1 in boxes]


def apply_regions(frames, boxes, regions) -> None:
    """Write a response's regions into the frames it answers, IN PLACE: frames[i][y0:y1, x0:x1] = region i.

    frames: (H, W, 3) uint8 arrays (numpy), one per response row; boxes: REGION_BOX (m, 4); regions: REGIONS,
    the regions' RGB bytes in row order. A frame with an empty box (no face) is the one that was sent.
    """
    if len(frames) != len(boxes):
        raise ContractError(f"REGION_BOX has {len(boxes)} rows for {len(frames)} frames")
    sizes = region_sizes(boxes)
    if sum(sizes) != len(regions):
        raise ContractError(f"REGIONS holds {len(regions)} bytes; REGION_BOX describes {sum(sizes)}")
    offset = 0
    for frame, (y0, y1, x0, x1), size in zip(frames, boxes, sizes):
        if size:
            if not (0 <= y0 < y1 <= frame.shape[0] and 0 <= x0 < x1 <= frame.shape[1]):
                raise ContractError(f"REGION_BOX {[int(v) for v in (y0, y1, x0, x1)]} lies outside the frame")
            frame[y0:y1, x0:x1] = regions[offset : offset + size].reshape(y1 - y0, x1 - x0, 3)
        offset += size


# ---------------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class StreamParams:
    """A stream's parameters, sent with its first request. `variant` None: the server's default variant."""

    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int = DEFAULT_SEED
    variant: str | None = None
    sampler: str = "ddim"
    deepcache: int = 0  # 0 = off; k = the full UNet on every k-th step of a window, cached features between
    enhance: bool = False  # restore the generated mouth region with the repository's face enhancer
    enhance_blend: float = 1.0  # 0..1: how much of the restored mouth region replaces the generated one
    enhance_min_sharpness: float = 0.0  # enhance only faces whose mouth is blurrier than this (0 = every face)
    max_yaw: float = 0.0  # degrees; faces turned further pass through unchanged, like faceless frames (0 = off)

    def __post_init__(self):
        _check_type("steps", self.steps, int)
        if not 1 <= self.steps <= MAX_STEPS:
            raise ContractError(f"parameter 'steps' must be in 1..{MAX_STEPS}, got {self.steps}")
        _check_type("guidance", self.guidance, float)
        object.__setattr__(self, "guidance", float(self.guidance))
        if not (math.isfinite(self.guidance) and 1.0 <= self.guidance <= MAX_GUIDANCE):
            raise ContractError(
                f"parameter 'guidance' must be in [1, {MAX_GUIDANCE:g}] (1 = no guidance), got {self.guidance}"
            )
        _check_type("seed", self.seed, int)
        if not 0 <= self.seed <= MAX_SEED:
            raise ContractError(f"parameter 'seed' must be in 0..2^63-1, got {self.seed}")
        if self.variant is not None and self.variant not in VARIANTS:
            raise ContractError(f"parameter 'variant' must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.sampler not in SAMPLERS:
            raise ContractError(f"parameter 'sampler' must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _check_type("deepcache", self.deepcache, int)
        if not 0 <= self.deepcache <= MAX_DEEPCACHE:
            raise ContractError(
                f"parameter 'deepcache' must be in 0..{MAX_DEEPCACHE} (0 = off; upstream's scripts "
                f"use 3), got {self.deepcache}"
            )
        if not isinstance(self.enhance, bool):
            raise ContractError(f"parameter 'enhance' must be true or false, got {self.enhance!r}")
        for name, low, high in (
            ("enhance_blend", 0.0, 1.0),
            ("enhance_min_sharpness", 0.0, math.inf),
            ("max_yaw", 0.0, 90.0),
        ):
            value = getattr(self, name)
            _check_type(name, value, float)
            if not (low <= value <= high and not math.isnan(value)):
                raise ContractError(f"parameter '{name}' must be in [{low:g}, {high:g}], got {value}")
            object.__setattr__(self, name, float(value))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], variants: Sequence[str], enhancer: bool = False) -> StreamParams:
        """Request parameters (JSON values) -> parameters; absent ones take their defaults, `variant` the first
        of the `variants` this server was built with. Unknown names are refused: a typo must not silently
        fall back to a default. `enhancer`: whether this server has a face enhancer. The request parameter
        STREAM_TOKEN is not a stream parameter and is left out."""
        raw = {k: v for k, v in raw.items() if k != STREAM_TOKEN}
        unknown = sorted(k for k in raw if k not in cls.names())
        if unknown:
            raise ContractError(f"unknown parameter '{unknown[0]}'; expected some of {', '.join(cls.names())}")
        values = {k: _coerce(k, raw[k], cls.__dataclass_fields__[k].type) for k in raw}
        variant = str(values.pop("variant", variants[0]))
        if variant not in variants:
            raise ContractError(
                f"parameter 'variant' must be one of {', '.join(variants)} "
                f"(the variants this repository was built with), got {variant!r}"
            )
        params = cls(**values, variant=variant)
        if params.enhance and not enhancer:
            raise ContractError(
                "parameter 'enhance': this repository has no face enhancer (latentsync-export --enhancer-weights FILE)"
            )
        return params

    def as_parameters(self) -> dict:
        """Typed request parameters (tritonclient sends int/float/str as int64/double/string); defaults left out,
        so a client that asks for nothing new works with a server that knows fewer parameters."""
        defaults = StreamParams()
        return {
            k: v
            for k, v in asdict(self).items()
            if v is not None and (k in ("steps", "guidance", "seed") or v != getattr(defaults, k))
        }


def _check_type(name: str, value, kind: type) -> None:
    ok = (
        isinstance(value, int) and not isinstance(value, bool)
        if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    if not ok:
        raise ContractError(f"parameter '{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")


def _coerce(name: str, value, annotation: str):
    """A JSON parameter value in the field's type: numbers may arrive as strings; no bools, no fractional ints."""
    kind = {"int": int, "float": float, "bool": bool}.get(annotation, str)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value  # __post_init__ refuses anything but a bool
    if kind is str:
        return str(value)
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ContractError(
            f"parameter '{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}"
        ) from None
