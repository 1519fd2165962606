"""latentsync-inspect: the stage picture of one frame, from a built repository's weights, no server."""

import cv2
import numpy as np
import pytest
from helpers import cut_audio

from latentsync_core.face.stages import LABEL_H
from latentsync_export.export import ExportOptions, build_repository
from latentsync_load.inspect_stages import main

pytestmark = pytest.mark.slow  # a few minutes on 2 cores


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "repo"
    build_repository(ExportOptions(out=out, tiny=True, variants=("1.5",)))
    return out


def test_picture_of_a_frame(repo, shared_dir, tmp_path):
    audio = cut_audio(shared_dir / "media" / "demo1_audio.wav", tmp_path / "voice.wav", 1.0)
    out = tmp_path / "stages.png"
    assert (
        main(
            [
                str(repo),
                str(shared_dir / "media" / "retalking_face2.mp4"),
                str(audio),
                "-o",
                str(out),
                "--frame",
                "17",
                "--steps",
                "1",
            ]
        )
        == 0
    )
    picture = cv2.imread(str(out))
    assert picture.shape[0] == LABEL_H + 224 and picture.shape[1] > 7 * 100  # seven labelled panels


def test_a_frame_without_a_synced_face_is_explained(repo, shared_dir, tmp_path, capsys):
    audio = cut_audio(shared_dir / "media" / "demo1_audio.wav", tmp_path / "voice.wav", 0.2)
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((64, 48, 3), np.uint8))
    assert main([str(repo), str(blank), str(audio), "-o", str(tmp_path / "s.png"), "--steps", "1"]) == 2
    assert "no face was found" in capsys.readouterr().err
