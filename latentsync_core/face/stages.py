"""A picture of what each face stage did to one frame: detection, alignment, mask, generation, paste-back.

Panels, left to right, each scaled to one height under a label bar:
  input (whole frame, detected box and the three alignment points) | detection (zoom on the face) |
  aligned face (crosses: where alignment puts the three points) | mouth mask (regenerated region tinted) |
  generated face | pasted back (the same zoom on the output) | output (whole frame).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .align import BOX_WH, FACE_TEMPLATE

BOX_COLOR = (0, 255, 0)
POINT_COLORS = ((255, 0, 0), (0, 128, 255), (255, 255, 0))  # left brow, right brow, nose (RGB)
TINT = np.array([255, 0, 64], np.float32)  # the regenerated region of the mask panel, blended 50 %
LABEL_H, GAP = 24, 4
BACKGROUND = (32, 32, 32)
ZOOM = 1.6  # zoom panels: a square of ZOOM x the longer box side around the box centre


def zoom_window(box: np.ndarray, frame_hw: tuple[int, int], zoom: float = ZOOM) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) integer window of the frame around the box (clipped, never empty)."""
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    half = zoom * max(x1 - x0, y1 - y0, 1) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    h, w = frame_hw
    left, top = int(np.clip(cx - half, 0, w - 1)), int(np.clip(cy - half, 0, h - 1))
    return left, top, max(int(np.clip(cx + half, 0, w)), left + 1), max(int(np.clip(cy + half, 0, h)), top + 1)


def scale_to_height(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """Resize keeping the aspect ratio; returns the image and the scale factor."""
    scale = height / image.shape[0]
    width = max(1, round(image.shape[1] * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interpolation), scale


def draw_detection(
    image: np.ndarray, box: np.ndarray, points: np.ndarray, scale: float = 1.0, origin: tuple[float, float] = (0, 0)
) -> np.ndarray:
    """Copy of image with the box and the three points drawn; frame coordinates map to (xy - origin) * scale."""
    out = image.copy()
    to_px = lambda xy: tuple(int(round(c)) for c in (np.asarray(xy, np.float64) - origin) * scale)
    box = np.asarray(box, np.float64).reshape(2, 2)
    cv2.rectangle(out, to_px(box[0]), to_px(box[1]), BOX_COLOR, 2)
    radius = max(3, int(round((box[1, 0] - box[0, 0]) * scale / 30)))
    for point, color in zip(np.asarray(points).reshape(3, 2), POINT_COLORS):
        cv2.circle(out, to_px(point), radius, color, -1)
    return out


def tint_mask(face: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The aligned face with the region the model regenerates (mask 0) tinted; mask 1 = kept as is."""
    if mask.shape != face.shape[:2]:
        mask = cv2.resize(mask, face.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    regenerated = 0.5 * (1.0 - np.clip(mask, 0, 1))[..., None]
    return (face * (1 - regenerated) + TINT * regenerated).round().astype(np.uint8)


def mark_template(face: np.ndarray) -> np.ndarray:
    """Crosses where the alignment template puts the eyebrow and nose centres in the squashed face crop."""
    out = face.copy()
    h, w = face.shape[:2]
    arm = max(3, w // 40)
    for (x, y), color in zip(FACE_TEMPLATE / BOX_WH * (w, h), POINT_COLORS):
        cv2.drawMarker(out, (int(round(x)), int(round(y))), color, cv2.MARKER_CROSS, 2 * arm, 1)
    return out


def stage_panels(
    frame: np.ndarray,
    box: np.ndarray,
    points: np.ndarray,
    aligned_face: np.ndarray,
    mask: np.ndarray,
    generated_face: np.ndarray,
    output_frame: np.ndarray,
    height: int = 224,
) -> list[tuple[str, np.ndarray]]:
    """The labelled panels (label, (height, w, 3) uint8 RGB) of one frame; see render_stages."""
    for name, image in (
        ("frame", frame),
        ("aligned_face", aligned_face),
        ("generated_face", generated_face),
        ("output_frame", output_frame),
    ):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{name} must be a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    if output_frame.shape != frame.shape:
        raise ValueError(f"output_frame {output_frame.shape} and frame {frame.shape} differ in shape")
    box, points = np.asarray(box, np.float64), np.asarray(points, np.float64)

    whole, scale = scale_to_height(frame, height)
    x0, y0, x1, y1 = zoom_window(box, frame.shape[:2])
    zoom_in, zoom_scale = scale_to_height(frame[y0:y1, x0:x1], height)
    return [
        ("input", draw_detection(whole, box, points, scale)),
        ("detection", draw_detection(zoom_in, box, points, zoom_scale, (x0, y0))),
        ("aligned face", mark_template(scale_to_height(aligned_face, height)[0])),
        ("mouth mask", tint_mask(scale_to_height(aligned_face, height)[0], np.asarray(mask, np.float32))),
        ("generated face", scale_to_height(generated_face, height)[0]),
        ("pasted back", scale_to_height(output_frame[y0:y1, x0:x1], height)[0]),
        ("output", scale_to_height(output_frame, height)[0]),
    ]


def compose(panels: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Panels side by side, GAP apart, each under a LABEL_H label bar; (LABEL_H + h, sum w + gaps, 3) uint8."""
    height = panels[0][1].shape[0]
    width = sum(p.shape[1] for _, p in panels) + GAP * (len(panels) - 1)
    picture = np.full((LABEL_H + height, width, 3), BACKGROUND, np.uint8)
    x = 0
    for label, panel in panels:
        w = panel.shape[1]
        picture[LABEL_H:, x : x + w] = panel
        font_scale = 0.5
        text_w = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)[0][0]
        font_scale *= min(1.0, (w - 8) / max(text_w, 1))  # shrink labels that would not fit their panel
        cv2.putText(
            picture, label, (x + 4, LABEL_H - 8), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1, cv2.LINE_AA
        )
        x += w + GAP
    return picture


def render_stages(
    frame: np.ndarray,
    box: np.ndarray,
    points: np.ndarray,
    aligned_face: np.ndarray,
    mask: np.ndarray,
    generated_face: np.ndarray,
    output_frame: np.ndarray,
    height: int = 224,
) -> np.ndarray:
    """One labelled RGB uint8 picture of the stages of one frame.

    frame / output_frame: (H, W, 3) uint8 RGB, the input and the pasted-back result; box: (4,) x0, y0, x1, y1 and
    points: (3, 2) left brow, right brow, nose centre, in frame pixels (FaceResult rows); aligned_face and
    generated_face: (R, R, 3) uint8 RGB; mask: (R, R) float, 1 = kept, 0 = regenerated (mouth_mask).
    """
    return compose(stage_panels(frame, box, points, aligned_face, mask, generated_face, output_frame, height))


def save_picture(path: str | Path, picture: np.ndarray) -> Path:
    """Write an RGB uint8 picture (PNG, JPEG, ... by extension)."""
    path = Path(path)
    if not cv2.imwrite(str(path), np.ascontiguousarray(picture[..., ::-1])):
        raise OSError(f"could not write {path}")
    return path
