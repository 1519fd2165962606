"""vae_encoder: uint8 FACES (n, 3, R, R) and KEEP (n, 1, R, R) -> unscaled posterior MEAN, STD (n, 4, R/8, R/8)."""

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

    def run(self, faces, keep):
        post = self.codec.encode_faces(faces, keep)
        return [post.mean, post.std]

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["FACES", "KEEP"], ["MEAN", "STD"], self.run, self.ctx)
