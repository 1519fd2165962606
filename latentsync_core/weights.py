"""The weights folder: official LatentSync checkpoints (or the project's tiny ones) in one documented layout.

    WEIGHTS/
      latentsync_unet.pt      official UNet checkpoint ({"state_dict": ...}), LatentSync-1.5 or -1.6
      whisper/tiny.pt         OpenAI whisper checkpoint ({"dims", "model_state_dict"})
      vae/                    diffusers VAE folder: sd-vae-ft-mse (AutoencoderKL) or taesd (AutoencoderTiny);
                              a folder named sd-vae-ft-mse/ is accepted too
      unet_config.json        optional: UNet config (upstream field names); default configs/unet/stage2.yaml
      TINY_RANDOM_WEIGHTS     marker file written by `latentsync-tiny-weights` (random weights, no real output)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import CheckpointError
from .configs import UNET_STAGE2

TINY_MARKER = "TINY_RANDOM_WEIGHTS"


@dataclass(frozen=True)
class WeightPaths:
    root: Path
    unet: Path
    whisper: Path
    vae: Path
    unet_config: dict

    @property
    def is_random(self) -> bool:
        return (self.root / TINY_MARKER).exists()


def locate(weights: str | Path) -> WeightPaths:
    root = Path(weights)
    if not root.is_dir():
        raise CheckpointError(f"{root}: weights folder not found")
    vae = next((root / n for n in ("vae", "sd-vae-ft-mse", "taesd") if (root / n).is_dir()), root / "vae")
    cfg_file = root / "unet_config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else dict(UNET_STAGE2)
    paths = WeightPaths(root, root / "latentsync_unet.pt", root / "whisper" / "tiny.pt", vae, config)
    for p in (paths.unet, paths.whisper, paths.vae):
        if not p.exists():
            raise CheckpointError(f"{p}: missing (expected layout: see latentsync_core/weights.py)")
    return paths


def load_models(weights: str | Path, detector: str | None = "mediapipe", device: str = "cpu",
                dtype: torch.dtype = torch.float32):
    """All in-process models of the reference pipeline, loaded strictly from a weights folder."""
    from .checkpoints import load_unet
    from .models.whisper import load_whisper_encoder
    from .pipeline import LocalModels
    from .vae import load_vae

    paths = locate(weights)
    unet = load_unet(paths.unet, paths.unet_config, device=device, dtype=dtype)
    whisper = load_whisper_encoder(paths.whisper, device=device)
    codec = load_vae(paths.vae, dtype=dtype, device=device)
    face_detector = None
    if detector:
        from .face.detect import create_detector

        face_detector = create_detector(detector)
    return LocalModels(unet, whisper, codec, face_detector, device=device)
