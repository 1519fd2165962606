"""restorer: paste generated FACES back into the paste windows (REGIONS) of their frames -> RESTORED regions."""

import torch
import triton_python_backend_utils as pb_utils

from latentsync_core.face.restore import paste_faces
from latentsync_core.face.warm_up import warm_up
from latentsync_serving.backend import ModelContext, serve_batch


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args)
        warm_up(64, align=False, device=self.ctx.device)  # compile the paste's loops before the first request

    def run(self, regions, faces, affines, windows, frame_hw):  # all but FACES in host memory
        regions, windows, frame_hw = regions.numpy(), windows.numpy(), frame_hw.numpy()
        out = regions.copy()
        for i, (y0, y1, x0, x1) in enumerate(windows):  # a region fills the top left of its padded slot
            window = (int(y0), int(y1), int(x0), int(x1))
            h, w = y1 - y0, x1 - x0
            out[i, :h, :w] = paste_faces(
                [regions[i, :h, :w]],
                faces[i : i + 1],
                affines[i : i + 1].numpy(),
                [window],
                tuple(int(v) for v in frame_hw[i]),
            )[0]
        return [torch.from_numpy(out)]

    def execute(self, requests):
        return serve_batch(
            pb_utils,
            requests,
            ["REGIONS", "FACES", "AFFINES", "WINDOWS", "FRAME_HW"],
            ["RESTORED"],
            self.run,
            self.ctx,
            host_inputs=("REGIONS", "AFFINES", "WINDOWS", "FRAME_HW"),  # read on the host: no trip to the GPU and back
        )
