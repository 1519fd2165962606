"""The latent codec: sd-vae-ft-mse (diffusers AutoencoderKL) or TAESD (diffusers AutoencoderTiny).

Both map R x R faces in [-1, 1] to 4 x R/8 x R/8 latents in the same *scaled* latent space the UNet was
trained on. The KL VAE is stochastic: upstream draws `latent_dist.sample()` for the masked and the reference
faces (not the mode), so encoding is split into `posterior` (deterministic, batchable on a server) and
`sample_latents` (the per-stream random draw, done by whoever owns the stream's generator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .configs import VAE_SCALING_FACTOR
from .face.mask import encoder_pixels


@dataclass
class Posterior:
    """Unscaled latent posterior; std is zero for a deterministic encoder (TAESD)."""

    mean: torch.Tensor
    std: torch.Tensor
    scale: float


def sample_latents(post: Posterior, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents, drawn exactly as diffusers' DiagonalGaussianDistribution.sample(generator) then scaled.

    The noise is drawn on the CPU from the stream's generator even for TAESD (std 0), so the random sequence of a
    stream does not depend on which VAE or which server executes the encoder.
    """
    noise = torch.randn(post.mean.shape, generator=generator, dtype=post.mean.dtype, device="cpu")
    return (post.mean + post.std * noise.to(post.mean.device)) * post.scale


class LatentCodec(torch.nn.Module):
    """Wraps a diffusers autoencoder with LatentSync's scaling (0.18215, shift 0 for the KL VAE)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.is_kl = vae.__class__.__name__ == "AutoencoderKL"
        # AutoencoderTiny latents are already in the scaled space (its config scaling_factor is 1.0).
        self.scaling_factor = VAE_SCALING_FACTOR if self.is_kl else 1.0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def posterior(self, pixels: torch.Tensor) -> Posterior:
        """pixels (n, 3, R, R) in [-1, 1] -> posterior of the *unscaled* latents."""
        if self.is_kl:
            dist = self.vae.encode(pixels).latent_dist
            return Posterior(dist.mean, dist.std, self.scaling_factor)
        mean = self.vae.encode(pixels).latents
        return Posterior(mean, torch.zeros_like(mean), self.scaling_factor)

    def encode_faces(self, faces: torch.Tensor, keep: torch.Tensor) -> Posterior:
        """uint8 faces (n, 3, R, R) and keep levels (n, 1, R, R) -> the posterior of the masked faces
        (face.mask.encoder_pixels): a served encoder receives uint8, a third of the bytes of float pixels."""
        return self.posterior(encoder_pixels(faces, keep).to(self.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (n, 4, h, w) -> pixels (n, 3, 8h, 8w), roughly in [-1, 1] (not clamped, as upstream)."""
        return self.vae.decode(latents / self.scaling_factor).sample
