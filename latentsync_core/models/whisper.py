"""OpenAI whisper's audio encoder, as LatentSync uses it: the residual stream of every layer, not the final output.

Module and parameter names follow OpenAI's whisper/model.py, so an official checkpoint
(`{"dims": {...}, "model_state_dict": {...}}`, e.g. tiny.pt) loads without renaming. Upstream loads the whole
Whisper model strictly, so the text decoder's parameters are described here too (to check the checkpoint against),
but never built or run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, module_shapes


@dataclass(frozen=True)
class WhisperDims:
    """OpenAI's ModelDimensions (the checkpoint's "dims" entry)."""

    n_mels: int
    n_audio_ctx: int
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    @classmethod
    def from_dict(cls, dims: Mapping | WhisperDims) -> WhisperDims:
        if isinstance(dims, WhisperDims):
            return dims
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(dims, Mapping) or set(dims) != set(names):
            raise CheckpointError(f"whisper dims must have exactly the fields {names}, got {dims!r}")
        return cls(**{k: int(dims[k]) for k in names})


class MultiHeadAttention(nn.Module):
    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # self-attention, no mask (the encoder's only use)
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.n_head, -1).transpose(1, 2) for proj in (self.query, self.key, self.value))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        # Decoder blocks only (parameters kept for the strict checkpoint check; the decoder never runs).
        self.cross_attn = MultiHeadAttention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):
    """mel (batch, n_mels, 2*n_ctx) -> hidden states (batch, n_ctx, n_layer+1, n_state).

    Index 0 is the conv stem output plus the positional embedding, index i the output of block i. ln_post is
    loaded but not applied: upstream's include_embeddings path takes the residual stream before it.
    """

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        # A buffer read from the checkpoint (float16 sinusoids in OpenAI's files), never recomputed.
        self.register_buffer("positional_embedding", torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = nn.LayerNorm(n_state)

    @property
    def n_mel_frames(self) -> int:
        return 2 * self.positional_embedding.shape[0]

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel))  # exact-erf GELU, as upstream
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        if x.shape[1:] != self.positional_embedding.shape:
            raise ValueError(
                f"expected mel (batch, {self.conv1.in_channels}, {self.n_mel_frames}), got {tuple(mel.shape)}"
            )
        x = x + self.positional_embedding.to(x.dtype)
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        return torch.stack(states, dim=2)


class TextDecoder(nn.Module):
    """Parameters of whisper's text decoder, only so that a checkpoint can be checked as a whole."""

    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList(
            ResidualAttentionBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)
        )
        self.ln = nn.LayerNorm(n_state)
        # OpenAI's causal `mask` buffer is non-persistent (absent from checkpoints), so it is left out.


class Whisper(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        self.encoder = make_encoder(dims)
        self.decoder = TextDecoder(
            dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head, dims.n_text_layer
        )


def make_encoder(dims: Mapping | WhisperDims) -> AudioEncoder:
    d = WhisperDims.from_dict(dims)
    return AudioEncoder(d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer)


def whisper_state_dict_shapes(dims: Mapping | WhisperDims) -> dict[str, tuple]:
    """Ordered key -> shape of OpenAI's Whisper(ModelDimensions(**dims)).state_dict(), decoder included."""
    with torch.device("meta"):
        return module_shapes(Whisper(WhisperDims.from_dict(dims)))
