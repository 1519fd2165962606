"""face_detector: FRAMES (n, H, W, 3) uint8 RGB [+ REFERENCE_BOX] -> BOX, SCORE, POINTS, FOUND per frame."""

import triton_python_backend_utils as pb_utils

from latentsync_core.face.detect import create_detector, detector_options
from latentsync_serving.backend import ModelContext


class TritonPythonModel:
    def initialize(self, args):
        ctx = ModelContext.from_args(args, frames=True)
        kind = ctx.params.get("kind") or "mediapipe"
        model_dir = ctx.path("model_dir") if ctx.params.get("model_dir") else None
        self.detector = create_detector(
            kind, model_dir, policy=ctx.params.get("policy") or "largest", **detector_options(kind, ctx.params)
        )

    def execute(self, requests):
        frames, references = [], []
        for request in requests:
            frames.append(pb_utils.get_input_tensor_by_name(request, "FRAMES").as_numpy())
            reference = pb_utils.get_input_tensor_by_name(request, "REFERENCE_BOX")
            references.append(reference.as_numpy()[0] if reference is not None else None)
        try:  # all requests' frames go through each network as one batch
            results = self.detector.detect_requests(frames, references)
        except Exception as e:  # noqa: BLE001 - reported to every caller of the batch
            error = pb_utils.TritonError(f"face_detector: {type(e).__name__}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("BOX", r.boxes),
                    pb_utils.Tensor("SCORE", r.scores[:, None]),
                    pb_utils.Tensor("POINTS", r.points),
                    pb_utils.Tensor("FOUND", r.found[:, None]),
                ]
            )
            for r in results
        ]
