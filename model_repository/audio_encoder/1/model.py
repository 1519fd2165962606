"""audio_encoder: whisper-tiny encoder, MEL (s, 80, 3000) -> FEATURES (s, 1500, L+1, 384)."""
import torch
import triton_python_backend_utils as pb_utils

from latentsync_core.models.whisper import load_whisper_encoder
from latentsync_export.backend_utils import ModelContext, serve_batch, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args)
        self.encoder = load_whisper_encoder(self.ctx.path("checkpoint"), device=self.ctx.device)

    @torch.no_grad()
    def run(self, mel):
        return [to_numpy(self.encoder(torch.from_numpy(mel).to(self.ctx.device)))]

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["MEL"], ["FEATURES"], self.run)
