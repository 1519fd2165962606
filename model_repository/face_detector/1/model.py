"""face_detector: FRAMES (n, H, W, 3) uint8 RGB [+ REFERENCE_BOX] -> BOX, SCORE, POINTS, FOUND per frame."""

import triton_python_backend_utils as pb_utils

from latentsync_core.face.detect import create_detector, detector_options
from latentsync_serving.backend import ModelContext, serve_admitted


class TritonPythonModel:
    def initialize(self, args):
        self.ctx = ctx = ModelContext.from_args(args, frames=True)
        kind = ctx.params.get("kind") or "mediapipe"
        model_dir = ctx.path("model_dir") if ctx.params.get("model_dir") else None
        self.detector = create_detector(
            kind, model_dir, policy=ctx.params.get("policy") or "largest", **detector_options(kind, ctx.params)
        )

    def execute(self, requests):
        return serve_admitted(pb_utils, self.ctx, requests, self.detect)

    def detect(self, requests):
        frames = [pb_utils.get_input_tensor_by_name(r, "FRAMES").as_numpy() for r in requests]
        references = [pb_utils.get_input_tensor_by_name(r, "REFERENCE_BOX") for r in requests]
        try:  # all requests' frames go through each network as one batch
            results = self.detector.detect_requests(frames, [r if r is None else r.as_numpy()[0] for r in references])
        except Exception as e:  # noqa: BLE001 - reported to every caller of the batch
            error = pb_utils.TritonError(f"face_detector: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        names = ("BOX", "SCORE", "POINTS", "FOUND")
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(n, x)
                    for n, x in zip(names, (r.boxes, r.scores[:, None], r.points, r.found[:, None]))
                ]
            )
            for r in results
        ]
