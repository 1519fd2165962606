"""Face detection: real MediaPipe weights on the real clips (vs YuNet), blank frames, the multi-face policy,
request independence, and the InsightFace loading/decoding path on small fake ONNX files."""

from pathlib import Path

import cv2
import fake_insightface as fake
import numpy as np
import onnx
import pytest
from helpers import decode

from latentsync_core.face.align import landmarks_to_points
from latentsync_core.face.detect import Candidates, FaceFilter, box_iou, create_detector, select_faces

# Agreement with YuNet (tests only). Measured on every frame of all four clips (demo clips at half size):
# per-frame IoU >= 0.76, per-clip mean 0.82-0.89 (mediapipe's box is the face-mesh extent; YuNet's, like
# SCRFD's, reaches a little higher up the forehead). The bounds leave room for codec / scaler differences.
MIN_IOU, MIN_MEAN_IOU = 0.6, 0.75
# (clip, decode scale, frame step): every frame of demo1 (at half size, ~7 ms per frame on 2 cores), a
# subsample of the others.
CLIPS = [
    ("demo1_video.mp4", 0.5, 1),
    ("demo2_video.mp4", 0.5, 10),
    ("retalking_face1.mp4", 1.0, 5),
    ("retalking_face2.mp4", 1.0, 5),
]


def yunet_boxes(model: Path, frames: np.ndarray, subsample: int = 2) -> np.ndarray:
    """Largest YuNet face per frame as x0, y0, x1, y1 (NaN where YuNet finds none), run on every
    `subsample`-th pixel to keep it cheap (faces stay well above YuNet's minimum size)."""
    frames = frames[:, ::subsample, ::subsample, ::-1]  # YuNet takes BGR
    h, w = frames.shape[1:3]
    yunet = cv2.FaceDetectorYN.create(str(model), "", (w, h), 0.6, 0.3, 100)
    boxes = np.full((len(frames), 4), np.nan, np.float32)
    for i, frame in enumerate(frames):
        _, faces = yunet.detect(np.ascontiguousarray(frame))
        if faces is not None:
            x, y, bw, bh = faces[np.argmax(faces[:, 2] * faces[:, 3]), :4]
            boxes[i] = np.array([x, y, x + bw, y + bh]) * subsample
    return boxes


@pytest.fixture(scope="module")
def mediapipe():
    return create_detector("mediapipe", num_threads=2)


@pytest.fixture(scope="module")
def talking_head(shared_dir):
    return decode(shared_dir / "media" / "retalking_face1.mp4", limit=12)


# --- real weights ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip,scale,step", CLIPS)
def test_mediapipe_finds_the_face_in_every_frame(mediapipe, shared_dir, clip, scale, step):
    frames = decode(shared_dir / "media" / clip, scale, step)
    result = mediapipe.detect(frames)

    assert result.found.all(), f"no face in frames {np.flatnonzero(~result.found).tolist()}"
    assert (result.scores >= 0.5).all()
    lo, hi = result.boxes[:, None, :2], result.boxes[:, None, 2:]
    assert ((result.points >= lo) & (result.points <= hi)).all(), "alignment points outside the face box"
    assert np.array_equal(result.points, np.round(result.points))  # integer-valued, like upstream's
    left, right, nose = result.points.transpose(1, 0, 2)
    assert (left[:, 0] < right[:, 0]).all() and (nose[:, 1] > np.maximum(left[:, 1], right[:, 1])).all()
    assert (left[:, 0] < nose[:, 0]).all() and (nose[:, 0] < right[:, 0]).all()

    reference = yunet_boxes(shared_dir / "models" / "yunet_s_640_640.onnx", frames[::2])  # every 2nd: time
    assert np.isfinite(reference).all()
    iou = np.array([box_iou(r, b[None])[0] for r, b in zip(reference, result.boxes[::2])])
    assert iou.min() >= MIN_IOU and iou.mean() >= MIN_MEAN_IOU, (iou.min(), iou.mean())
    points = result.points[::2]  # inside the independent YuNet box too
    assert ((points >= reference[:, None, :2]) & (points <= reference[:, None, 2:])).all()


def test_blank_frames_are_reported_and_do_not_disturb_the_others(mediapipe, talking_head):
    blank = np.zeros_like(talking_head[0])
    grey = np.full_like(talking_head[0], 128)
    inserted = {0: blank, 4: grey, 5: blank, 13: blank}
    frames, source = [], iter(talking_head)
    for i in range(len(talking_head) + len(inserted)):
        frames.append(inserted[i] if i in inserted else next(source))
    frames = np.stack(frames)

    result = mediapipe.detect(frames)
    assert np.flatnonzero(~result.found).tolist() == sorted(inserted)
    empty = ~result.found
    assert not result.boxes[empty].any() and not result.scores[empty].any() and not result.points[empty].any()

    alone = mediapipe.detect(talking_head)  # same frames without the blanks: same per-frame results
    np.testing.assert_array_equal(result.points[result.found], alone.points)
    np.testing.assert_allclose(result.boxes[result.found], alone.boxes, atol=1e-3)


def test_requests_are_independent_of_batching(mediapipe, talking_head):
    a, b = talking_head[:5], talking_head[5:][::-1]
    together = mediapipe.detect_requests([a, b])
    swapped = mediapipe.detect_requests([b, a])
    for batched, single in (
        (together[0], mediapipe.detect(a)),
        (together[1], mediapipe.detect(b)),
        (swapped[1], mediapipe.detect(a)),
    ):
        np.testing.assert_array_equal(batched.found, single.found)
        np.testing.assert_array_equal(batched.points, single.points)
        np.testing.assert_allclose(batched.boxes, single.boxes, atol=1e-3)


def test_two_faces_largest_or_tracked(mediapipe, talking_head):
    big = talking_head[0]
    small = cv2.resize(big, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA)
    canvas = np.zeros((big.shape[0], big.shape[1] + small.shape[1], 3), np.uint8)
    canvas[:, : big.shape[1]] = big
    canvas[: small.shape[0], big.shape[1] :] = small
    frames = np.stack([canvas] * 3)

    largest = mediapipe.detect(frames)
    assert largest.found.all() and (largest.boxes[:, 2] <= big.shape[1]).all()  # the big face, on the left

    tracker = create_detector("mediapipe", policy="track", num_threads=2)
    start = mediapipe.detect(small[None]).boxes[0] + [big.shape[1], 0, big.shape[1], 0]
    tracked = tracker.detect(frames, reference_box=start)
    assert tracked.found.all() and (tracked.boxes[:, 0] >= big.shape[1]).all()  # stays on the small face
    assert (tracker.detect(frames).boxes == largest.boxes).all()  # no reference: largest


# --- selection policy (no models) --------------------------------------------------------------------------
def _cands(*boxes_scores):
    boxes = np.array([b for b, _ in boxes_scores], np.float32).reshape(-1, 4)
    return Candidates(boxes, np.array([s for _, s in boxes_scores], np.float32), np.zeros((len(boxes), 5, 2)))


def test_upstream_filter_and_largest_rule():
    f = FaceFilter()
    ok = ([0, 0, 100, 120], 0.9)
    rejected = [
        ([0, 0, 49.9, 120], 0.9),  # truncated width 49 < 50
        ([0, 0, 100, 79.9], 0.9),  # height 79 < 80
        ([0, 0, 190, 120], 0.9),  # w / h > 1.5
        ([0, 0, 50, 260], 0.9),  # w / h < 0.2
        ([0, 0, 100, 120], 0.49),
    ]  # score
    assert select_faces([_cands(*rejected)], f).tolist() == [-1]
    assert select_faces([_cands(*rejected, ok)], f).tolist() == [5]
    # largest area wins over a higher score; equal areas go to the first (higher-scored) candidate
    assert select_faces([_cands(([0, 0, 100, 120], 0.99), ([0, 0, 110, 130], 0.6))], f).tolist() == [1]
    assert select_faces([_cands(([0, 0, 100, 120], 0.9), ([200, 0, 300, 120], 0.8))], f).tolist() == [0]


def test_track_policy_follows_the_previous_pick_across_frames():
    f = FaceFilter()
    left, right = [0, 0, 100, 120], [300, 0, 420, 140]  # right is larger
    moved = [10, 5, 110, 125]
    frames = [_cands((left, 0.9), (right, 0.9)), _cands((right, 0.9)), _cands((moved, 0.8), (right, 0.9))]
    assert select_faces(frames, f, "largest").tolist() == [1, 0, 1]
    # tracking the left face: frame 1 has only the right face (no overlap -> largest), which it then follows
    assert select_faces(frames, f, "track", np.array(left)).tolist() == [0, 0, 1]
    assert select_faces([frames[0], _cands(), frames[2]], f, "track", np.array(left)).tolist() == [0, -1, 0]
    with pytest.raises(ValueError, match="policy"):
        select_faces(frames, f, "nearest")


# --- InsightFace path on fake ONNX files ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def buffalo(tmp_path_factory):
    return fake.write_buffalo(tmp_path_factory.mktemp("buffalo_l"))


def marker_frame(h: int, w: int, xy, size: int, channel: int) -> np.ndarray:
    frame = np.zeros((h, w, 3), np.uint8)
    frame[xy[1] : xy[1] + size, xy[0] : xy[0] + size, channel] = 255
    return frame


@pytest.mark.parametrize("h,w", [(1024, 768), (768, 1024)])
def test_insightface_decoding(buffalo, h, w):
    detector = create_detector("insightface", buffalo, det_size=512)
    det_scale = 512 / max(h, w)  # the longer side fills det_size (exact here: 384 / 768 = 512 / 1024)
    small_xy, large_xy = (400, 416), (96, 96)
    # RGB frames: blue marker -> blob channel 0 (stride-8 head) only because of upstream's R/B swap
    blue = marker_frame(h, w, small_xy, 8, channel=2)
    red = marker_frame(h, w, small_xy, 8, channel=0)
    both = blue.copy()
    both[96:112, 96:112, 1] = 255  # green: blob channel 1, stride-16 head, a larger face
    result = detector.detect(np.stack([blue, red, both]))

    assert result.found.tolist() == [True, False, True]
    small_box, _ = fake.expected_face(small_xy, det_scale, 8)
    large_box, _ = fake.expected_face(large_xy, det_scale, 16)
    np.testing.assert_allclose(result.boxes[0], small_box, atol=1e-3)
    np.testing.assert_allclose(result.boxes[2], large_box, atol=1e-3)  # largest face policy
    assert result.scores[0] == pytest.approx((255 - 127.5) / 128)
    for i, box in ((0, small_box), (2, large_box)):
        expected = landmarks_to_points(np.round(fake.expected_landmarks(box)).astype(np.int64))
        np.testing.assert_array_equal(result.points[i], expected)

    candidates = detector.propose([both])[0]  # both faces, score-sorted, NMS merged the two anchors per cell
    assert len(candidates.boxes) == 2
    kps = {tuple(np.round(b).astype(int)): k for b, k in zip(candidates.boxes, candidates.keypoints)}
    small_kps = fake.expected_face(small_xy, det_scale, 8)[1]
    np.testing.assert_allclose(kps[tuple(np.round(small_box).astype(int))], small_kps, atol=1e-3)


def test_insightface_track_policy_and_reference(buffalo):
    detector = create_detector("insightface", buffalo, policy="track")
    frame = marker_frame(1024, 768, (400, 416), 8, channel=2)
    frame[96:112, 96:112, 1] = 255
    small_box, _ = fake.expected_face((400, 416), 0.5, 8)
    result = detector.detect(np.stack([frame, frame]), reference_box=small_box + 3)
    np.testing.assert_allclose(result.boxes, np.stack([small_box] * 2), atol=1e-3)


def test_insightface_model_files_found_by_signature(tmp_path):
    folder = fake.write_buffalo(tmp_path / "pack", "scrfd_custom.onnx", "landmarks.onnx", bn_data=False)
    onnx.save(fake.landmark_model(), str(folder / "zz_other.onnx"))
    detector = create_detector("insightface", folder)
    assert detector.detector.path.name == "scrfd_custom.onnx" and detector.landmark.path.name == "landmarks.onnx"
    assert (detector.landmark_mean, detector.landmark_std) == (127.5, 128.0)  # no bn_data: normalised here
    assert create_detector("insightface", fake.write_buffalo(tmp_path / "bn")).landmark_mean == 0.0


def test_insightface_needs_a_model_folder(tmp_path):
    with pytest.raises(ValueError, match="model_dir"):
        create_detector("insightface")
    with pytest.raises(FileNotFoundError, match="buffalo"):
        create_detector("insightface", tmp_path)
    with pytest.raises(ValueError, match="kind"):
        create_detector("dlib")


# --- the Triton model -----------------------------------------------------------------------------------------
def test_triton_face_detector_model(triton_server, tmp_path, mediapipe, talking_head):
    import shutil

    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    shutil.copytree(Path(__file__).resolve().parents[1] / "model_repository" / "face_detector", repo / "face_detector")
    server = triton_server(repo)
    frames = np.concatenate([talking_head[:3], np.zeros_like(talking_head[:1]), talking_head[3:5]])
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        inp = grpcclient.InferInput("FRAMES", list(frames.shape), "UINT8")
        inp.set_data_from_numpy(frames)
        out = client.infer("face_detector", [inp], parameters=server.internal_parameters)
        reference = grpcclient.InferInput("REFERENCE_BOX", [len(frames), 4], "FP32")
        reference.set_data_from_numpy(np.full((len(frames), 4), np.nan, np.float32))
        with_reference = client.infer("face_detector", [inp, reference], parameters=server.internal_parameters)
    expected = mediapipe.detect(frames)
    np.testing.assert_array_equal(with_reference.as_numpy("POINTS"), out.as_numpy("POINTS"))
    assert out.as_numpy("FOUND")[:, 0].tolist() == expected.found.tolist() == [True] * 3 + [False] + [True] * 2
    np.testing.assert_array_equal(out.as_numpy("POINTS"), expected.points)
    np.testing.assert_allclose(out.as_numpy("BOX"), expected.boxes, atol=1e-3)
    np.testing.assert_allclose(out.as_numpy("SCORE")[:, 0], expected.scores, atol=1e-6)
