"""The stage picture: panel layout and labels, the box / points / mask drawn where they belong, the PNG, and a
picture of the real stages (MediaPipe detector, aligner, mask, paste-back) of a clip frame."""

import cv2
import numpy as np
import pytest
import torch
from helpers import decode

from latentsync_core.face.align import FaceAligner
from latentsync_core.face.detect import create_detector
from latentsync_core.face.mask import mouth_mask
from latentsync_core.face.restore import paste_back, resize_face_to_box
from latentsync_core.face.stages import (
    BACKGROUND,
    BOX_COLOR,
    GAP,
    LABEL_H,
    POINT_COLORS,
    compose,
    render_stages,
    save_picture,
    stage_panels,
    zoom_window,
)

LABELS = ["input", "detection", "aligned face", "mouth mask", "generated face", "pasted back", "output"]
HEIGHT = 224


@pytest.fixture()
def stages():
    """Flat synthetic stages, so every drawn colour is unambiguous: a 640x480 frame, a face box, the points."""
    rng = np.random.default_rng(0)
    frame = np.full((480, 640, 3), 90, np.uint8)
    box = np.array([200.0, 150.0, 330.0, 300.0])
    points = np.array([[230.0, 190.0], [300.0, 188.0], [266.0, 240.0]])
    aligned = np.full((256, 256, 3), 120, np.uint8)
    generated = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    output = frame.copy()
    output[200:280, 220:310] = (10, 200, 30)
    return frame, box, points, aligned, mouth_mask(256), generated, output


def panel_at(picture: np.ndarray, panels, index: int) -> np.ndarray:
    x = sum(p.shape[1] + GAP for _, p in panels[:index])
    return picture[LABEL_H:, x : x + panels[index][1].shape[1]]


def test_panels_and_layout(stages):
    panels = stage_panels(*stages, height=HEIGHT)
    assert [label for label, _ in panels] == LABELS
    assert all(p.shape[0] == HEIGHT and p.dtype == np.uint8 and p.shape[2] == 3 for _, p in panels)
    assert panels[0][1].shape[1] == panels[6][1].shape[1] == round(640 * HEIGHT / 480)
    assert all(panels[i][1].shape[1] == HEIGHT for i in (2, 3, 4))  # square faces stay square

    picture = render_stages(*stages, height=HEIGHT)
    assert picture.shape == (LABEL_H + HEIGHT, sum(p.shape[1] for _, p in panels) + GAP * 6, 3)
    assert picture.dtype == np.uint8
    x = 0
    for label, panel in panels:
        np.testing.assert_array_equal(picture[LABEL_H:, x : x + panel.shape[1]], panel)
        bar = picture[:LABEL_H, x : x + panel.shape[1]]
        assert (bar.min(axis=2) > 200).sum() > 10 * len(label.replace(" ", ""))  # white label text is drawn
        if x:
            assert (picture[:, x - GAP : x] == BACKGROUND).all()  # the gap
        x += panel.shape[1] + GAP
    np.testing.assert_array_equal(picture, compose(panels))
    shrunk = cv2.resize(stages[5], (HEIGHT, HEIGHT), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(panel_at(picture, panels, 4), shrunk)  # the generated face, as it is


def test_box_and_points_are_drawn_where_they_are(stages):
    frame, box, points = stages[:3]
    panels = stage_panels(*stages, height=HEIGHT)
    scale = HEIGHT / frame.shape[0]
    x0, y0, _, y1 = zoom_window(box, frame.shape[:2])
    zoom = HEIGHT / (y1 - y0)
    for (_, panel), s, origin in ((panels[0], scale, (0, 0)), (panels[1], zoom, (x0, y0))):

        def px(xy, s=s, origin=origin):  # frame pixels -> panel pixels
            return tuple(int(round(c)) for c in (np.asarray(xy) - origin) * s)

        left, top = px(box[:2])
        right, bottom = px(box[2:])
        mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
        for x, y in ((left, mid_y), (right, mid_y), (mid_x, top), (mid_x, bottom)):  # the four sides
            assert tuple(panel[y, x]) == BOX_COLOR
        assert tuple(panel[mid_y, mid_x - 20]) != BOX_COLOR  # inside the box: not painted
        for point, color in zip(points, POINT_COLORS):
            x, y = px(point)
            assert tuple(panel[y, x]) == color
            assert tuple(panel[y, x + 12]) != color  # a dot, not a blot
    # the output frame's panels show its pixels, not the drawing
    assert not (np.all(panels[6][1] == BOX_COLOR, axis=2)).any()


def test_mask_panel_tints_only_the_regenerated_region(stages):
    aligned, mask = stages[3], stages[4]
    panel = stage_panels(*stages, height=256)[3][1]  # no resize: compare pixel by pixel with the mask
    kept, regenerated = mask > 0.999, mask < 0.001
    assert kept.any() and regenerated.any()
    np.testing.assert_array_equal(panel[kept], aligned[kept])
    assert (panel[regenerated][:, 0] > aligned[regenerated][:, 0] + 50).all()  # red-tinted
    assert (panel[regenerated][:, 1] < aligned[regenerated][:, 1]).all()


def test_png_round_trip(stages, tmp_path):
    picture = render_stages(*stages)
    path = save_picture(tmp_path / "stages.png", picture)
    back = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1]
    np.testing.assert_array_equal(back, picture)  # lossless, RGB order kept
    with pytest.raises(ValueError, match="uint8 RGB"):
        render_stages(stages[0].astype(np.float32), *stages[1:])
    with pytest.raises(ValueError, match="differ in shape"):
        render_stages(*stages[:6], stages[6][:-2])


def test_picture_of_the_real_stages(shared_dir, tmp_path):
    frame = decode(shared_dir / "media" / "retalking_face1.mp4", limit=1)[0]
    result = create_detector("mediapipe", num_threads=2).detect(frame[None])
    assert result.found[0]
    aligned = FaceAligner(256).align(frame, result.points[0])
    face = torch.from_numpy(aligned.face).permute(2, 0, 1).float() / 127.5 - 1  # "generated" = the aligned face
    output = paste_back(frame, resize_face_to_box(face, aligned.crop.shape[:2]), aligned.affine)
    picture = render_stages(
        frame, result.boxes[0], result.points[0], aligned.face, mouth_mask(256), aligned.face, output
    )
    panels = stage_panels(frame, result.boxes[0], result.points[0], aligned.face, mouth_mask(256), aligned.face, output)
    assert picture.shape[0] == LABEL_H + HEIGHT and picture.shape[1] < 2400  # a sensible size
    scale = HEIGHT / frame.shape[0]
    for point, color in zip(result.points[0], POINT_COLORS):
        x, y = (int(round(c * scale)) for c in point)
        assert tuple(panel_at(picture, panels, 0)[y, x]) == color
    assert save_picture(tmp_path / "real.png", picture).stat().st_size > 10_000
