"""vae_decoder: scaled LATENTS (n, 4, h, w) -> PIXELS (n, 3, 8h, 8w)."""

import triton_python_backend_utils as pb_utils

from latentsync_core.loaders import load_vae
from latentsync_serving.backend import ModelContext, serve_batch
from latentsync_serving.stand_ins import NullCodec


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args, tf32=True)
        self.codec = (
            NullCodec()
            if self.ctx.stand_in
            else load_vae(self.ctx.path("vae"), dtype=self.ctx.dtype(), device=self.ctx.device)
        )

    def execute(self, requests):
        return serve_batch(
            pb_utils,
            requests,
            ["LATENTS"],
            ["PIXELS"],
            lambda latents: [self.codec.decode(latents.to(self.codec.dtype))],
            self.ctx,
        )
