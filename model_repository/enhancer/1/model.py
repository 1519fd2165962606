"""enhancer: FACES (n, 3, R, R) -> RESTORED, the user's face restoration network (spandrel), batched."""

import triton_python_backend_utils as pb_utils

from latentsync_core.face.enhance import load_face_enhancer
from latentsync_serving.backend import ModelContext, serve_batch


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args, tf32=True)
        self.enhancer = load_face_enhancer(
            self.ctx.path("weights"),
            device=self.ctx.device,
            dtype=self.ctx.dtype(),
            fidelity=float(self.ctx.params.get("fidelity") or 0.5),
        )

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["FACES"], ["RESTORED"], lambda faces: [self.enhancer(faces)], self.ctx)
