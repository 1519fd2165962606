"""`latentsync-tiny-weights OUT`: seeded, scaled-down weights of every model with the official key names.

They load through exactly the same code as the official checkpoints (same file formats, same keys), so tests,
CI and the demo exercise the real loading and serving paths without any download. The output is random:
lips will not follow speech. A marker file says so, and everything that uses the folder reports it.

`--full` makes random weights of the official sizes instead (UNet stage2, whisper tiny, sd-vae-ft-mse): the
same FLOPs and memory as the real models, for benchmarks on a GPU (`--device cuda` draws them there).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .configs import TINY_MARKER, UNET_STAGE2, WHISPER_TINY_DIMS, unet_config
from .models.unet3d import UNet3DConditionModel
from .models.whisper import whisper_state_dict_shapes

# Full architecture (block types, motion modules, 13 input channels, 384-d audio) with narrow channels.
TINY_UNET = unet_config(block_out_channels=[32, 64, 64, 64], sample_size=8)
# Real whisper-tiny encoder dims (the audio arithmetic depends on them); the never-run decoder is shrunk.
TINY_WHISPER_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_vocab": 64,
    "n_text_ctx": 8,
    "n_text_state": 32,
    "n_text_head": 2,
    "n_text_layer": 1,
}
TINY_VAE = dict(
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)
# stabilityai/sd-vae-ft-mse's architecture (its config.json), for full-size random weights.
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    norm_num_groups=32,
    latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
)


@dataclass(frozen=True)
class WeightSize:
    unet: dict
    whisper: dict
    vae: dict
    unet_dtype: torch.dtype  # as stored; the loaders convert (float16 halves a full UNet's 5 GB)


SIZES = {
    "tiny": WeightSize(TINY_UNET, TINY_WHISPER_DIMS, TINY_VAE, torch.float32),
    "full": WeightSize(UNET_STAGE2, WHISPER_TINY_DIMS, SD_VAE, torch.float16),
}


def redraw_(tensors: dict[str, torch.Tensor], generator: torch.Generator, skip=()) -> dict[str, torch.Tensor]:
    """Re-draw every tensor so outputs are O(1) (default inits zero some layers, which hides bugs):
    ndim >= 2 ~ N(0, 1/fan_in); norm weights ~ N(1, 0.1^2); norm biases ~ N(0, 0.1^2); other 1-D ~ N(0, 0.05^2).
    Drawn on the generator's device."""
    out = {}
    for name, t in tensors.items():
        if any(s in name for s in skip):
            out[name] = t
            continue
        if t.ndim >= 2:
            std, mean = 1.0 / math.sqrt(t[0].numel()), 0.0
        elif "norm" in name or "_ln" in name or "ln_" in name:
            std, mean = 0.1, (1.0 if name.endswith("weight") else 0.0)
        else:
            std, mean = 0.05, 0.0
        out[name] = (
            torch.randn(t.shape, generator=generator, dtype=torch.float64, device=generator.device)
            .mul(std)
            .add(mean)
            .float()
        )
    return out


def make_unet(out: Path, generator: torch.Generator, config: dict = TINY_UNET, dtype=torch.float32) -> None:
    with torch.device(generator.device):  # built where drawn: a full UNet's default init is slow on a CPU
        model = UNet3DConditionModel.from_config(config)
    sd = redraw_(model.state_dict(), generator, skip=("pos_encoder.pe",))
    torch.save({"state_dict": {k: v.to("cpu", dtype) for k, v in sd.items()}}, out / "latentsync_unet.pt")
    (out / "unet_config.json").write_text(json.dumps(config, indent=1))


def make_whisper(out: Path, generator: torch.Generator, dims: dict = TINY_WHISPER_DIMS) -> None:
    shapes = whisper_state_dict_shapes(dims)
    # zeros, not empty: the (never run) decoder's positional embedding is skipped and must be deterministic
    sd = redraw_({k: torch.zeros(s) for k, s in shapes.items()}, generator, skip=("positional_embedding",))
    sd["encoder.positional_embedding"] = sinusoids(dims["n_audio_ctx"], dims["n_audio_state"])
    # OpenAI checkpoints store every tensor in float16.
    sd = {k: v.to("cpu", torch.float16) for k, v in sd.items()}
    (out / "whisper").mkdir(exist_ok=True)
    torch.save({"dims": dict(dims), "model_state_dict": sd}, out / "whisper" / "tiny.pt")


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """Whisper's encoder positional embedding (a buffer stored in its checkpoints)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2))
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


def make_vae(out: Path, generator: torch.Generator, config: dict = TINY_VAE) -> None:
    with torch.device(generator.device):
        vae = AutoencoderKL(**config)
    vae.load_state_dict(redraw_(vae.state_dict(), generator))
    vae.to("cpu").save_pretrained(str(out / "vae"))


def make_random_weights(out: str | Path, seed: int = 0, size: str = "tiny", device: str | torch.device = "cpu") -> Path:
    """A weights folder (loaders.py layout) of seeded random weights; size "tiny" or "full" (official sizes)."""
    spec = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(seed)
    make_unet(out, g, spec.unet, spec.unet_dtype)
    make_whisper(out, g, spec.whisper)
    make_vae(out, g, spec.vae)
    configs = "scaled-down configs" if size == "tiny" else "the official model sizes"
    (out / TINY_MARKER).write_text(
        f"Random weights (seed {seed}) made by latentsync-tiny-weights: real file formats and key names, "
        f"{configs}. Output video is NOT lip-synced.\n"
    )
    return out


# Official release file names of the face restorers (optional face enhancer); each holds {'params_ema': state_dict}.
FACE_RESTORER_FILES = {"GFPGAN": "GFPGANv1.4.pth", "RestoreFormer": "RestoreFormer.pth", "CodeFormer": "codeformer.pth"}


def face_restorer_network(arch: str, **hyper) -> torch.nn.Module:
    """spandrel's class of a face restoration architecture; its defaults are the official hyper-parameters (those of
    GFPGANv1.4.pth, RestoreFormer.pth, codeformer.pth). Built under torch.device('meta') it costs no memory."""
    from .face.enhance import import_spandrel

    import_spandrel()
    if arch == "GFPGAN":
        from spandrel.architectures.GFPGAN import GFPGAN as network
    elif arch == "RestoreFormer":
        from spandrel.architectures.RestoreFormer import RestoreFormer as network
    elif arch == "CodeFormer":
        from spandrel_extra_arches.architectures.CodeFormer import CodeFormer as network
    else:
        raise ValueError(f"unknown face restorer {arch!r}; known: {', '.join(FACE_RESTORER_FILES)}")
    return network(**hyper)


def make_face_restorer(path: str | Path, arch: str, seed: int = 0, **hyper) -> Path:
    """Seeded random weights of a real face restorer (the architecture's own initialisation), saved like the
    official file: torch.save({'params_ema': state_dict}). Full size unless `hyper` shrinks it (spandrel reads
    RestoreFormer's sizes from the weights; GFPGAN and CodeFormer load only at their official sizes)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = face_restorer_network(arch, **hyper)
    torch.save({"params_ema": network.state_dict()}, path)
    return Path(path)


def make_tiny_weights(out: str | Path, seed: int = 0) -> Path:
    return make_random_weights(out, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="latentsync-tiny-weights", description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="the official model sizes (UNet ~1.3 B parameters)")
    ap.add_argument("--device", default="cpu", help="where to draw them (cuda: seconds for --full)")
    args = ap.parse_args(argv)
    size = "full" if args.full else "tiny"
    path = make_random_weights(args.out, args.seed, size, args.device)
    print(f"wrote random {size} weights to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
