"""MediaPipe weights: BlazeFace detector + 468-point face mesh, .tflite files run with LiteRT (ai-edge-litert).

The files come from the mediapipe==0.10.21 wheel (Apache-2.0). Only the files are used: mediapipe's own graph
runtime needs protobuf<5, which clashes with onnx, so the pre/post-processing of its face_detection and
face_landmark graphs is done here with numpy/cv2:
  * detector: letterbox to the model square, [-1, 1] input, SSD anchors, sigmoid scores, weighted NMS;
  * mesh ROI: detector box centre, side = 1.5 x the longer box side, rotated so the eyes are level
    (face_detection_front_detection_to_roi); crop 192 x 192 in [0, 1]; landmarks mapped back to the frame.

Alignment points from the mesh. Upstream averages InsightFace 2d106 points [43,48,49,51,50] (image-left
eyebrow: its outer end and upper edge, = ibug-68 points 17-21), [101..105] (image-right eyebrow, ibug 22-26) and
[74,77,83,86] (nose: ibug 29, 31, 35, 30). The mesh points with the same anatomical roles (the common
MediaPipe -> ibug-68 correspondence) are below; like upstream, landmarks are rounded before the means and the
means are rounded again.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..detect import Candidates, FaceDetector, FaceFilter

MESH_LEFT_BROW = [70, 63, 105, 66, 107]  # image-left eyebrow upper edge, outer -> inner (ibug 17-21)
MESH_RIGHT_BROW = [336, 296, 334, 293, 300]  # image-right eyebrow upper edge, inner -> outer (ibug 22-26)
MESH_NOSE = [5, 4, 98, 327]  # nose: bridge (ibug 29), tip (30), alar base left/right (31, 35)
MESH_FILE = "face_landmark.tflite"
MESH_SIZE = 192
ROI_SCALE = 1.5  # mesh crop side / longer detector box side


@dataclass(frozen=True)
class BlazeFaceSpec:
    """One BlazeFace variant: file, square input size, SSD anchor layout and its own score threshold."""

    file: str
    input_size: int
    strides: tuple[int, ...]  # one entry per output head (layers with equal strides are merged)
    anchors_per_cell: tuple[int, ...]
    min_score: float
    nms_iou: float = 0.3


BLAZEFACE = {
    # full range (faces up to ~5 m): handles the small face of a 1080x1920 portrait frame letterboxed to 192
    "full_range": BlazeFaceSpec("face_detection_full_range_sparse.tflite", 192, (4,), (1,), 0.6),
    "short_range": BlazeFaceSpec("face_detection_short_range.tflite", 128, (8, 16), (2, 6), 0.5),
}


def mediapipe_model_dir() -> Path:
    """The modules/ folder of the installed mediapipe wheel (found without importing mediapipe)."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mediapipe==0.10.21 is not installed; install it (pip install --no-deps "
            "mediapipe==0.10.21) or pass model_dir with its .tflite files"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "modules"


def find_model_file(model_dir: Path, name: str) -> Path:
    for path in (model_dir / name, *sorted(model_dir.glob(f"*/{name}"))):
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} not found in {model_dir} (nor in its sub-folders)")


def ssd_anchor_centres(spec: BlazeFaceSpec) -> np.ndarray:
    """(num_anchors, 2) normalised anchor centres in the model's output order (fixed-size anchors)."""
    centres = []
    for stride, per_cell in zip(spec.strides, spec.anchors_per_cell):
        cells = -(-spec.input_size // stride)
        y, x = np.mgrid[0:cells, 0:cells]
        grid = (np.stack([x, y], -1).reshape(-1, 2) + 0.5) / cells
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


class TFLiteModel:
    """LiteRT interpreters for one .tflite file, one per power-of-two batch size (resizing an interpreter
    re-plans it, which costs far more than a run, so each size is planned once and a batch of n runs as
    chunks of n's binary digits, largest first, at most `max_batch` frames each)."""

    def __init__(self, path: Path, num_threads: int | None = None, max_batch: int = 32):
        self.path, self.num_threads, self.max_batch = str(path), num_threads, max_batch
        self.interpreters: dict[int, object] = {}

    def _interpreter(self, batch: int):
        if batch not in self.interpreters:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(self.path, num_threads=self.num_threads)
            detail = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
            interpreter.allocate_tensors()
            self.interpreters[batch] = interpreter
        return self.interpreters[batch]

    def _chunks(self, n: int) -> list[int]:
        sizes = [self.max_batch] * (n // self.max_batch)
        rest = n % self.max_batch
        return sizes + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]

    def __call__(self, batch: np.ndarray, unbatch=None) -> list[np.ndarray]:
        """Model outputs (in output order) for a float32 (n, h, w, c) batch, each with leading dim n.

        unbatch(outputs, size) -> per-sample arrays, for graphs whose outputs do not keep the batch dim.
        """
        unbatch = unbatch or (lambda outputs, size: [o.reshape(size, *o.shape[1:]) for o in outputs])
        chunks, start = [], 0
        for size in self._chunks(len(batch)):
            interpreter = self._interpreter(size)
            interpreter.set_tensor(
                interpreter.get_input_details()[0]["index"],
                np.ascontiguousarray(batch[start : start + size], np.float32),
            )
            interpreter.invoke()
            chunks.append(unbatch([interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()], size))
            start += size
        return [np.concatenate(parts) for parts in zip(*chunks)]


def weighted_nms(boxes: np.ndarray, scores: np.ndarray, keypoints: np.ndarray, iou_threshold: float):
    """MediaPipe's WEIGHTED suppression: each cluster (IoU > threshold with its best box) is score-averaged."""
    order = np.argsort(-scores, kind="stable")
    out_boxes, out_scores, out_kps = [], [], []
    while len(order):
        top = order[0]
        lt = np.maximum(boxes[top, :2], boxes[order, :2])
        rb = np.minimum(boxes[top, 2:], boxes[order, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        area = np.prod(boxes[order, 2:] - boxes[order, :2], axis=1)
        iou = inter / np.maximum(area[0] + area - inter, 1e-9)
        iou[0] = 1.0  # the top box always leads its own cluster (even a degenerate, zero-area one)
        cluster, order = order[iou > iou_threshold], order[iou <= iou_threshold]
        w = scores[cluster, None] / scores[cluster].sum()
        out_boxes.append((boxes[cluster] * w).sum(0))
        out_kps.append((keypoints[cluster] * w[:, :, None]).sum(0))
        out_scores.append(scores[top])
    return np.array(out_boxes, np.float32), np.array(out_scores, np.float32), np.array(out_kps, np.float32)


class MediaPipeDetector(FaceDetector):
    num_keypoints = 6  # right eye, left eye, nose tip, mouth, right ear, left ear (subject's sides)

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        detector: str = "full_range",
        num_threads: int | None = None,
        max_batch: int = 32,
        face_filter: FaceFilter | None = None,
        policy: str = "largest",
    ):
        super().__init__(face_filter, policy)
        if detector not in BLAZEFACE:
            raise ValueError(f"mediapipe detector must be one of {sorted(BLAZEFACE)}, got {detector!r}")
        if importlib.util.find_spec("ai_edge_litert") is None:
            raise ImportError(
                "the mediapipe face detector runs its .tflite files with LiteRT: pip install ai-edge-litert"
            )
        model_dir = Path(model_dir) if model_dir is not None else mediapipe_model_dir()
        self.spec = BLAZEFACE[detector]
        self.detector = TFLiteModel(find_model_file(model_dir, self.spec.file), num_threads, max_batch)
        self.mesh = TFLiteModel(find_model_file(model_dir, MESH_FILE), num_threads, max_batch)
        self.anchors = ssd_anchor_centres(self.spec)
        # per-head anchor counts: a batched run flattens each head to (1, batch * count, c) before concatenation
        self.head_sizes = [
            (-(-self.spec.input_size // s)) ** 2 * k for s, k in zip(self.spec.strides, self.spec.anchors_per_cell)
        ]

    # --- stage 1: BlazeFace ---------------------------------------------------------------------------------
    def _letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        size = self.spec.input_size
        h, w = frame.shape[:2]
        scale = size / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        top, left = (size - nh) // 2, (size - nw) // 2
        canvas = np.zeros((size, size, 3), np.uint8)  # black bars, like mediapipe's zero border
        canvas[top : top + nh, left : left + nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
        return canvas, scale, left, top

    def _unbatch(self, outputs: list[np.ndarray], n: int) -> list[np.ndarray]:
        """(1, sum_h n * count_h, c) head-major outputs -> (n, num_anchors, c)."""
        split = []
        for out in outputs:
            flat, heads, start = out.reshape(-1, out.shape[-1]), [], 0
            for count in self.head_sizes:
                heads.append(flat[start : start + n * count].reshape(n, count, -1))
                start += n * count
            split.append(np.concatenate(heads, axis=1))
        return split

    def propose(self, frames: list[np.ndarray]) -> list[Candidates]:
        boxes_in = [self._letterbox(f) for f in frames]
        batch = np.stack([b[0] for b in boxes_in]).astype(np.float32) / 127.5 - 1.0
        outputs = self.detector(batch, self._unbatch)
        regressors, logits = sorted(outputs, key=lambda o: -o.shape[-1])  # (n, a, 16) box + keypoints, (n, a, 1)
        scores = 1.0 / (1.0 + np.exp(-np.clip(logits[..., 0].astype(np.float64), -100, 100)))

        size = self.spec.input_size
        candidates = []
        for reg, score, (_, scale, left, top) in zip(regressors, scores, boxes_in):
            keep = np.flatnonzero(score >= self.spec.min_score)
            if not len(keep):
                candidates.append(Candidates.none(self.num_keypoints))
                continue
            r, a = reg[keep], self.anchors[keep] * size  # decode in model-input pixels
            centre, half = r[:, :2] + a, r[:, 2:4] / 2
            boxes = np.concatenate([centre - half, centre + half], axis=1)
            kps = r[:, 4:].reshape(len(keep), -1, 2) + a[:, None]
            boxes, s, kps = weighted_nms(boxes, score[keep], kps, self.spec.nms_iou)
            offset = np.array([left, top], np.float32)
            boxes = ((boxes.reshape(-1, 2, 2) - offset) / scale).reshape(-1, 4)  # undo the letterbox
            candidates.append(
                Candidates(boxes.astype(np.float32), s.astype(np.float32), ((kps - offset) / scale).astype(np.float32))
            )
        return candidates

    # --- stage 2: face mesh -----------------------------------------------------------------------------------
    @staticmethod
    def roi_affine(box: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """2x3 frame -> mesh-crop matrix: square ROI around the box, rotated so the eyes are level."""
        (x0, y0, x1, y1), (right_eye, left_eye) = box, keypoints[:2]
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        side = max(x1 - x0, y1 - y0) * ROI_SCALE
        angle = np.arctan2(left_eye[1] - right_eye[1], left_eye[0] - right_eye[0])
        ax = np.array([np.cos(angle), np.sin(angle)]) * side / 2  # half the ROI's x axis
        ay = np.array([-np.sin(angle), np.cos(angle)]) * side / 2  # half its y axis (image y points down)
        corners = np.float32([centre - ax - ay, centre + ax - ay, centre - ax + ay])  # TL, TR, BL
        return cv2.getAffineTransform(corners, np.float32([[0, 0], [MESH_SIZE, 0], [0, MESH_SIZE]]))

    def mesh_landmarks(self, frames: list[np.ndarray], boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
        """(m, 468, 2) mesh landmarks in frame pixels."""
        affines = [self.roi_affine(b, k) for b, k in zip(boxes, keypoints)]
        crops = np.stack(
            [
                cv2.warpAffine(f, m, (MESH_SIZE, MESH_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                for f, m in zip(frames, affines)
            ]
        )
        outputs = self.mesh(crops.astype(np.float32) / 255.0)  # (m, 1, 1, 1404) mesh, (m, 1, 1, 1) face logit
        mesh = max(outputs, key=lambda o: o.shape[-1]).reshape(len(frames), -1, 3)[..., :2]
        inverse = np.stack([cv2.invertAffineTransform(m) for m in affines])  # (m, 2, 3)
        return np.einsum("nij,nkj->nki", inverse[:, :, :2], mesh) + inverse[:, None, :, 2]

    def locate(self, frames: list[np.ndarray], boxes: np.ndarray, keypoints: np.ndarray):
        landmarks = np.round(self.mesh_landmarks(frames, boxes, keypoints))
        points = [np.round(landmarks[:, idx].mean(axis=1)) for idx in (MESH_LEFT_BROW, MESH_RIGHT_BROW, MESH_NOSE)]
        # reported box: the mesh's extent, which covers brows to chin like SCRFD / YuNet boxes (BlazeFace's
        # square box is looser: IoU vs YuNet ~0.75 instead of ~0.85 on the demo clips)
        mesh_boxes = np.concatenate([landmarks.min(axis=1), landmarks.max(axis=1)], axis=1)
        return np.stack(points, axis=1).astype(np.float32), mesh_boxes.astype(np.float32)
