"""Every model loaded from files, in one place: official checkpoints (strictly), the weights folder, the pipeline.

    WEIGHTS/
      latentsync_unet.pt      official UNet checkpoint ({"state_dict": ...}), LatentSync-1.5 or -1.6
      whisper/tiny.pt         OpenAI whisper checkpoint ({"dims", "model_state_dict"})
      vae/                    diffusers VAE folder: sd-vae-ft-mse (AutoencoderKL) or taesd (AutoencoderTiny);
                              a folder named sd-vae-ft-mse/ or taesd/ is accepted too
      unet_config.json        optional: UNet config (upstream field names); default configs/unet/stage2.yaml
      mask.png                optional: upstream's latentsync/utils/mask.png, the mouth mask the UNet was trained
                              with (without it: face/mask.py's drawn approximation)
      TINY_RANDOM_WEIGHTS     marker file written by `latentsync-tiny-weights` (random weights, no real output)

Upstream loads the UNet with strict=False (a wrong checkpoint silently keeps random weights); here a missing,
unexpected or wrongly shaped key is one CheckpointError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from .checkpoints import CheckpointError, check_state_dict, module_shapes, read_checkpoint, unwrap
from .configs import TINY_MARKER, UNET_STAGE2
from .face.detect import create_detector
from .models.whisper import AudioEncoder, WhisperDims, make_encoder, whisper_state_dict_shapes
from .pipeline import LipSyncPipeline, LocalModels
from .vae import LatentCodec

# diffusers (and the UNet, built on its blocks) load only in the processes that build those models: the audio
# encoder's and the stand-ins' stubs start ~3 s of CPU sooner and idle ~90 MB smaller without them.
if TYPE_CHECKING:
    from diffusers import AutoencoderTiny

    from .models.unet3d import UNet3DConditionModel


# ---------------------------------------------------------------------------------------------------- checkpoints
def load_unet(
    path: str | Path,
    config: Mapping | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> UNet3DConditionModel:
    """An official `latentsync_unet.pt` ({"state_dict": ...}) or a .safetensors state dict, strictly."""
    from .models.unet3d import UNet3DConditionModel

    config = dict(config or UNET_STAGE2)
    obj = read_checkpoint(path)
    state_dict = obj if Path(path).suffix == ".safetensors" else unwrap(obj, "state_dict", path)
    with torch.device("meta"):
        model = UNet3DConditionModel.from_config(config)
    check_state_dict(
        module_shapes(model),
        state_dict,
        f"UNet checkpoint {path}",
        hint="Is this checkpoint for another UNet config? LatentSync 1.5 and 1.6 (stage2.yaml / stage2_512.yaml) "
        "share one architecture; stage1 and stage2_efficient checkpoints differ.",
    )
    model = model.to_empty(device=device)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_whisper_encoder(path_or_dict: str | Path | Mapping, device: str | torch.device = "cpu") -> AudioEncoder:
    """The encoder of an OpenAI-format whisper checkpoint (a path or the already loaded dict), in float32.

    The whole state dict (decoder included) must match the checkpoint's own dims key for key and shape for
    shape, as upstream's strict load_model; otherwise CheckpointError names the first offending key.
    """
    name = "whisper checkpoint" if isinstance(path_or_dict, Mapping) else f"whisper checkpoint {path_or_dict}"
    obj = path_or_dict if isinstance(path_or_dict, Mapping) else read_checkpoint(path_or_dict)
    if "dims" not in obj:
        raise CheckpointError(f"{name}: no 'dims' entry; expected OpenAI's {{'dims', 'model_state_dict'}} format")
    dims = WhisperDims.from_dict(obj["dims"])
    state_dict = unwrap(obj, "model_state_dict", name)
    check_state_dict(
        whisper_state_dict_shapes(dims),
        state_dict,
        name,
        hint="Is this an OpenAI whisper checkpoint (tiny.pt / small.pt) with matching dims?",
    )
    with torch.device("meta"):
        encoder = make_encoder(dims)
    encoder = encoder.to_empty(device=device)
    prefix = "encoder."
    encoder.load_state_dict(
        {k[len(prefix) :]: v.float() for k, v in state_dict.items() if k.startswith(prefix)}, strict=True
    )
    return encoder.eval().requires_grad_(False)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LatentCodec:
    """A diffusers-format VAE folder (sd-vae-ft-mse: AutoencoderKL; taesd: AutoencoderTiny), or a folder holding
    TAESD's own `taesd_encoder.safetensors` / `taesd_decoder.safetensors` pair."""
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


def load_taesd(folder: Path) -> AutoencoderTiny:
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


# ---------------------------------------------------------------------------------------------------- weights folder
@dataclass(frozen=True)
class WeightPaths:
    root: Path
    unet: Path
    whisper: Path
    vae: Path
    unet_config: dict
    mask: Path | None = None  # upstream's mask.png, if the folder has it

    @property
    def is_random(self) -> bool:
        return (self.root / TINY_MARKER).exists()


def locate(weights: str | Path) -> WeightPaths:
    """The files of a weights folder (layout above); CheckpointError names the first one missing."""
    root = Path(weights)
    if not root.is_dir():
        raise CheckpointError(f"{root}: weights folder not found")
    vae = next((root / n for n in ("vae", "sd-vae-ft-mse", "taesd") if (root / n).is_dir()), root / "vae")
    cfg_file = root / "unet_config.json"
    config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else dict(UNET_STAGE2)
    mask = root / "mask.png"
    paths = WeightPaths(
        root, root / "latentsync_unet.pt", root / "whisper" / "tiny.pt", vae, config, mask if mask.is_file() else None
    )
    for p in (paths.unet, paths.whisper, paths.vae):
        if not p.exists():
            raise CheckpointError(f"{p}: missing (expected layout: see latentsync_core/loaders.py)")
    return paths


def load_models(
    weights: str | Path | WeightPaths,
    detector: str | None = "mediapipe",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    detector_options: Mapping | None = None,
) -> LocalModels:
    """Every model of the in-process pipeline, loaded strictly from a weights folder."""
    paths = weights if isinstance(weights, WeightPaths) else locate(weights)
    unet = load_unet(paths.unet, paths.unet_config, device=device, dtype=dtype)
    whisper = load_whisper_encoder(paths.whisper, device=device)
    codec = load_vae(paths.vae, dtype=dtype, device=device)
    face_detector = create_detector(detector, **dict(detector_options or {})) if detector else None
    return LocalModels(unet, whisper, codec, face_detector, device=device, mask_image=paths.mask)


def load_pipeline(
    weights: str | Path | WeightPaths,
    variant: str = "1.5",
    detector: str | None = "mediapipe",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LipSyncPipeline:
    """The in-process reference pipeline (the oracle the Triton deployment must equal) on a weights folder."""
    return LipSyncPipeline(load_models(weights, detector, device, dtype), variant)
