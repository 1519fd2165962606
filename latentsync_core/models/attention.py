"""Spatial transformer of the LatentSync UNet: per-frame self-attention over the h*w latent pixels, then
cross-attention from those pixels to the frame's 50 whisper audio tokens (upstream's "audio layer").

Attention and feed-forward are diffusers' modules (their state_dict names match upstream's: to_q/to_k/to_v/
to_out.0, ff.net.0.proj/ff.net.2); diffusers' default processor runs torch SDPA.
"""

from __future__ import annotations

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn


class BasicTransformerBlock(nn.Module):
    """norm1 -> self-attention, [norm2 -> audio cross-attention], norm3 -> GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, cross_attention_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=num_heads, dim_head=head_dim)
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(
                query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_heads, dim_head=head_dim
            )
        else:
            self.attn2 = None
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None and context is not None:
            x = self.attn2(self.norm2(x), encoder_hidden_states=context) + x
        return self.ff(self.norm3(x)) + x


class Transformer3DModel(nn.Module):
    """GroupNorm -> 1x1 conv -> transformer block on (b*f, h*w, C) tokens -> 1x1 conv, plus the input.

    `context` holds one (50, 384) audio sequence per frame, rows in the frame batch's order (b*f, 50, 384).
    Upstream passes its `attention_head_dim` config value here as the NUMBER of heads; head size = C // heads.
    """

    def __init__(self, channels: int, num_heads: int, cross_attention_dim: int | None, norm_num_groups: int = 32):
        super().__init__()
        head_dim = channels // num_heads
        inner_dim = num_heads * head_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)  # eps hard-coded upstream
        self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, num_heads, head_dim, cross_attention_dim)]
        )
        self.proj_out = nn.Conv2d(inner_dim, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        bf, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x))
        inner_dim = tokens.shape[1]
        tokens = tokens.permute(0, 2, 3, 1).reshape(bf, h * w, inner_dim)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        tokens = tokens.reshape(bf, h, w, inner_dim).permute(0, 3, 1, 2).contiguous()
        return self.proj_out(tokens) + x
