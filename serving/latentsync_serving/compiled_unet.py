"""The denoiser's UNet under torch.compile, at a few fixed batch sizes (opt-in: `latentsync-export --compile-unet`).

On an H200 the compiled step (inductor, mode reduce-overhead) ran 1.6-1.7x faster than eager bf16 at 16 items
(RESULTS.md "GPU"). A compiled graph is specialised to its input shapes, and each new shape costs a compile of
a minute or more there, so full 16-frame windows run at the smallest of `buckets` items that holds them (the
padding repeats the last item, whose outputs are dropped: the UNet's items are independent), every bucket is
compiled once at start-up (`warm_up`), and everything else (windows of fewer frames, a stream's last; more
items than the largest bucket; DeepCache's partial steps, which use the module's pieces) runs the eager module.
"""

from __future__ import annotations

import time

import torch

BUCKETS = (2, 4, 8, 16, 32)  # UNet items: 1, 2, 4, 8, 16 guided windows
FRAMES = 16  # the frames of a full window


class CompiledUNet:
    """Callable like the UNet (sample, timesteps, audio) -> noise prediction; other attributes are the module's."""

    def __init__(
        self, unet: torch.nn.Module, mode: str, max_items: int, frames: int = FRAMES, backend: str = "inductor"
    ):
        self.unet, self.mode, self.frames = unet, mode, frames
        self.buckets = tuple(b for b in BUCKETS if b < max_items) + (max_items,)
        # `backend` other than inductor (tests: "eager", dynamo's graph capture alone) takes no mode
        modes = {"mode": mode} if backend == "inductor" else {}
        self.compiled = torch.compile(unet, backend=backend, dynamic=False, **modes)

    def __getattr__(self, name: str):  # DeepCache's embed/encode/decode pieces, parameters, ...: eager
        return getattr(self.unet, name)

    def bucket(self, items: int, frames: int) -> int | None:
        """The compiled batch size that runs `items` items of `frames` frames, or None (eager)."""
        if frames != self.frames:
            return None
        return next((b for b in self.buckets if b >= items), None)

    def __call__(self, sample: torch.Tensor, timesteps: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        n = len(sample)
        size = self.bucket(n, sample.shape[2])
        if size is None:
            return self.unet(sample, timesteps, audio)
        padded = [_pad(x, size) for x in (sample, timesteps, audio)]
        # clone: with CUDA graphs the output lives in a buffer that the next replay overwrites
        return self.compiled(*padded)[:n].clone()

    def warm_up(self, latent_size: int, device: torch.device, dtype: torch.dtype, log=print) -> None:
        """Compile every bucket now (on the thread that will call it: CUDA graph trees are per thread)."""
        config = self.unet.config
        hw = (latent_size, latent_size)
        for size in self.buckets:
            started = time.perf_counter()
            sample = torch.zeros(size, config["in_channels"], self.frames, *hw, device=device, dtype=dtype)
            timesteps = torch.zeros(size, dtype=torch.int64, device=device)
            audio = torch.zeros(size, self.frames, 50, config["cross_attention_dim"], device=device, dtype=dtype)
            with torch.no_grad():
                for _ in range(3):  # reduce-overhead records its CUDA graph on the third call
                    self(sample, timesteps, audio)
            seconds = time.perf_counter() - started  # a start from torch.compile's cache is faster (OPERATIONS.md)
            log(f"UNet compiled ({self.mode}) for {size} items of {self.frames} frames in {seconds:.0f} s")


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    """x with its last item repeated up to `size` items."""
    return x if len(x) == size else torch.cat([x, x[-1:].expand(size - len(x), *x.shape[1:])])
