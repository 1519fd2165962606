"""vae_encoder: PIXELS (n, 3, R, R) -> unscaled posterior MEAN, STD (n, 4, R/8, R/8)."""
import torch
import triton_python_backend_utils as pb_utils

from latentsync_core.vae import load_vae
from latentsync_export.backend_utils import ModelContext, serve_batch, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args)
        self.codec = load_vae(self.ctx.path("vae"), dtype=self.ctx.dtype(), device=str(self.ctx.device))

    @torch.no_grad()
    def run(self, pixels):
        post = self.codec.posterior(torch.from_numpy(pixels).to(self.ctx.device, self.codec.dtype))
        return [to_numpy(post.mean), to_numpy(post.std)]

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["PIXELS"], ["MEAN", "STD"], self.run)
