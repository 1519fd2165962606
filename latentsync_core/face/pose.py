"""Head pose from the three alignment points, and the choice of a frontal face in a still image.

Yaw and roll come from the points alone (left eyebrow centre, right eyebrow centre, nose centre), with a rigid
head model and an orthographic camera:
  * the head: MediaPipe's canonical face model (face_geometry/data/canonical_face_model.obj) averaged over the
    same mesh landmarks the detector averages (detectors/mediapipe_tflite.py). In units of the inter-brow
    distance, with the origin at the brow midpoint, the brows are at (-1/2, 0, 0) and (1/2, 0, 0) and the nose
    centre at (0, NOSE_DROP, NOSE_DEPTH): 0.761 below the brow line and 0.272 in front of it;
  * the pose: R = Rz(roll) Ry(yaw) Rx(pitch) (x right, y down, z towards the camera); yaw > 0 when the face
    turns towards the image's right, roll > 0 when the brow line turns clockwise on screen.
The brow line then keeps the roll exactly and shrinks to cos(yaw) of its length. With the nose offset from the
brow midpoint measured along (u) and across (v) the brow line in units of the projected inter-brow distance:
    u = tan(yaw) * depth,   v = drop / cos(yaw),   depth^2 + drop^2 = NOSE_DROP^2 + NOSE_DEPTH^2
where (drop, depth) is the nose vector after the (unknown) pitch. Eliminating pitch leaves a quadratic in
c = cos^2(yaw) with exactly one root in (0, 1]. Using v as well as u matters: the nose centre is 2.8x further
below the brows than in front of them, so a small pitch changes the depth a lot (looking down 20 degrees puts the
nose centre level with the brows in depth, and u alone would read 0 yaw at any turn), whereas the foreshortening
of the brow line against the nose drop does not depend on pitch.

Accuracy, against the yaw of the detector's full 3D mesh fitted to the canonical model (468 points, orthogonal
Procrustes; MediaPipe weights, every frame of the four test clips): mean |error| 1.2-4.0 degrees per clip, 95th
percentile <= 7, largest 8.9 (frontal talking heads, reference yaw -18..+23 degrees, pitch -11..+26); on t1.jpg's
five faces (reference -35..+6 degrees) within 7.6. Limits: in the model the sign flips for faces looking down by
more than ~20 degrees (the magnitude holds; t1.jpg's faces looking down ~25 degrees kept theirs); a face whose nose
sits lower than the model's (v above 0.808 at yaw 0) reads as turned by acos(0.808 / v), and near that point one
pixel moves the yaw by a few degrees; perspective, expressions and each face's own proportions are not modelled. The
constants come from the MediaPipe mesh; InsightFace 2d106 points with the same anatomical roles should land close to
them but were not measured (no weights here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .detect import FaceDetector, box_iou

NOSE_DROP = 0.761  # nose centre below the brow line, in inter-brow distances (canonical face model)
NOSE_DEPTH = 0.272  # nose centre in front of the brow centres, same units
DEFAULT_MAX_YAW = 26.0  # degrees: above every frame of the frontal test clips (<= 23), below t1.jpg's turned faces
FRONTAL_MAX_YAW = 15.0  # degrees: a face clearly facing the camera, for choosing the face of a still image


def brow_frame(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(..., 3, 2) points -> (u, v, roll in radians): the nose offset from the brow midpoint along / across the
    brow line, in units of the brow distance. Degenerate points (brows at one place, e.g. the all-zero points of
    a frame without a face) give NaN."""
    p = np.asarray(points, np.float64)
    left, right, nose = p[..., 0, :], p[..., 1, :], p[..., 2, :]
    brow = right - left
    with np.errstate(invalid="ignore", divide="ignore"):
        length = np.hypot(brow[..., 0], brow[..., 1])
        cos, sin = brow[..., 0] / length, brow[..., 1] / length
        offset = nose - (left + right) / 2
        u = (offset[..., 0] * cos + offset[..., 1] * sin) / length
        v = (offset[..., 1] * cos - offset[..., 0] * sin) / length
    return u, v, np.arctan2(brow[..., 1], brow[..., 0])


def head_pose(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 3, 2) alignment points -> (yaw, roll) in degrees, each shaped (...); NaN where there is no face."""
    u, v, roll = brow_frame(points)
    u2, v2, n2 = u * u, v * v, NOSE_DROP**2 + NOSE_DEPTH**2
    # v2 c^2 - s c + n2 = 0, smaller root, written so that v = 0 is fine; s^2 >= 4 v2 n2 always
    s = u2 + v2 + n2
    cos2 = 2 * n2 / (s + np.sqrt(np.maximum(s * s - 4 * v2 * n2, 0)))
    yaw = np.copysign(np.degrees(np.arccos(np.sqrt(np.clip(cos2, 0, 1)))), u)
    return yaw, np.degrees(roll)


def yaw_degrees(points: np.ndarray) -> np.ndarray:
    """(..., 3, 2) alignment points -> (...) signed yaw in degrees (NaN where there is no face)."""
    return head_pose(points)[0]


def too_turned(points: np.ndarray, max_yaw: float = DEFAULT_MAX_YAW) -> np.ndarray:
    """(n, 3, 2) alignment points -> (n,) bool: |yaw| > max_yaw. Frames without a face (all-zero points) are
    False here: they are already face-less, not turned."""
    with np.errstate(invalid="ignore"):
        return np.abs(yaw_degrees(points)) > max_yaw


# --- a frontal face of a still image ------------------------------------------------------------------------------
@dataclass
class FrontalCrop:
    image: np.ndarray  # (h, w, 3) uint8 RGB: the input cut around the chosen face
    window: tuple[int, int, int, int]  # x0, y0, x1, y1 of the cut in the input image
    boxes: np.ndarray  # (k, 4) every accepted face of the input (the detector's reported boxes)
    points: np.ndarray  # (k, 3, 2) their alignment points
    yaw: np.ndarray  # (k,) their yaw in degrees
    chosen: int  # index of the face the cut is made for


def all_faces(detector: FaceDetector, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every face of one image that passes the detector's acceptance test, in the detector's candidate order:
    (stage-1 boxes (k, 4), reported boxes (k, 4), points (k, 3, 2))."""
    candidates = detector.propose([image])[0]
    ok = np.flatnonzero(detector.face_filter.accepts(candidates.boxes, candidates.scores))
    if not len(ok):
        return np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32), np.zeros((0, 3, 2), np.float32)
    points, boxes = detector.locate([image] * len(ok), candidates.boxes[ok], candidates.keypoints[ok])
    return candidates.boxes[ok], boxes, points


def frontal_crop(
    image: np.ndarray, detector: FaceDetector, max_yaw: float = FRONTAL_MAX_YAW, margin: float = 1.0
) -> FrontalCrop:
    """Cut a still image around its largest face with |yaw| <= max_yaw, so that a detector that syncs the
    largest face (upstream's rule) picks that one.

    The cut extends `margin` face sizes beyond the face box on each side (clipped to the image); while it holds
    another face's centre or the detector would pick another face of it, the margin is halved (up to 4 times).
    Raises ValueError when no face is frontal enough or no cut isolates it.
    """
    stage1, boxes, points = all_faces(detector, image)
    yaw = yaw_degrees(points)
    frontal = np.flatnonzero(np.abs(yaw) <= max_yaw)
    if not len(frontal):
        found = ", ".join(f"{y:+.0f}" for y in yaw) or "none"
        raise ValueError(f"no face with |yaw| <= {max_yaw:g} degrees (faces found, yaw in degrees: {found})")
    b = stage1[frontal].astype(np.int64)  # the same area as select_faces' "largest"
    chosen = int(frontal[np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))])

    h, w = image.shape[:2]
    x0, y0, x1, y1 = boxes[chosen]
    others = np.delete((boxes[:, :2] + boxes[:, 2:]) / 2, chosen, axis=0)  # face centres that must stay out
    for _ in range(5):
        pad = margin * max(x1 - x0, y1 - y0)
        window = (
            max(int(x0 - pad), 0),
            max(int(y0 - pad), 0),
            min(int(np.ceil(x1 + pad)), w),
            min(int(np.ceil(y1 + pad)), h),
        )
        if not ((others >= window[:2]) & (others < window[2:])).all(axis=1).any():
            cut = np.ascontiguousarray(image[window[1] : window[3], window[0] : window[2]])
            picked = detector.detect(cut[None])
            offset = np.array(window[:2] * 2, np.float32)
            if picked.found[0] and box_iou(picked.boxes[0] + offset, boxes[chosen][None])[0] >= 0.5:
                return FrontalCrop(cut, window, boxes, points, yaw, chosen)
        margin /= 2
    raise ValueError(f"no cut around face {chosen} makes it the detector's pick")
