"""Model and sampler configurations of LatentSync 1.5 and 1.6.

The UNet dicts use the field names of upstream's configs/unet/stage2.yaml `model:` section, so a config
file of the official release can be passed as-is. 1.5 (stage2.yaml) and 1.6 (stage2_512.yaml) share the
UNet architecture; they differ only in the data resolution (latent 32x32 vs 64x64) and trained weights.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

# The stream's recipe defaults, rates and window size are part of the client contract.
from latentsync_contract import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, FPS, SAMPLE_RATE, SAMPLERS, WINDOW  # noqa: F401

UNET_STAGE2: dict = {
    "act_fn": "silu",
    "add_audio_layer": True,
    "attention_head_dim": 8,  # upstream passes this as the NUMBER of heads (head size = C // 8)
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 13,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-5,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "resnet_time_scale_shift": "default",
    "use_motion_module": True,
    "motion_module_resolutions": [1, 2, 4, 8],
    "motion_module_mid_block": False,
    "motion_module_decoder_only": False,
    "motion_module_type": "Vanilla",
    "motion_module_kwargs": {
        "num_attention_heads": 8,
        "num_transformer_block": 1,
        "attention_block_types": ["Temporal_Self", "Temporal_Self"],
        "temporal_position_encoding": True,
        "temporal_position_encoding_max_len": 24,
        "temporal_attention_dim_div": 1,
        "zero_initialize": True,
    },
}

# configs/scheduler_config.json of upstream (DDIM, "leading" spacing, epsilon prediction).
SCHEDULER_CONFIG: dict = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "skip_prk_steps": True,
}

# OpenAI whisper "tiny" (multilingual) dims; all shipped LatentSync configs use cross_attention_dim 384 = tiny.
WHISPER_TINY_DIMS: dict = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_vocab": 51865,
    "n_text_ctx": 448,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 4,
}

VAE_SCALING_FACTOR = 0.18215  # sd-vae-ft-mse, shift 0
NUM_FRAMES = WINDOW  # frames per window (non-overlapping)


@dataclass(frozen=True)
class Variant:
    """A LatentSync release: its UNet config and the face resolution it was trained at."""

    name: str
    resolution: int
    unet_config: dict = field(repr=False)

    @property
    def latent_size(self) -> int:
        return self.resolution // 8


VARIANTS: dict[str, Variant] = {
    "1.5": Variant("1.5", 256, UNET_STAGE2),
    "1.6": Variant("1.6", 512, UNET_STAGE2),
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[str(name)]
    except KeyError:
        raise ValueError(f"unknown LatentSync variant {name!r}; expected one of {sorted(VARIANTS)}") from None


def unet_config(**overrides) -> dict:
    """A copy of the stage2 UNet config with some fields replaced (used for scaled-down test models)."""
    cfg = copy.deepcopy(UNET_STAGE2)
    cfg.update(overrides)
    return cfg


TINY_MARKER = "TINY_RANDOM_WEIGHTS"  # a weights folder holding this file has random weights (latentsync_core.tiny)
