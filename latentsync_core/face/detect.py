"""Face detection for alignment: per frame, one face box, its score and the three alignment points.

Two interchangeable weight sets implement the same two-stage detector (see latentsync_core/face/detectors/):
  * "mediapipe"   (default): BlazeFace full-range detector + 468-point face mesh, the .tflite files that the
                  mediapipe==0.10.21 wheel ships (Apache-2.0), run with LiteRT.
  * "insightface" (as upstream): SCRFD + 2d106det ONNX files of a user-provided buffalo_l / buffalo_s folder
                  (non-commercial weights; never downloaded here), run with onnxruntime.

Stage 1 proposes candidate boxes for every frame of a batch, `select_faces` keeps the ones that pass
upstream's acceptance test (`FaceFilter`) and picks one per frame by an explicit policy, and stage 2 turns the
picked box into landmarks and then into the three points AlignRestore needs (left eyebrow, right eyebrow,
nose centres; integer-valued like upstream's rounded landmarks). The reported box is SCRFD's (insightface) or
the face mesh's extent (mediapipe); the acceptance test runs on the stage-1 box.

Multi-face policy:
  * "largest": the candidate with the largest (integer) box area, ties to the higher score; upstream's rule.
  * "track":   the candidate that overlaps most (IoU) with the previous frame's pick of the same request,
               starting from `reference_box` (e.g. the last box of the stream's previous request); falls back
               to "largest" when there is no reference yet or nothing overlaps it.
Frames without an accepted face come back with found=False and zero box / score / points; what to do with
them (pass-through, error when a whole stream has none) is the caller's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

POLICIES = ("largest", "track")


@dataclass
class FaceResult:
    """Per-frame detection results of one request; rows with found=False are all zero."""

    boxes: np.ndarray  # (n, 4) float32 x0, y0, x1, y1 in frame pixels (may reach outside the frame)
    scores: np.ndarray  # (n,) float32 detector confidence
    points: np.ndarray  # (n, 3, 2) float32 (x, y): left eyebrow, right eyebrow, nose centre (integer-valued)
    found: np.ndarray  # (n,) bool

    @classmethod
    def empty(cls, n: int) -> FaceResult:
        return cls(
            np.zeros((n, 4), np.float32), np.zeros(n, np.float32), np.zeros((n, 3, 2), np.float32), np.zeros(n, bool)
        )

    def __len__(self) -> int:
        return len(self.found)


@dataclass
class Candidates:
    """Stage-1 output for one frame: k candidate faces in frame pixels, sorted by descending score."""

    boxes: np.ndarray  # (k, 4) float32 x0, y0, x1, y1
    scores: np.ndarray  # (k,) float32
    keypoints: np.ndarray  # (k, p, 2) float32 detector keypoints (eyes, nose, ...), used by stage 2

    @classmethod
    def none(cls, num_keypoints: int) -> Candidates:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, num_keypoints, 2), np.float32))


@dataclass(frozen=True)
class FaceFilter:
    """Upstream's acceptance test (latentsync/utils/face_detector.py), on the integer-truncated box."""

    min_width: int = 50
    min_height: int = 80
    min_aspect: float = 0.2  # width / height
    max_aspect: float = 1.5
    min_score: float = 0.5

    def accepts(self, boxes: np.ndarray, scores: np.ndarray) -> np.ndarray:
        b = boxes.astype(np.int64)  # upstream: face.bbox.astype(np.int_)
        w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        aspect = w / np.maximum(h, 1)
        return (
            (w >= self.min_width)
            & (h >= self.min_height)
            & (h > 0)
            & (aspect >= self.min_aspect)
            & (aspect <= self.max_aspect)
            & (scores >= self.min_score)
        )


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (4,) box against (k, 4) boxes (x0, y0, x1, y1)."""
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def select_faces(
    candidates: Sequence[Candidates],
    face_filter: FaceFilter,
    policy: str = "largest",
    reference_box: np.ndarray | None = None,
) -> np.ndarray:
    """Index of the chosen candidate per frame (-1: no accepted face). Frames are one request, in order."""
    if policy not in POLICIES:
        raise ValueError(f"face policy must be one of {POLICIES}, got {policy!r}")
    reference = None
    if reference_box is not None and np.all(np.isfinite(reference_box)):  # NaN: no reference yet
        reference = np.asarray(reference_box, np.float32).reshape(4)
    picks = np.full(len(candidates), -1, np.int64)
    for i, cand in enumerate(candidates):
        ok = np.flatnonzero(face_filter.accepts(cand.boxes, cand.scores))
        if not len(ok):
            continue  # "track" keeps the last known box as reference across face-less frames
        pick = -1
        if policy == "track" and reference is not None:
            iou = box_iou(reference, cand.boxes[ok])
            if iou.max() > 0:
                pick = ok[int(np.argmax(iou))]
        if pick < 0:
            b = cand.boxes[ok].astype(np.int64)
            area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            pick = ok[int(np.argmax(area))]  # first maximum = highest score among equals (score-sorted)
        picks[i] = pick
        reference = cand.boxes[pick]
    return picks


def as_frame_list(frames) -> list[np.ndarray]:
    """(n, H, W, 3) uint8 array or a sequence of (H, W, 3) uint8 arrays -> list of frames."""
    if isinstance(frames, np.ndarray) and frames.ndim != 4:
        raise ValueError(f"frames must be uint8 RGB images shaped (n, H, W, 3), got shape {frames.shape}")
    frames = list(frames)
    for f in frames:
        if f.ndim != 3 or f.shape[2] != 3 or f.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 RGB images shaped (n, H, W, 3), got {f.dtype} {f.shape}")
    return frames


class FaceDetector:
    """Batch face detector; subclasses provide the two stages for one weight set."""

    num_keypoints: int = 0

    def __init__(self, face_filter: FaceFilter | None = None, policy: str = "largest"):
        if policy not in POLICIES:
            raise ValueError(f"face policy must be one of {POLICIES}, got {policy!r}")
        self.face_filter = face_filter or FaceFilter()
        self.policy = policy

    # --- the two stages, per weight set -------------------------------------------------------------------
    def propose(self, frames: list[np.ndarray]) -> list[Candidates]:
        """Stage 1: candidate faces of every frame (score-sorted, in frame pixels)."""
        raise NotImplementedError

    def locate(self, frames: list[np.ndarray], boxes: np.ndarray, keypoints: np.ndarray):
        """Stage 2, one chosen face per given frame -> ((m, 3, 2) alignment points, (m, 4) reported boxes)."""
        raise NotImplementedError

    # --- public API ---------------------------------------------------------------------------------------
    def detect(self, frames, reference_box: np.ndarray | None = None) -> FaceResult:
        """Frames of one stream, in order: uint8 (n, H, W, 3) RGB -> FaceResult."""
        return self.detect_requests([frames], [reference_box])[0]

    def detect_requests(self, requests: Sequence, reference_boxes: Sequence | None = None) -> list[FaceResult]:
        """Several independent requests (e.g. a Triton dynamic batch, one stream each) in one batched pass.

        The face choice of a request depends only on its own frames and reference box, never on the others.
        """
        per_request = [as_frame_list(r) for r in requests]
        reference_boxes = list(reference_boxes) if reference_boxes is not None else [None] * len(per_request)
        if len(reference_boxes) != len(per_request):
            raise ValueError(f"{len(per_request)} requests but {len(reference_boxes)} reference boxes")
        frames = [f for fs in per_request for f in fs]
        candidates = self.propose(frames) if frames else []
        picks, start = [], 0
        for fs, ref in zip(per_request, reference_boxes):
            picks.append(select_faces(candidates[start : start + len(fs)], self.face_filter, self.policy, ref))
            start += len(fs)
        picks = np.concatenate(picks) if picks else np.zeros(0, np.int64)

        result = FaceResult.empty(len(frames))
        hit = np.flatnonzero(picks >= 0)
        if len(hit):
            chosen = [candidates[i] for i in hit]
            boxes = np.stack([c.boxes[k] for c, k in zip(chosen, picks[hit])])
            keypoints = np.stack([c.keypoints[k] for c, k in zip(chosen, picks[hit])])
            result.points[hit], result.boxes[hit] = self.locate([frames[i] for i in hit], boxes, keypoints)
            result.scores[hit] = [c.scores[k] for c, k in zip(chosen, picks[hit])]
            result.found[hit] = True

        out, start = [], 0
        for fs in per_request:
            sl = slice(start, start + len(fs))
            out.append(FaceResult(result.boxes[sl], result.scores[sl], result.points[sl], result.found[sl]))
            start += len(fs)
        return out


def create_detector(
    kind: str = "mediapipe",
    model_dir: str | Path | None = None,
    *,
    face_filter: FaceFilter | None = None,
    policy: str = "largest",
    **options,
) -> FaceDetector:
    """Build a detector for one weight set.

    kind="mediapipe": model_dir holds face_detection_full_range_sparse.tflite (or _short_range) and
        face_landmark.tflite (flat, or mediapipe's modules/ layout); default: the installed mediapipe wheel.
        options: detector="full_range"|"short_range", num_threads.
    kind="insightface": model_dir is a buffalo_l / buffalo_s folder (det_*.onnx + 2d106det.onnx); required.
        options: det_size (default 512, upstream's INSIGHTFACE_DETECT_SIZE), det_thresh, nms_thresh, providers.
    """
    if kind == "mediapipe":
        from .detectors.mediapipe_tflite import MediaPipeDetector

        return MediaPipeDetector(model_dir, face_filter=face_filter, policy=policy, **options)
    if kind == "insightface":
        from .detectors.insightface_onnx import InsightFaceDetector

        if model_dir is None:
            raise ValueError(
                "the insightface detector needs model_dir: a buffalo_l or buffalo_s folder "
                "(non-commercial weights, not downloaded by this package)"
            )
        return InsightFaceDetector(model_dir, face_filter=face_filter, policy=policy, **options)
    raise ValueError(f"unknown face detector kind {kind!r}; expected 'mediapipe' or 'insightface'")


def detector_options(kind: str, params: Mapping[str, str]) -> dict:
    """The face_detector model's config parameters (strings; empty = default) that apply to one weight set, as
    create_detector keyword arguments."""
    if kind == "mediapipe":
        threads = int(params.get("num_threads") or 0)
        return {"detector": params.get("detector") or "full_range", "num_threads": threads or None}
    if kind == "insightface":
        providers = [p.strip() for p in (params.get("providers") or "").split(",") if p.strip()]
        return {"det_size": int(params.get("det_size") or 512), "providers": providers or None}
    return {}
