"""Down, mid and up blocks of the LatentSync UNet (frame-batch layout, see resnet.py).

Each layer of a block is: ResNet -> [spatial/audio transformer] -> [motion module]. Upstream's
CrossAttn*Block3D and *Block3D differ only in whether the transformer is there, so one class covers both.
Submodules are registered in upstream's order (attentions, resnets, motion_modules, down/upsamplers) so
state_dict() lists keys exactly as the official checkpoints do. A block without transformers or motion modules
holds an EMPTY `attentions` / `motion_modules` list (no state_dict keys): code written for upstream's blocks,
such as the DeepCache library's `getattr(block, "attentions", [])`, iterates it as it iterates upstream's.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .resnet import Downsample3D, Upsample3D

# functools.partial's of make_resnet(in_channels, out_channels), make_attention(channels), make_motion(channels)
Factory = Callable[..., nn.Module]


def _attend(block: nn.Module, i: int, x: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
    """What follows layer i's ResNet: [transformer] -> [motion module]."""
    if block.attentions:
        x = block.attentions[i](x, context)
    if block.motion_modules:
        x = block.motion_modules[i](x, num_frames)
    return x


class DownBlock3D(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        make_resnet: Factory,
        make_attention: Factory | None = None,
        make_motion: Factory | None = None,
        add_downsample: bool = True,
        downsample_padding: int = 1,
    ):
        super().__init__()
        self.attentions = nn.ModuleList(
            [make_attention(out_channels) for _ in range(num_layers)] if make_attention else []
        )
        self.resnets = nn.ModuleList(
            [make_resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)]
        )
        self.motion_modules = nn.ModuleList(
            [make_motion(out_channels) for _ in range(num_layers)] if make_motion else []
        )
        self.downsamplers = nn.ModuleList([Downsample3D(out_channels, downsample_padding)]) if add_downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, num_frames: int):
        """Returns the output and the skip connections (one per layer, plus the downsampled output)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = _attend(self, i, resnet(x, temb, num_frames), context, num_frames)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock3DCrossAttn(nn.Module):
    """ResNet, then per layer: transformer -> [motion module] -> ResNet."""

    def __init__(
        self,
        channels: int,
        make_resnet: Factory,
        make_attention: Factory,
        make_motion: Factory | None = None,
        num_layers: int = 1,
    ):
        super().__init__()
        self.attentions = nn.ModuleList([make_attention(channels) for _ in range(num_layers)])
        self.resnets = nn.ModuleList([make_resnet(channels, channels) for _ in range(num_layers + 1)])
        self.motion_modules = nn.ModuleList([make_motion(channels) for _ in range(num_layers)] if make_motion else [])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.resnets[0](x, temb, num_frames)
        for i, (attention, resnet) in enumerate(zip(self.attentions, self.resnets[1:])):
            x = attention(x, context)
            if self.motion_modules:
                x = self.motion_modules[i](x, num_frames)
            x = resnet(x, temb, num_frames)
        return x


class UpBlock3D(nn.Module):
    """Each layer first concatenates the latest skip connection (channel axis), then runs as a down-block layer."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        num_layers: int,
        make_resnet: Factory,
        make_attention: Factory | None = None,
        make_motion: Factory | None = None,
        add_upsample: bool = True,
    ):
        super().__init__()
        self.attentions = nn.ModuleList(
            [make_attention(out_channels) for _ in range(num_layers)] if make_attention else []
        )
        self.resnets = nn.ModuleList(
            [
                make_resnet(
                    (prev_output_channels if i == 0 else out_channels)
                    + (in_channels if i == num_layers - 1 else out_channels),
                    out_channels,
                )
                for i in range(num_layers)
            ]
        )
        self.motion_modules = nn.ModuleList(
            [make_motion(out_channels) for _ in range(num_layers)] if make_motion else []
        )
        self.upsamplers = nn.ModuleList([Upsample3D(out_channels)]) if add_upsample else None

    def layer(
        self, i: int, x: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, context: torch.Tensor, num_frames: int
    ) -> torch.Tensor:
        """Layer i alone: ResNet on [x | skip] -> [transformer] -> [motion module]."""
        return _attend(self, i, self.resnets[i](torch.cat([x, skip], dim=1), temb, num_frames), context, num_frames)

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        num_frames: int,
        upsample_size=None,
    ) -> torch.Tensor:
        """`skips` are consumed from the end: layer i takes skips[-1 - i]."""
        for i in range(len(self.resnets)):
            x = self.layer(i, x, skips[-1 - i], temb, context, num_frames)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


# upstream block type name -> whether its layers have the spatial/audio transformer
DOWN_BLOCK_TYPES = {"CrossAttnDownBlock3D": True, "DownBlock3D": False}
UP_BLOCK_TYPES = {"CrossAttnUpBlock3D": True, "UpBlock3D": False}
MID_BLOCK_TYPES = ("UNetMidBlock3DCrossAttn",)
