"""Constants and arithmetic of the `lipsync` streaming contract (docs/PROTOCOL.md of the server repository)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import InputError

MODEL_NAME = "lipsync"
FPS = 25                      # frames are sent and returned at 25 fps
SAMPLE_RATE = 16_000          # audio is sent as 16 kHz mono float32
WINDOW = 16                   # the server answers once per window of up to 16 frames
MAX_FRAMES_PER_REQUEST = 16
MAX_FRAME_SIDE = 4096         # pixels per side the server accepts
MIN_FRAME_SIDE = 2            # pixels per side the client takes: its h264 (yuv420p) output needs even sizes >= 2
VARIANTS = ("1.5", "1.6")


def num_frames_for_audio(n_samples: int) -> int:
    """Frames the server expects for `n_samples` of 16 kHz audio (upstream's feature2chunks arithmetic)."""
    mel_frames = n_samples // 160
    whisper_steps = mel_frames // 2
    return whisper_steps // 2 + 2


def min_audio_samples() -> int:
    """Shortest track that yields at least one whisper feature step (20 ms)."""
    return 2 * 160


@dataclass(frozen=True)
class SyncParams:
    """Stream parameters, sent with the first request of a sequence."""

    steps: int = 20
    guidance: float = 1.5
    seed: int = 1247
    variant: str = "1.5"

    def __post_init__(self):
        if not 1 <= int(self.steps) <= 100:
            raise InputError(f"steps must be 1..100, got {self.steps}")
        if not float(self.guidance) >= 1.0:
            raise InputError(f"guidance must be >= 1 (1 = no guidance), got {self.guidance}")
        if self.variant not in VARIANTS:
            raise InputError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")

    def as_parameters(self) -> dict:
        """Typed request parameters (tritonclient maps int/float/str to int64/double/string)."""
        p = asdict(self)
        return {"steps": int(p["steps"]), "guidance": float(p["guidance"]), "seed": int(p["seed"]),
                "variant": str(p["variant"])}
