"""vae_decoder: scaled LATENTS (n, 4, h, w) -> PIXELS (n, 3, 8h, 8w)."""
import torch
import triton_python_backend_utils as pb_utils

from latentsync_core.vae import load_vae
from latentsync_export.backend_utils import ModelContext, serve_batch, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args)
        self.codec = load_vae(self.ctx.path("vae"), dtype=self.ctx.dtype(), device=str(self.ctx.device))

    @torch.no_grad()
    def run(self, latents):
        return [to_numpy(self.codec.decode(torch.from_numpy(latents).to(self.ctx.device, self.codec.dtype)))]

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["LATENTS"], ["PIXELS"], self.run)
