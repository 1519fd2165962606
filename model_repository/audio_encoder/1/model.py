"""audio_encoder: whisper-tiny encoder, MEL (s, 80, 3000) -> FEATURES (s, 1500, L+1, 384)."""

import triton_python_backend_utils as pb_utils

from latentsync_core.loaders import load_whisper_encoder
from latentsync_serving.backend import ModelContext, serve_batch
from latentsync_serving.stand_ins import NullAudioEncoder


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args, tf32=True)
        self.encoder = (
            NullAudioEncoder()
            if self.ctx.stand_in
            else load_whisper_encoder(self.ctx.path("checkpoint"), device=self.ctx.device)
        )

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["MEL"], ["FEATURES"], lambda mel: [self.encoder(mel)], self.ctx)
