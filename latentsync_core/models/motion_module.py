"""AnimateDiff-style "Vanilla" motion module: self-attention along time, one sequence of f frames per latent pixel.

All its layers except the attention act per token, so the module lays the frame batch out ONCE as
(b*h*w, f, C) sequences and keeps that layout through every block (upstream rearranges before and after each
attention). Upstream quirks kept: its GroupNorm has 32 groups and eps 1e-6 whatever the UNet config says, and
the sinusoidal position table (max_len frames, a persistent buffer) is added to the normed hidden states
right before q/k/v of EACH temporal attention.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class PositionalEncoding(nn.Module):
    """Transformer sin/cos table, interleaved (even channels sin, odd cos), shape (1, max_len, dim)."""

    def __init__(self, dim: int, max_len: int = 24):
        super().__init__()
        position = torch.arange(max_len)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * freq)
        pe[0, :, 1::2] = torch.cos(position * freq)
        self.register_buffer("pe", pe)  # persistent: official checkpoints contain it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalSelfAttention(Attention):
    """Self-attention over the frame axis of (sequences, f, C), optionally position-encoded first."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, position_encoding_max_len: int | None):
        super().__init__(query_dim=dim, heads=num_heads, dim_head=head_dim)
        self.pos_encoder = PositionalEncoding(dim, position_encoding_max_len) if position_encoding_max_len else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        return super().forward(x)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, head_dim: int, attention_block_types, position_encoding_max_len):
        super().__init__()
        for kind in attention_block_types:
            if kind != "Temporal_Self":
                raise NotImplementedError(f"motion module block {kind!r}: only 'Temporal_Self' is supported")
        self.attention_blocks = nn.ModuleList(
            [TemporalSelfAttention(dim, num_heads, head_dim, position_encoding_max_len) for _ in attention_block_types]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in attention_block_types])
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = attention(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer3DModel(nn.Module):
    def __init__(
        self,
        channels: int,
        num_heads: int,
        head_dim: int,
        num_layers: int,
        attention_block_types,
        position_encoding_max_len: int | None,
    ):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)  # 32 groups hard-coded upstream
        self.proj_in = nn.Linear(channels, inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [
                TemporalTransformerBlock(
                    inner_dim, num_heads, head_dim, attention_block_types, position_encoding_max_len
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out = nn.Linear(inner_dim, channels)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        # frame batch (b*f, c, h, w) -> one sequence per clip and pixel: (b*h*w, f, c)
        seq = self.norm(x).view(-1, num_frames, c, h * w).permute(0, 3, 1, 2).reshape(-1, num_frames, c)
        seq = self.proj_in(seq)
        for block in self.transformer_blocks:
            seq = block(seq)
        seq = self.proj_out(seq)
        return seq.view(-1, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w) + x


class VanillaTemporalModule(nn.Module):
    """Upstream's motion module; its constructor arguments are the config's `motion_module_kwargs` (same defaults)."""

    def __init__(
        self,
        in_channels: int,
        num_attention_heads: int = 8,
        num_transformer_block: int = 2,
        attention_block_types=("Temporal_Self", "Temporal_Self"),
        cross_frame_attention_mode=None,
        temporal_position_encoding: bool = False,
        temporal_position_encoding_max_len: int = 24,
        temporal_attention_dim_div: int = 1,
        zero_initialize: bool = True,
    ):
        super().__init__()
        if cross_frame_attention_mode is not None:
            raise NotImplementedError("motion module cross_frame_attention_mode is not supported")
        self.temporal_transformer = TemporalTransformer3DModel(
            in_channels,
            num_attention_heads,
            in_channels // num_attention_heads // temporal_attention_dim_div,
            num_transformer_block,
            attention_block_types,
            temporal_position_encoding_max_len if temporal_position_encoding else None,
        )
        if zero_initialize:  # a fresh module starts as the identity
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.temporal_transformer(x, num_frames)


def get_motion_module(in_channels: int, motion_module_type: str, motion_module_kwargs: dict) -> nn.Module:
    if motion_module_type != "Vanilla":
        raise ValueError(f"unknown motion_module_type {motion_module_type!r}; expected 'Vanilla'")
    return VanillaTemporalModule(in_channels, **motion_module_kwargs)
