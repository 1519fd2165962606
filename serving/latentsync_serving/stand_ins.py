"""Near-zero-cost stand-ins for the UNet, the VAE and the audio encoder, with their real inputs and outputs.

A repository built with `latentsync-export --stand-ins` serves them instead of the networks, so a benchmark
measures the serving path's own ceiling: everything but the networks (transport, orchestration, the denoising
loop's bookkeeping, detection, alignment, paste-back). No GPU can make the product faster than that.
"""

from __future__ import annotations

import torch

from latentsync_core.vae import Posterior

WHISPER_LAYERS, WHISPER_DIM, WHISPER_STEPS = 5, 384, 1500  # whisper-tiny: 4 blocks + the embedding


class NullUNet(torch.nn.Module):
    """(sample (b, 13, f, h, w), timesteps, audio) -> zero noise prediction (b, 4, f, h, w)."""

    dtype = torch.float32

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        return sample.new_zeros((sample.shape[0], 4, *sample.shape[2:]))


class NullCodec:
    """The latent codec's interface: a zero posterior (std 0) and grey decoded faces."""

    dtype = torch.float32
    scaling_factor = 1.0

    def posterior(self, pixels: torch.Tensor) -> Posterior:
        zeros = pixels.new_zeros((pixels.shape[0], 4, pixels.shape[2] // 8, pixels.shape[3] // 8))
        return Posterior(zeros, zeros, self.scaling_factor)

    def encode_faces(self, faces: torch.Tensor, keep: torch.Tensor) -> Posterior:
        """uint8 faces -> a float32 zero posterior, as a served encoder answers (no masking arithmetic)."""
        n, _, h, w = faces.shape
        zeros = torch.zeros((n, 4, h // 8, w // 8), device=faces.device)
        return Posterior(zeros, zeros, self.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.new_zeros((latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8))


class NullAudioEncoder:
    """mel (s, 80, 3000) -> zero features (s, 1500, 5, 384)."""

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        return mel.new_zeros((mel.shape[0], WHISPER_STEPS, WHISPER_LAYERS, WHISPER_DIM))
