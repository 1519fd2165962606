"""The LatentSync 1.5 / 1.6 denoising UNet: an SD-1.5-layout UNet whose 2D layers run per frame, with audio
cross-attention in every spatial transformer and AnimateDiff motion modules (temporal attention) after them.

Built from upstream's `configs/unet/stage2*.yaml` `model:` section (same field names and meanings) and loads
official `latentsync_unet.pt` state dicts as they are: state_dict() keys, order and shapes equal upstream's.

Internally every activation is a frame batch (b*f, c, h, w) (see resnet.py); forward() takes and returns the
upstream (b, c, f, h, w) layout. forward() has no data-dependent control flow, so it traces/exports to ONNX,
and it runs in float16 as well as float32.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from .attention import Transformer3DModel
from .motion_module import get_motion_module
from .resnet import ClipGroupNorm, ResnetBlock3D
from .unet_blocks import (
    DOWN_BLOCK_TYPES,
    MID_BLOCK_TYPES,
    UP_BLOCK_TYPES,
    DownBlock3D,
    UNetMidBlock3DCrossAttn,
    UpBlock3D,
)

# Fields upstream's constructor accepts that no LatentSync config changes: accepted at these values only.
_FIXED_FIELDS = {
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "upcast_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
}


class UNet3DConditionModel(nn.Module):
    def __init__(
        self,
        sample_size: int | None = None,
        in_channels: int = 4,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        mid_block_type: str = "UNetMidBlock3DCrossAttn",
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 1280,
        attention_head_dim: int | list[int] = 8,
        resnet_time_scale_shift: str = "default",
        use_inflated_groupnorm: bool = False,
        use_motion_module: bool = False,
        motion_module_resolutions=(1, 2, 4, 8),
        motion_module_mid_block: bool = False,
        motion_module_decoder_only: bool = False,
        motion_module_type: str | None = None,
        motion_module_kwargs: dict | None = None,
        add_audio_layer: bool = False,
        **fixed_fields,
    ):
        super().__init__()
        # the full config, defaults filled in (like diffusers' `model.config`)
        self.config = copy.deepcopy(
            {k: v for k, v in locals().items() if k not in ("self", "__class__", "fixed_fields")} | fixed_fields
        )
        for name, value in fixed_fields.items():
            if name not in _FIXED_FIELDS:
                raise TypeError(f"unknown UNet config field {name!r}")
            if value != _FIXED_FIELDS[name]:
                raise NotImplementedError(
                    f"UNet config {name}={value!r} is not supported (only {_FIXED_FIELDS[name]!r})"
                )
        if resnet_time_scale_shift != "default":
            raise NotImplementedError(f"resnet_time_scale_shift={resnet_time_scale_shift!r} is not supported")
        if mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"unknown mid_block_type {mid_block_type!r}")
        for name in (*down_block_types, *up_block_types):
            if name not in DOWN_BLOCK_TYPES and name not in UP_BLOCK_TYPES:
                raise ValueError(f"unknown block type {name!r}")
        self.center_input_sample = center_input_sample

        n_blocks = len(block_out_channels)
        heads = [attention_head_dim] * n_blocks if isinstance(attention_head_dim, int) else list(attention_head_dim)
        time_embed_dim = block_out_channels[0] * 4
        make_resnet = partial(
            ResnetBlock3D,
            temb_channels=time_embed_dim,
            groups=norm_num_groups,
            eps=norm_eps,
            act_fn=act_fn,
            per_frame_norm=use_inflated_groupnorm,
        )
        audio_dim = cross_attention_dim if add_audio_layer else None

        def make_attention(num_heads: int):
            return partial(
                Transformer3DModel, num_heads=num_heads, cross_attention_dim=audio_dim, norm_num_groups=norm_num_groups
            )

        def make_motion(enabled: bool):
            if not (use_motion_module and enabled):
                return None
            return partial(
                get_motion_module,
                motion_module_type=motion_module_type,
                motion_module_kwargs=dict(motion_module_kwargs or {}),
            )

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim)

        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                DownBlock3D(
                    block_out_channels[max(i - 1, 0)],
                    block_out_channels[i],
                    layers_per_block,
                    make_resnet,
                    make_attention(heads[i]) if DOWN_BLOCK_TYPES[block_type] else None,
                    make_motion(2**i in motion_module_resolutions and not motion_module_decoder_only),
                    add_downsample=i < n_blocks - 1,
                    downsample_padding=downsample_padding,
                )
            )

        # upstream registers up_blocks before mid_block: state_dict order follows
        self.up_blocks = nn.ModuleList()
        rev_channels, rev_heads = block_out_channels[::-1], heads[::-1]
        for i, block_type in enumerate(up_block_types):
            self.up_blocks.append(
                UpBlock3D(
                    rev_channels[min(i + 1, n_blocks - 1)],
                    rev_channels[max(i - 1, 0)],
                    rev_channels[i],
                    layers_per_block + 1,
                    make_resnet,
                    make_attention(rev_heads[i]) if UP_BLOCK_TYPES[block_type] else None,
                    make_motion(2 ** (3 - i) in motion_module_resolutions),  # upstream hard-codes 3 (four levels)
                    add_upsample=i < n_blocks - 1,
                )
            )

        self.mid_block = UNetMidBlock3DCrossAttn(
            block_out_channels[-1],
            partial(make_resnet, output_scale_factor=mid_block_scale_factor),
            make_attention(heads[-1]),
            make_motion(motion_module_mid_block),
        )

        self.conv_norm_out = ClipGroupNorm(norm_num_groups, block_out_channels[0], norm_eps, use_inflated_groupnorm)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, 3, padding=1)
        for conv in (self.conv_in, self.conv_out):  # zero-initialised upstream (only matters before loading)
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @classmethod
    def from_config(cls, config: dict) -> UNet3DConditionModel:
        """Build from a stage2*.yaml `model:` section (a plain dict); unknown fields raise TypeError."""
        return cls(**copy.deepcopy(dict(config)))

    # forward() in named pieces, so a caller can stop and resume it (DeepCache reuses the hidden state entering
    # the final up block's last layer); each runs exactly the operations forward() runs.
    def embed(self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor):
        """Returns (x, temb, audio, shape): conv_in's output as a frame batch (b*f, C0, h, w), the time embedding
        (b, 4*C0), the audio tokens (b*f, 50, 384) in sample's dtype, and shape = (b, f, h, w)."""
        b, _, f, h, w = sample.shape
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        if encoder_hidden_states.dim() == 4:
            encoder_hidden_states = encoder_hidden_states.flatten(0, 1)
        audio = encoder_hidden_states.to(sample.dtype)

        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        timesteps = timestep.to(sample.device).reshape(-1).expand(b)
        # the sinusoid is always float32; the MLP runs in the model's dtype
        temb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))

        x = self.conv_in(sample.transpose(1, 2).reshape(b * f, -1, h, w))
        return x, temb, audio, (b, f, h, w)

    def encode(
        self, x: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor, num_frames: int
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Down blocks and mid block on conv_in's output x. Returns (the mid block's output, the skip connections
        [x, then every down block's]) for decode()."""
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, audio, num_frames)
            skips += block_skips
        return self.mid_block(x, temb, audio, num_frames), skips

    def decode(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        audio: torch.Tensor,
        num_frames: int,
        stop_before_last_layer: bool = False,
    ) -> torch.Tensor:
        """Up blocks, each taking its skip connections from the end of `skips`. With stop_before_last_layer,
        returns the hidden state entering the final up block's last layer (which last_layer() runs on it and
        skips[0]); the final up block has no upsampler, so nothing else is left out."""
        last = len(self.up_blocks) - 1
        for k, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            if k == last and stop_before_last_layer:
                for i in range(n - 1):
                    x = block.layer(i, x, block_skips[-1 - i], temb, audio, num_frames)
                return x
            # upsample to the next skip's size: 2x, or what upstream forces when h, w are not multiples of 8
            size = skips[-1].shape[-2:] if skips else None
            x = block(x, block_skips, temb, audio, num_frames, size)
        return x

    def last_layer(
        self, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        """The final up block's last layer on x and its skip connection (conv_in's output)."""
        block = self.up_blocks[-1]
        return block.layer(len(block.resnets) - 1, x, skip, temb, audio, num_frames)

    def head(self, x: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """Output norm, activation and conv; frame batch -> (b, c_out, f, h, w)."""
        b, f, h, w = shape
        x = self.conv_out(self.conv_act(self.conv_norm_out(x, f)))
        return x.view(b, f, -1, h, w).transpose(1, 2).contiguous()

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        """sample (b, c_in, f, h, w); timestep: 0-d/(1,)/(b,) tensor or a number; encoder_hidden_states: audio
        tokens (b*f, 50, 384) ordered batch-major, or (b, f, 50, 384). Returns the noise prediction
        (b, c_out, f, h, w) in sample's dtype."""
        x, temb, audio, shape = self.embed(sample, timestep, encoder_hidden_states)
        f = shape[1]
        x, skips = self.encode(x, temb, audio, f)
        return self.head(self.decode(x, skips, temb, audio, f), shape)
