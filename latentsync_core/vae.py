"""The latent codec: sd-vae-ft-mse (diffusers AutoencoderKL) or TAESD (diffusers AutoencoderTiny).

Both map R x R faces in [-1, 1] to 4 x R/8 x R/8 latents in the same *scaled* latent space the UNet was
trained on. The KL VAE is stochastic: upstream draws `latent_dist.sample()` for the masked and the reference
faces (not the mode), so encoding is split into `posterior` (deterministic, batchable on a server) and
`sample_latents` (the per-stream random draw, done by whoever owns the stream's generator).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import CheckpointError, read_checkpoint
from .configs import VAE_SCALING_FACTOR


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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (n, 4, h, w) -> pixels (n, 3, 8h, 8w), roughly in [-1, 1] (not clamped, as upstream)."""
        return self.vae.decode(latents / self.scaling_factor).sample


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LatentCodec:
    """Load a diffusers-format VAE folder (sd-vae-ft-mse: AutoencoderKL; taesd: AutoencoderTiny).

    A folder holding TAESD's own `taesd_encoder.safetensors` / `taesd_decoder.safetensors` pair is accepted too.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny

    path = Path(path)
    if (path / "taesd_encoder.safetensors").is_file():
        return LatentCodec(load_taesd(path)).to(device=device, dtype=dtype)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not a diffusers VAE folder (no config.json) nor a TAESD folder")
    cls_name = json.loads(cfg_file.read_text()).get("_class_name", "AutoencoderKL")
    cls = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}.get(cls_name)
    if cls is None:
        raise CheckpointError(f"{path}: unsupported VAE class {cls_name!r}")
    try:
        vae = cls.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot load the VAE ({str(e).splitlines()[0][:200]})") from None
    return LatentCodec(vae).to(device=device, dtype=dtype)


def load_taesd(folder: Path):
    """TAESD's original files use nn.Sequential indices; diffusers' AutoencoderTiny wraps the same layers."""
    from diffusers import AutoencoderTiny

    vae = AutoencoderTiny()
    sd = {}
    for part in ("encoder", "decoder"):
        weights = read_checkpoint(folder / f"taesd_{part}.safetensors")
        # taesd's decoder starts with a parameter-free Clamp module that diffusers folds into forward().
        offset = 1 if part == "decoder" else 0
        for key, value in weights.items():
            index, _, rest = key.partition(".")
            sd[f"{part}.layers.{int(index) - offset}.{rest}"] = value.float()
    missing, unexpected = vae.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{folder}: TAESD keys do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return vae
