"""Head pose from the three alignment points: exact on its head model, close to the face mesh's own 3D pose on the
real clips and on the demo's group photo, the turned-face mask, and the frontal cut of the demo photo."""

import cv2
import numpy as np
import pytest
from helpers import decode

from latentsync_core.face.detect import box_iou, create_detector, select_faces
from latentsync_core.face.detectors.mediapipe_tflite import MESH_SIZE
from latentsync_core.face.pose import (
    DEFAULT_MAX_YAW,
    FRONTAL_MAX_YAW,
    NOSE_DEPTH,
    NOSE_DROP,
    all_faces,
    frontal_crop,
    head_pose,
    too_turned,
    yaw_degrees,
)
from latentsync_load.demo import sample_portrait

# Agreement with the mesh's 3D cheek-to-cheek line (measured: per-clip mean |error| 1.2-4.0 degrees, largest 10;
# t1.jpg's faces within 7.5); the bounds leave room for codec / library differences.
MAX_MEAN_ERROR, MAX_ERROR = 5.0, 12.0
# (clip, decode scale, frame step): every frame of the small clips, every 2nd / 4th of the 1080p ones (decoding
# them dominates the cost)
CLIPS = [
    ("demo1_video.mp4", 0.5, 2),
    ("demo2_video.mp4", 0.5, 4),
    ("retalking_face1.mp4", 1.0, 1),
    ("retalking_face2.mp4", 1.0, 1),
]


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rz(roll) Ry(yaw) Rx(pitch), degrees; x right, y down, z towards the camera."""
    y, p, r = np.radians([yaw, pitch, roll])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    return rz @ ry @ rx


def mesh_yaw(detector, frames, boxes, keypoints) -> np.ndarray:
    """Independent reference: the yaw of the line from cheek to cheek (mesh points 234, 454) in the face mesh's
    3D output (its depth channel; MediaPipe z grows away from the camera). Measured against a full Procrustes
    fit of all 468 points to MediaPipe's canonical face: mean |difference| 0.1-0.3 degrees on the clips."""
    affines = [detector.roi_affine(b, k) for b, k in zip(boxes, keypoints)]
    crops = np.stack(
        [
            cv2.warpAffine(f, m, (MESH_SIZE, MESH_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            for f, m in zip(frames, affines)
        ]
    )
    mesh = max(detector.mesh(crops.astype(np.float32) / 255.0), key=lambda o: o.shape[-1]).reshape(len(frames), -1, 3)
    cheeks = mesh[:, 454] - mesh[:, 234]  # the ROI only rotates in the image plane and scales uniformly
    return np.degrees(np.arcsin(cheeks[:, 2] / np.linalg.norm(cheeks, axis=1)))


def detect_with_reference(detector, frames):
    """The detector's pick per frame (as detect() makes it) -> (stage-1 boxes, keypoints, points, mesh yaw)."""
    candidates = detector.propose(list(frames))
    picks = select_faces(candidates, detector.face_filter)
    assert (picks >= 0).all()
    boxes = np.stack([c.boxes[k] for c, k in zip(candidates, picks)])
    keypoints = np.stack([c.keypoints[k] for c, k in zip(candidates, picks)])
    points, _ = detector.locate(list(frames), boxes, keypoints)
    return boxes, keypoints, points, mesh_yaw(detector, frames, boxes, keypoints)


@pytest.fixture(scope="module")
def mediapipe():
    return create_detector("mediapipe", num_threads=2)


@pytest.fixture(scope="module")
def group_photo():
    """insightface's t1.jpg (the demo's default portrait): five faces, two of them turned well away."""
    return cv2.cvtColor(cv2.imread(str(sample_portrait())), cv2.COLOR_BGR2RGB)


# --- the model ----------------------------------------------------------------------------------------------------
def test_pose_is_exact_on_the_head_model():
    head = np.array([[-0.5, 0, 0], [0.5, 0, 0], [0, NOSE_DROP, NOSE_DEPTH]])
    grid = (
        np.array(np.meshgrid(np.arange(-70, 71, 10), np.arange(-40, 41, 10), np.arange(-30, 31, 15), indexing="ij"))
        .reshape(3, -1)
        .T
    )
    # orthographic camera: any scale and position
    points = np.stack([(head @ rotation(*g).T)[:, :2] * 80 + (300, 200) for g in grid])
    yaw, roll = head_pose(points)
    assert yaw.shape == roll.shape == (len(grid),)
    # whatever the pitch; 1e-3: at yaw 0 the arccos of a cosine near 1 (near 20 degrees down, of a double root)
    # magnifies float rounding
    np.testing.assert_allclose(np.abs(yaw), np.abs(grid[:, 0]), atol=1e-3)
    np.testing.assert_allclose(roll, grid[:, 2], atol=1e-9)
    # the sign holds while the nose centre stays in front of the brows: up to ~20 degrees of looking down
    ahead = grid[:, 1] > -np.degrees(np.arctan2(NOSE_DEPTH, NOSE_DROP))
    np.testing.assert_allclose(yaw[ahead], grid[ahead, 0], atol=1e-3)


def test_pose_is_vectorised_invariant_and_mirrors(mediapipe, shared_dir):
    frames = decode(shared_dir / "media" / "retalking_face1.mp4", 1.0, 10)
    points = mediapipe.detect(frames).points
    yaw, roll = head_pose(points)
    assert yaw.shape == (len(frames),) and np.isfinite(yaw).all()
    np.testing.assert_allclose([yaw_degrees(p) for p in points], yaw, rtol=1e-12)  # a (3, 2) row: same as in a batch
    np.testing.assert_allclose(head_pose(points * 2.5 + (40, -7)), (yaw, roll), atol=1e-9)
    mirrored = points[:, [1, 0, 2]] * (-1, 1) + (frames.shape[2], 0)  # flip x; the brows swap sides
    np.testing.assert_allclose(head_pose(mirrored), (-yaw, -roll), atol=1e-9)

    turned = too_turned(points, np.median(np.abs(yaw)))
    np.testing.assert_array_equal(turned, np.abs(yaw) > np.median(np.abs(yaw)))
    assert 0 < turned.sum() < len(turned)


def test_faceless_rows_are_not_turned():
    points = np.zeros((3, 3, 2), np.float32)  # FaceResult rows of frames without a face
    points[1] = [[100, 100], [160, 100], [200, 140]]  # nose far to the right: turned
    assert np.isnan(yaw_degrees(points)[[0, 2]]).all()
    assert too_turned(points, DEFAULT_MAX_YAW).tolist() == [False, True, False]


# --- real faces -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip,scale,step", CLIPS)
def test_yaw_follows_the_mesh_on_frontal_clips(mediapipe, shared_dir, clip, scale, step):
    frames = decode(shared_dir / "media" / clip, scale, step)
    *_, points, reference = detect_with_reference(mediapipe, frames)
    yaw = yaw_degrees(points)
    error = np.abs(yaw - reference)
    assert error.mean() <= MAX_MEAN_ERROR and error.max() <= MAX_ERROR, (error.mean(), error.max())
    if np.ptp(reference) >= 15:  # the clips where the head turns: the estimate follows it
        assert np.corrcoef(yaw, reference)[0, 1] > 0.9
    # talking heads facing the camera: no frame is dropped by the turned-face policy
    assert not too_turned(points).any(), np.abs(yaw).max()


def test_group_photo_faces_and_the_turned_largest_face(mediapipe, group_photo):
    stage1, _, points = all_faces(mediapipe, group_photo)
    candidates = mediapipe.propose([group_photo])[0]
    accepted = mediapipe.face_filter.accepts(candidates.boxes, candidates.scores)
    keypoints = candidates.keypoints[accepted]
    assert len(points) == accepted.sum() >= 4
    reference = mesh_yaw(mediapipe, [group_photo] * len(points), stage1, keypoints)
    yaw = yaw_degrees(points)
    assert np.abs(yaw - reference).max() <= 10, (yaw, reference)
    np.testing.assert_array_equal(too_turned(points), np.abs(reference) > DEFAULT_MAX_YAW)

    largest = select_faces([candidates], mediapipe.face_filter)[0]  # upstream's rule picks ...
    index = int(np.flatnonzero(accepted).tolist().index(largest))
    assert reference[index] < -DEFAULT_MAX_YAW and too_turned(points[index : index + 1])[0]  # ... a turned face
    assert (np.abs(reference) <= FRONTAL_MAX_YAW).sum() >= 2  # while frontal faces are there


def test_frontal_crop_makes_a_frontal_face_the_detectors_pick(mediapipe, group_photo):
    cut = frontal_crop(group_photo, mediapipe)
    stage1, _, points = all_faces(mediapipe, group_photo)
    np.testing.assert_array_equal(cut.points, points)
    frontal = np.flatnonzero(np.abs(cut.yaw) <= FRONTAL_MAX_YAW)
    area = np.prod(stage1[:, 2:].astype(int) - stage1[:, :2].astype(int), axis=1)
    assert cut.chosen == frontal[np.argmax(area[frontal])]  # the largest frontal face
    assert cut.chosen != np.argmax(area)  # not the largest face, which is turned

    x0, y0, x1, y1 = cut.window
    assert 0 <= x0 < x1 <= group_photo.shape[1] and 0 <= y0 < y1 <= group_photo.shape[0]
    np.testing.assert_array_equal(cut.image, group_photo[y0:y1, x0:x1])
    picked = mediapipe.detect(cut.image[None])  # what the server does with the cut
    assert picked.found[0]
    assert box_iou(picked.boxes[0] + (x0, y0, x0, y0), cut.boxes[cut.chosen][None])[0] > 0.8
    assert abs(yaw_degrees(picked.points[0])) <= FRONTAL_MAX_YAW
    candidates = mediapipe.propose([cut.image])[0]
    pick = select_faces([candidates], mediapipe.face_filter)
    reference = mesh_yaw(mediapipe, [cut.image], candidates.boxes[pick], candidates.keypoints[pick])[0]
    assert abs(reference) <= FRONTAL_MAX_YAW  # frontal by the mesh too


def test_frontal_crop_narrows_a_wide_margin_and_refuses_when_nothing_is_frontal(mediapipe, group_photo):
    wide = frontal_crop(group_photo, mediapipe, margin=8.0)  # the first cuts hold the whole photo
    narrow = frontal_crop(group_photo, mediapipe)
    assert wide.chosen == narrow.chosen
    centres = np.delete((wide.boxes[:, :2] + wide.boxes[:, 2:]) / 2, wide.chosen, axis=0)
    for x0, y0, x1, y1 in (wide.window, narrow.window):  # no other face's centre in either cut
        assert not ((centres >= (x0, y0)) & (centres < (x1, y1))).all(axis=1).any()
    assert wide.image.size < group_photo.size / 2
    with pytest.raises(ValueError, match="no face with"):
        frontal_crop(group_photo, mediapipe, max_yaw=float(np.abs(narrow.yaw).min()) / 2)
