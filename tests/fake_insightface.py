"""Small ONNX stand-ins for InsightFace's det_10g.onnx (SCRFD) and 2d106det.onnx, same I/O signatures.

The fakes are deterministic so tests know the right answer without real weights:
  * SCRFD (input "input.1" [1, 3, ?, ?]; 9 outputs: scores, box distances, keypoint offsets for strides 8, 16,
    32 with 2 anchors per cell, batch folded into the rows like det_10g): the stride-8 head scores each cell
    with the max of blob channel 0, the stride-16 head with blob channel 1, the stride-32 head never fires.
    A cell's box is its anchor centre minus/plus BOX_DISTANCES * stride. Upstream's R/B swap means blob
    channel 0 is the frame's channel 2: a pure-blue marker is a small face, a pure-green one a large face.
  * 2d106det (input "data" [N, 3, 192, 192] -> "fc1" [N, 212]): always returns LANDMARKS_CROP, the
    106 (x, y) values in [-1, 1] crop units that the real model would regress.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

STRIDES = (8, 16, 32)
BOX_DISTANCES = np.array([4.0, 5.0, 6.0, 7.0], np.float32)  # left, top, right, bottom, in strides
KEYPOINT_OFFSETS = np.array([[-2, -2], [2, -2], [0, 0], [-1, 2], [1, 2]], np.float32)  # in strides
# multiples of 1/48 so that landmark pixels are exact for the boxes used in the tests
LANDMARKS_CROP = (np.random.default_rng(106).integers(-40, 41, size=(106, 2)) / 48.0).astype(np.float32)


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name))


def scrfd_model() -> onnx.ModelProto:
    nodes = [
        _const("zero", np.float32(0)),
        _const("rows1", np.array([-1, 1], np.int64)),
        _const("rows4", np.array([-1, 4], np.int64)),
        _const("rows10", np.array([-1, 10], np.int64)),
        _const("boxes_cell", np.tile(BOX_DISTANCES, 2)),
        _const("kps_cell", np.tile(KEYPOINT_OFFSETS.ravel(), 2)),
    ]
    scores, boxes, kps = [], [], []
    for level, stride in enumerate(STRIDES):
        channel = min(level, 1)
        nodes += [
            _const(f"start{level}", np.array([channel], np.int64)),
            _const(f"end{level}", np.array([channel + 1], np.int64)),
            _const(f"axis{level}", np.array([1], np.int64)),
            helper.make_node("Slice", ["input.1", f"start{level}", f"end{level}", f"axis{level}"], [f"plane{level}"]),
            helper.make_node(
                "MaxPool", [f"plane{level}"], [f"pool{level}"], kernel_shape=[stride, stride], strides=[stride, stride]
            ),
            helper.make_node("Relu", [f"pool{level}"], [f"act{level}"]),
        ]
        if level == 2:  # the coarsest head never fires
            nodes.append(helper.make_node("Mul", [f"act{level}", "zero"], [f"score{level}"]))
        else:
            nodes.append(helper.make_node("Identity", [f"act{level}"], [f"score{level}"]))
        nodes += [
            helper.make_node("Transpose", [f"score{level}"], [f"cell{level}"], perm=[0, 2, 3, 1]),  # (1, h, w, 1)
            helper.make_node("Concat", [f"cell{level}", f"cell{level}"], [f"anchors{level}"], axis=3),  # 2 anchors
            helper.make_node("Reshape", [f"anchors{level}", "rows1"], [f"scores_{stride}"]),
            helper.make_node("Mul", [f"cell{level}", "zero"], [f"blank{level}"]),
            helper.make_node("Add", [f"blank{level}", "boxes_cell"], [f"boxes{level}"]),
            helper.make_node("Reshape", [f"boxes{level}", "rows4"], [f"bbox_{stride}"]),
            helper.make_node("Add", [f"blank{level}", "kps_cell"], [f"kps{level}"]),
            helper.make_node("Reshape", [f"kps{level}", "rows10"], [f"kps_{stride}"]),
        ]
        scores.append(helper.make_tensor_value_info(f"scores_{stride}", TensorProto.FLOAT, [None, 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{stride}", TensorProto.FLOAT, [None, 4]))
        kps.append(helper.make_tensor_value_info(f"kps_{stride}", TensorProto.FLOAT, [None, 10]))
    graph = helper.make_graph(
        nodes,
        "fake_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])],
        scores + boxes + kps,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def landmark_model(bn_data: bool = True) -> onnx.ModelProto:
    """bn_data=True names the first node like MXNet exports, which makes insightface feed raw pixels."""
    nodes = [
        helper.make_node("Identity", ["data"], ["normalised"], name="bn_data" if bn_data else "first"),
        helper.make_node("ReduceMean", ["normalised"], ["mean"], axes=[1, 2, 3], keepdims=0),  # (N,)
        _const("unsqueeze_axes", np.array([1], np.int64)),
        helper.make_node("Unsqueeze", ["mean", "unsqueeze_axes"], ["mean_col"]),  # (N, 1)
        _const("zero", np.float32(0)),
        _const("landmarks", LANDMARKS_CROP.ravel()),
        helper.make_node("Mul", ["mean_col", "zero"], ["blank"]),
        helper.make_node("Add", ["blank", "landmarks"], ["fc1"]),  # (N, 212)
    ]
    graph = helper.make_graph(
        nodes,
        "fake_2d106det",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [None, 3, 192, 192])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [None, 212])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def write_buffalo(
    folder: Path, detector_name: str = "det_10g.onnx", landmark_name: str = "2d106det.onnx", bn_data: bool = True
) -> Path:
    """Write a fake model pack (detector + 2d106) into folder, under the given file names."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(scrfd_model(), str(folder / detector_name))
    onnx.save(landmark_model(bn_data), str(folder / landmark_name))
    return folder


def expected_face(marker_xy: tuple[float, float], det_scale: float, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """(box (4,), keypoints (5, 2)) in frame pixels that the fake SCRFD yields for a marker whose detector-input
    pixels all lie in one cell; marker_xy is any of its frame pixels."""
    cell = np.floor(np.asarray(marker_xy) * det_scale / stride) * stride  # anchor centre = cell corner
    box = np.r_[cell - BOX_DISTANCES[:2] * stride, cell + BOX_DISTANCES[2:] * stride] / det_scale
    return box.astype(np.float32), ((cell + KEYPOINT_OFFSETS * stride) / det_scale).astype(np.float32)


def expected_landmarks(box: np.ndarray) -> np.ndarray:
    """Frame-pixel landmarks the fake 2d106det yields for a face box (insightface Landmark.get semantics)."""
    centre = (box[:2] + box[2:]) / 2
    scale = 192 / (max(box[2] - box[0], box[3] - box[1]) * 1.5)
    return (LANDMARKS_CROP.astype(np.float64) + 1) * 96 / scale - 96 / scale + centre
