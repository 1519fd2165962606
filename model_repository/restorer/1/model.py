"""restorer: paste generated FACES back into FRAMES through their AFFINES -> RESTORED frames."""
import torch
import triton_python_backend_utils as pb_utils

from latentsync_core.face.align import box_hw
from latentsync_core.face.restore import paste_back, resize_face_to_box
from latentsync_serving.backend import ModelContext, serve_batch


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ModelContext.from_args(args)

    def run(self, frames, faces, affines):
        # The crop box follows from the model resolution R, as in the aligner that produced the affines.
        resized = resize_face_to_box(faces, box_hw(faces.shape[-1]))
        return [torch.from_numpy(paste_back(frames.cpu().numpy(), resized, affines.cpu().numpy()))]

    def execute(self, requests):
        return serve_batch(pb_utils, requests, ["FRAMES", "FACES", "AFFINES"], ["RESTORED"], self.run, self.ctx.device)
