"""Audio track -> one whisper feature chunk per video frame, with upstream LatentSync's exact arithmetic.

    samples (16 kHz) -> log_mel_spectrogram (80, N) -> encode_features (N//2, L+1, C) -> feature_chunks (n, 10*(L+1), C)

Upstream quirks kept on purpose (they change the numbers or the frame count):
* the log-mel floor is the GLOBAL max of the whole track minus 8, so the track must be complete first;
* the mel is cut into 3000-frame (30 s) segments, each zero-padded in log-mel space (not with silent audio);
* frame i sees feature steps 2i-4 .. 2i+5 (at 25 fps), clamped to the track, and the chunk count is T//2 + 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .configs import FPS, SAMPLE_RATE

N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
SEGMENT_FRAMES = 3000  # mel frames per encoder call (30 s); the encoder halves them to 1500 steps
FEATURES_PER_SECOND = 50  # upstream's get_sliced_feature hard-codes this rate
AUDIO_FEAT_LENGTH = (2, 2)  # video frames of context before / after (config audio_feat_length)

# Feature steps around a frame's centre: -2*2 .. (2+1)*2 - 1, i.e. 10 steps, 80 ms back to 120 ms ahead.
_OFFSETS = np.arange(-2 * AUDIO_FEAT_LENGTH[0], 2 * (AUDIO_FEAT_LENGTH[1] + 1), dtype=np.int64)


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio stream of any file to float32 mono samples at `sample_rate`.

    Same path as whisper's ffmpeg call (`-ac 1 -ar 16000 -f s16le`, then / 32768): resample to signed 16-bit
    mono first, so the values are exactly the int16 grid.
    """
    import av

    pcm = []
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError(f"{path}: no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        for frame in container.decode(container.streams.audio[0]):
            pcm += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        pcm += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
    samples = np.concatenate(pcm) if pcm else np.zeros(0, np.int16)
    return samples.astype(np.float32) / 32768.0


@cache
def mel_filters(device: str = "cpu") -> torch.Tensor:
    """(80, 201) slaney mel filter bank = librosa.filters.mel(sr=16000, n_fft=400, n_mels=80), whisper's filters."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(
        num_frequency_bins=N_FFT // 2 + 1,
        num_mel_filters=N_MELS,
        min_frequency=0.0,
        max_frequency=SAMPLE_RATE / 2,
        sampling_rate=SAMPLE_RATE,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank.T.astype(np.float32)).to(device)


def log_mel_spectrogram(samples: np.ndarray | torch.Tensor, device: str | torch.device | None = None) -> torch.Tensor:
    """16 kHz samples (n,) -> whisper log-mel (80, n // 160), float32."""
    audio = torch.as_tensor(samples).to(device=device, dtype=torch.float32)
    if audio.ndim != 1 or len(audio) < 2 * HOP_LENGTH:  # shorter audio gives no 20 ms feature step at all
        raise ValueError(f"expected mono samples, at least {2 * HOP_LENGTH}, got shape {tuple(audio.shape)}")
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[:, :-1].abs() ** 2  # the last frame is dropped, as whisper does
    log_spec = (mel_filters(str(audio.device)) @ power).clamp(min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


def mel_segments(mel: torch.Tensor) -> torch.Tensor:
    """(n_mels, N) -> (ceil(N / 3000), n_mels, 3000): 30 s segments, the last zero-padded in log-mel space."""
    n_segments = max(1, -(-mel.shape[-1] // SEGMENT_FRAMES))
    padded = F.pad(mel, (0, n_segments * SEGMENT_FRAMES - mel.shape[-1]))
    return padded.reshape(mel.shape[0], n_segments, SEGMENT_FRAMES).transpose(0, 1).contiguous()


def encode_features(encoder: Callable[[torch.Tensor], torch.Tensor], mel: torch.Tensor) -> torch.Tensor:
    """log-mel (n_mels, N) -> whisper features (N // 2, L+1, C), float32.

    `encoder` maps (segments, n_mels, 3000) -> (segments, 1500, L+1, C) (an AudioEncoder or a remote model);
    all segments go in one call. Each segment keeps its first len // 2 steps, as upstream's transcribe loop.
    """
    mel = torch.as_tensor(mel)
    with torch.no_grad():
        hidden = torch.as_tensor(encoder(mel_segments(mel))).float()
    # Full segments give 1500 steps, the last one len // 2; as 3000 is even that is N // 2 in all.
    return hidden.flatten(0, 1)[: mel.shape[-1] // 2]


def _chunk_centres(n_features: int, fps: float = FPS) -> np.ndarray:
    """Centre feature step of every video frame upstream emits.

    feature2chunks appends frame i, then stops once int(i * 50/fps) > T: frames 0 .. (first such i) inclusive.
    """
    step = FEATURES_PER_SECOND / fps
    # int(i*step) is non-decreasing, so search a range sure to contain the first i past T.
    candidates = np.arange(int((n_features + 1) / step) + 3)
    last = int(np.argmax(np.floor(candidates * step) > n_features))
    frames = np.arange(last + 1)
    return np.floor(frames * FEATURES_PER_SECOND / fps).astype(np.int64)


def feature_chunk_indices(n_features: int, fps: float = FPS) -> np.ndarray:
    """(n_chunks, 10) int64: the feature steps gathered for each video frame, clamped to [0, T-1]."""
    if n_features < 1:
        raise ValueError("no audio features (the audio is shorter than 20 ms)")
    return np.clip(_chunk_centres(n_features, fps)[:, None] + _OFFSETS, 0, n_features - 1)


def feature_chunks(features: np.ndarray | torch.Tensor, fps: float = FPS) -> torch.Tensor:
    """features (T, L+1, C) -> (n_chunks, 10*(L+1), C): per video frame, 10 steps x L+1 layers, step-major."""
    features = torch.as_tensor(features)
    index = torch.from_numpy(feature_chunk_indices(len(features), fps)).to(features.device)
    return features[index].flatten(1, 2)


@dataclass
class AudioFeaturizer:
    """Whole 16 kHz track -> per-frame whisper chunks, with the encoder run on `device` in `dtype`."""

    encoder: torch.nn.Module
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    fps: float = FPS

    def __post_init__(self):
        self.encoder = self.encoder.to(device=self.device, dtype=self.dtype)

    def _encode(self, segments: torch.Tensor) -> torch.Tensor:
        return self.encoder(segments.to(self.device, self.dtype))

    def features(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        # The log-mel stays on the CPU, as upstream computes it (cheap next to the encoder).
        return encode_features(self._encode, log_mel_spectrogram(samples))

    def __call__(self, samples: np.ndarray | torch.Tensor) -> torch.Tensor:
        return feature_chunks(self.features(samples), self.fps)
