"""InsightFace weights, as upstream: SCRFD detector + 2d106det landmarks from a buffalo_l / buffalo_s folder.

Re-implements what insightface.app.FaceAnalysis(allowed_modules=["detection", "landmark_2d_106"]) does with
det_size=512 and det_thresh=0.5, with onnxruntime + numpy/cv2 (the insightface package needs a Cython build):
  * SCRFD: resize keeping aspect into the top-left of a det_size square (zero padding), blob
    (x - 127.5) / 128 with R and B swapped, distance decoding on anchor centres of strides 8/16/32
    (2 anchors per cell) or 8..128 (1 anchor), score threshold, greedy NMS at IoU 0.4 (the "+1" pixel areas).
  * 2d106det: 192 x 192 crop centred on the box, scale 192 / (1.5 * longer side), R and B swapped,
    mean/std taken from the graph (0/1 for MXNet exports with a `bn_data` node, else 127.5/128); outputs in
    [-1, 1] -> (p + 1) * 96 crop pixels -> frame pixels.
Upstream passes RGB frames where InsightFace expects BGR, so the detectors see R and B exchanged; this module
takes the same RGB frames and applies the same swap, which reproduces upstream's boxes and landmarks.
The weights are for non-commercial research use only (insightface README) and are never downloaded here.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..align import landmarks_to_points
from ..detect import Candidates, FaceDetector, FaceFilter

DETECTOR_FILES = ("det_10g.onnx", "det_500m.onnx", "det_2.5g.onnx")  # buffalo_l, buffalo_s/sc, buffalo_m
LANDMARK_FILES = ("2d106det.onnx",)
LANDMARK_OUTPUTS = 212  # 106 x (x, y)


def onnx_signature(path: Path) -> tuple[list, list]:
    """(input shapes, output shapes) of an ONNX file, read from its graph only."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = lambda v: [d.dim_value or d.dim_param or None for d in v.type.tensor_type.shape.dim]
    initialisers = {i.name for i in graph.initializer}
    return [dims(v) for v in graph.input if v.name not in initialisers], [dims(v) for v in graph.output]


def find_models(model_dir: Path) -> tuple[Path, Path]:
    """The SCRFD and 2d106 files of a model pack: by their usual names, else by signature like insightface's
    model router (detector: >= 5 outputs; 2d106: 192 x 192 input and 212 outputs)."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"InsightFace model folder not found: {model_dir}")
    named = lambda names: next((model_dir / n for n in names if (model_dir / n).is_file()), None)
    detector, landmark = named(DETECTOR_FILES), named(LANDMARK_FILES)
    for path in sorted(model_dir.glob("*.onnx")):
        if detector and landmark:
            break
        inputs, outputs = onnx_signature(path)
        if detector is None and len(outputs) >= 5:
            detector = path
        elif landmark is None and inputs[0][2:] == [192, 192] and outputs[0][-1] == LANDMARK_OUTPUTS:
            landmark = path
    if detector is None or landmark is None:
        raise FileNotFoundError(
            f"{model_dir} lacks an SCRFD detector (det_*.onnx) or the 2d106det landmark "
            "model; point model_dir at an unpacked buffalo_l or buffalo_s folder"
        )
    return detector, landmark


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS in descending score order (SCRFD.nms: areas with +1 pixels); indices kept."""
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0 + 1) * (y1 - y0 + 1)
    order, keep = np.argsort(scores, kind="stable")[::-1], []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return np.array(keep, np.int64)


class OnnxModel:
    """An onnxruntime session fed batches; models exported with batch size 1 are run frame by frame."""

    def __init__(self, path: Path, providers: list[str] | None = None):
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.fixed_batch = self.session.get_inputs()[0].shape[0] == 1

    def __call__(self, blob: np.ndarray) -> list[list[np.ndarray]]:
        """Flattened outputs per sample, [sample][output]. Batched outputs are sample-major whether or not the
        export kept the batch dim (SCRFD's (N*K, c) or (N, K, c); the landmark model's (N, 212))."""
        if self.fixed_batch:
            runs = [self.session.run(None, {self.input_name: blob[i : i + 1]}) for i in range(len(blob))]
            return [[o.reshape(-1) for o in outputs] for outputs in runs]
        outputs = self.session.run(None, {self.input_name: blob})
        return [[o.reshape(len(blob), -1)[i] for o in outputs] for i in range(len(blob))]


class InsightFaceDetector(FaceDetector):
    num_keypoints = 5  # SCRFD-kps: eyes, nose, mouth corners (zeros for models without keypoints)

    def __init__(
        self,
        model_dir: str | Path,
        *,
        det_size: int = 512,
        det_thresh: float = 0.5,
        nms_thresh: float = 0.4,
        providers: list[str] | None = None,
        face_filter: FaceFilter | None = None,
        policy: str = "largest",
    ):
        super().__init__(face_filter, policy)
        detector_path, landmark_path = find_models(Path(model_dir))
        self.det_size, self.det_thresh, self.nms_thresh = det_size, det_thresh, nms_thresh
        self.detector = OnnxModel(detector_path, providers)
        self.landmark = OnnxModel(landmark_path, providers)
        # SCRFD variant from its output count, as insightface.model_zoo.scrfd.SCRFD does
        num_outputs = len(self.detector.session.get_outputs())
        self.levels = 3 if num_outputs in (6, 9) else 5
        self.strides = (8, 16, 32, 64, 128)[: self.levels]
        self.anchors_per_cell = 2 if self.levels == 3 else 1
        self.has_keypoints = num_outputs in (9, 15)
        self.landmark_size = self.landmark.session.get_inputs()[0].shape[2]
        self.landmark_mean, self.landmark_std = self._landmark_normalisation(landmark_path)

    @staticmethod
    def _landmark_normalisation(path: Path) -> tuple[float, float]:
        """insightface's Landmark rule: graphs that normalise internally (Sub/Mul first, or bn_data) take raw pixels."""
        import onnx

        nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
        sub = any(n.name.startswith(("Sub", "_minus")) for n in nodes) or any(n.name == "bn_data" for n in nodes[:3])
        mul = any(n.name.startswith(("Mul", "_mul")) for n in nodes) or any(n.name == "bn_data" for n in nodes[:3])
        return (0.0, 1.0) if sub and mul else (127.5, 128.0)

    def _anchor_centres(self, height: int, width: int, stride: int) -> np.ndarray:
        y, x = np.mgrid[: height // stride, : width // stride]
        centres = (np.stack([x, y], -1).reshape(-1, 2) * stride).astype(np.float32)
        return np.repeat(centres, self.anchors_per_cell, axis=0)

    # --- stage 1: SCRFD --------------------------------------------------------------------------------------
    def _letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        h, w = frame.shape[:2]
        size = self.det_size
        if h / w > 1.0:  # SCRFD.detect with a square input size
            new_h, new_w = size, int(size / (h / w))
        else:
            new_w, new_h = size, int(size * (h / w))
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[:new_h, :new_w] = cv2.resize(frame, (new_w, new_h))
        return canvas, new_h / h

    def propose(self, frames: list[np.ndarray]) -> list[Candidates]:
        letterboxed = [self._letterbox(f) for f in frames]
        # (x - 127.5) / 128 with channels reversed (blobFromImage swapRB=True on upstream's RGB frames)
        blob = (np.stack([c for c, _ in letterboxed])[..., ::-1].astype(np.float32) - 127.5) / 128.0
        per_frame = self.detector(np.ascontiguousarray(blob.transpose(0, 3, 1, 2)))
        centres = [self._anchor_centres(self.det_size, self.det_size, s) for s in self.strides]

        candidates = []
        for outputs, (_, det_scale) in zip(per_frame, letterboxed):
            boxes, scores, kps = [], [], []
            for level, stride in enumerate(self.strides):
                score = outputs[level].reshape(-1)
                keep = np.flatnonzero(score >= self.det_thresh)
                dist = outputs[level + self.levels].reshape(-1, 4)[keep] * stride
                c = centres[level][keep]
                boxes.append(np.concatenate([c - dist[:, :2], c + dist[:, 2:]], axis=1))
                scores.append(score[keep])
                if self.has_keypoints:
                    kps.append(outputs[level + 2 * self.levels].reshape(len(score), -1, 2)[keep] * stride + c[:, None])
            boxes, scores = np.concatenate(boxes) / det_scale, np.concatenate(scores)
            kps = np.concatenate(kps) / det_scale if self.has_keypoints else np.zeros((len(scores), 5, 2))
            order = np.argsort(scores, kind="stable")[::-1]
            boxes, scores, kps = boxes[order], scores[order], kps[order]
            keep = nms(boxes, scores, self.nms_thresh)
            candidates.append(
                Candidates(
                    boxes[keep].astype(np.float32), scores[keep].astype(np.float32), kps[keep].astype(np.float32)
                )
            )
        return candidates

    # --- stage 2: 2d106det -----------------------------------------------------------------------------------
    def crop_affine(self, box: np.ndarray) -> np.ndarray:
        """insightface face_align.transform with rotation 0: scale about the box centre into the crop."""
        w, h = box[2] - box[0], box[3] - box[1]
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        scale = self.landmark_size / (max(w, h) * 1.5)
        return np.array(
            [
                [scale, 0, self.landmark_size / 2 - centre[0] * scale],
                [0, scale, self.landmark_size / 2 - centre[1] * scale],
            ],
            np.float64,
        )

    def landmarks_106(self, frames: list[np.ndarray], boxes: np.ndarray) -> np.ndarray:
        """(m, 106, 2) float landmarks in frame pixels (face.landmark_2d_106)."""
        size = self.landmark_size
        affines = [self.crop_affine(b) for b in boxes]
        crops = np.stack([cv2.warpAffine(f, m, (size, size), borderValue=0.0) for f, m in zip(frames, affines)])
        blob = (crops[..., ::-1].astype(np.float32) - self.landmark_mean) / self.landmark_std  # swapRB=True
        preds = np.stack([o[0] for o in self.landmark(np.ascontiguousarray(blob.transpose(0, 3, 1, 2)))])
        preds = preds.reshape(len(frames), -1, 2)[:, -106:]
        preds = (preds + 1) * (size // 2)
        inverse = np.stack([cv2.invertAffineTransform(m) for m in affines])
        return np.einsum("nij,nkj->nki", inverse[:, :, :2], preds) + inverse[:, None, :, 2]

    def locate(self, frames: list[np.ndarray], boxes: np.ndarray, keypoints: np.ndarray):
        landmarks = np.round(self.landmarks_106(frames, boxes)).astype(np.int64)  # upstream's integer landmarks
        return np.stack([landmarks_to_points(lmk) for lmk in landmarks]), boxes
