"""unet_<variant>: the LatentSync 3D UNet, (SAMPLE, TIMESTEP, AUDIO) -> NOISE_PRED, batched across streams."""
import json

import torch
import triton_python_backend_utils as pb_utils

from latentsync_core.checkpoints import load_unet
from latentsync_export.backend_utils import ModelContext, serve_batch, to_numpy


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args)
        config = json.loads(self.ctx.params.get("unet_config") or "null")  # null -> stage2.yaml
        self.dtype = self.ctx.dtype()
        self.unet = load_unet(self.ctx.path("checkpoint"), config, device=self.ctx.device, dtype=self.dtype)

    @torch.no_grad()
    def run(self, sample, timestep, audio):
        dev, dt = self.ctx.device, self.dtype
        out = self.unet(torch.from_numpy(sample).to(dev, dt), torch.from_numpy(timestep).reshape(-1).to(dev),
                        torch.from_numpy(audio).to(dev, dt))
        return [to_numpy(out)]

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["SAMPLE", "TIMESTEP", "AUDIO"], ["NOISE_PRED"], self.run)
