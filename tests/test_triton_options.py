"""Per-stream options through the real server: DPM-Solver++, DeepCache and the face enhancer (a scaled-down
RestoreFormer with random weights, loaded through spandrel like an official file). For each option the Triton
path equals the in-process pipeline on the same weights, and the option changes the result; the enhancer only
changes pixels inside the pasted mouth region; bad values are refused by name; the CLI carries every option."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import FAST, audio_for, cut_audio, reference_video, run_cli, run_stream, write_clip

from latentsync_core.face.align import box_hw
from latentsync_core.face.enhance import EnhanceSpec, mouth_blend_weight
from latentsync_core.face.restore import paste_back, resize_face_to_box
from latentsync_core.tiny import make_face_restorer
from latentsync_export.export import ExportOptions, build_repository
from latentsync_export.manifest import load_reference

SMALL_RESTOREFORMER = dict(ch=32, ch_mult=(1,) * 6, num_res_blocks=1, n_embed=64, embed_dim=16, z_channels=32)
N_FRAMES, STEPS, SEED = 2, 3, 5
BASE = {"steps": STEPS, "guidance": 1.5, "seed": SEED}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    weights = make_face_restorer(root / "RestoreFormer.pth", "RestoreFormer", **SMALL_RESTOREFORMER)
    build_repository(
        ExportOptions(
            out=root / "repo", tiny=True, variants=("1.5",), enhancer_weights=weights, max_queue_delay_us=20000
        )
    )
    return root / "repo"


@pytest.fixture(scope="module")
def server(triton_server, repo):
    return triton_server(repo, timeout=900)


@pytest.fixture(scope="module")
def window(clip):
    frames, samples = clip
    return frames[:N_FRAMES], audio_for(samples, N_FRAMES)


@pytest.fixture(scope="module")
def plain(server, window):
    got = run_stream(server.grpc_url, *window, BASE)
    assert not got.errors, got.errors
    return got.video


def in_process(repo, window, params: dict) -> np.ndarray:
    options = {k: v for k, v in params.items() if not k.startswith("enhance")}
    if params.get("enhance"):
        options["enhance"] = EnhanceSpec(params.get("enhance_blend", 1.0), params.get("enhance_min_sharpness", 0.0))
    return reference_video(repo, "1.5", *window, **options)


@pytest.mark.parametrize(
    "option",
    [{"sampler": "dpmsolver++"}, {"deepcache": 2}, {"enhance": True, "enhance_blend": 0.7}],
    ids=["dpmsolver++", "deepcache", "enhance"],
)
def test_option_through_triton_equals_in_process(server, repo, window, plain, option):
    params = {**BASE, **option}
    got = run_stream(server.grpc_url, *window, params)
    assert not got.errors, got.errors
    want = in_process(repo, window, params)
    err = np.abs(got.video.astype(np.int16) - want.astype(np.int16))
    print(
        f"{option}: Triton vs in-process max abs error {err.max()}, {(err > 0).mean():.2e} of values differ; "
        f"{(got.video != plain).mean():.2e} of values differ from the default options"
    )
    assert err.max() <= 1 and (err > 0).mean() < 1e-4
    assert not np.array_equal(got.video, plain), "the option changed nothing"


def test_enhancer_changes_only_the_mouth_region(server, repo, window, plain):
    """Pixels outside the pasted (feathered) mouth region are those of the same stream without the enhancer."""
    got = run_stream(server.grpc_url, *window, {**BASE, "enhance": True})
    assert not got.errors, got.errors
    changed = np.abs(got.video.astype(np.int16) - plain.astype(np.int16)).max(axis=-1) > 0
    assert changed.any()
    # Where the mouth region lands in each frame: paste a face that is white exactly where the blend weight is
    # non-zero; one pixel of dilation for the bilinear warp.
    stream = load_reference(repo, "1.5").stream(**BASE)
    stream.set_audio(window[1])
    prepared = stream.prepare(window[0].copy())
    weight = mouth_blend_weight(stream.mask, EnhanceSpec().feather)
    touched = resize_face_to_box((weight > 0).float().expand(3, -1, -1), box_hw(len(weight))).abs() > 1e-6
    face = touched.float() * 2 - 1
    for i, affine in enumerate(prepared.affines):
        region = paste_back(np.zeros_like(window[0][i]), face.clone(), affine).max(axis=-1) > 0
        region = np.pad(region, 1)
        region = np.max(
            [
                region[dy : dy + region.shape[0] - 2, dx : dx + region.shape[1] - 2]
                for dy in range(3)
                for dx in range(3)
            ],
            axis=0,
        )
        assert not (changed[i] & ~region).any(), f"frame {i}: pixels outside the mouth region changed"
        assert (changed[i] & region).any()


@pytest.mark.parametrize(
    "params,name",
    [
        ({"sampler": "euler"}, "sampler"),
        ({"deepcache": 11}, "deepcache"),
        ({"enhance": "maybe"}, "enhance"),
        ({"enhance_blend": 1.5}, "enhance_blend"),
        ({"enhance_min_sharpness": -1}, "enhance_min_sharpness"),
    ],
)
def test_bad_option_values_are_refused_by_name(server, window, params, name):
    got = run_stream(server.grpc_url, *window, {**BASE, **params})
    assert got.errors and f"'{name}'" in got.errors[0], got.errors
    assert not got.frames


def test_cli_carries_every_option(server, shared_dir, tmp_path, clip):
    video = write_clip(tmp_path / "face.mp4", N_FRAMES + 2, size=clip[0].shape[1:3], frames=clip[0][: N_FRAMES + 2])
    audio = cut_audio(shared_dir / "media" / "demo1_audio.wav", tmp_path / "voice.wav", 0.1)
    out = tmp_path / "out.mp4"
    r = run_cli(
        video,
        audio,
        "-o",
        out,
        "--url",
        server.grpc_url,
        "--steps",
        "2",
        "--sampler",
        "dpmsolver++",
        "--deepcache",
        "2",
        "--enhance",
        "--enhance-blend",
        "0.5",
        "--enhance-min-sharpness",
        "1e9",
        *FAST,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


# ------------------------------------------------------------------------------------------------ turned faces
@pytest.fixture(scope="module")
def turned_photo():
    """insightface's t1.jpg: its largest face (the one upstream syncs) is turned about 30 degrees away."""
    import cv2

    from latentsync_load.demo import sample_portrait

    return cv2.cvtColor(cv2.imread(str(sample_portrait())), cv2.COLOR_BGR2RGB)


def test_turned_face_passes_through_with_max_yaw_and_is_synced_without(server, clip, turned_photo):
    frames = np.stack([turned_photo] * 2)
    audio = audio_for(clip[1], len(frames))
    synced = run_stream(server.grpc_url, frames, audio, BASE)
    assert not synced.errors and np.concatenate(synced.found).all()
    assert not np.array_equal(synced.video, frames)
    passed = run_stream(server.grpc_url, frames, audio, {**BASE, "max_yaw": 20.0})
    np.testing.assert_array_equal(passed.video, frames)  # unchanged, FACE_FOUND false
    assert not np.concatenate(passed.found).any()
    assert passed.errors and "turned further than max_yaw" in passed.errors[-1], passed.errors


def test_cli_max_yaw_passes_the_turned_face_through(server, shared_dir, tmp_path, turned_photo):
    import cv2

    photo = tmp_path / "t1.png"
    cv2.imwrite(str(photo), turned_photo[..., ::-1])
    audio = cut_audio(shared_dir / "media" / "demo1_audio.wav", tmp_path / "voice.wav", 0.1)
    out = tmp_path / "out.mp4"
    r = run_cli(
        photo, audio, "-o", out, "--url", server.grpc_url, "--steps", "1", "--max-yaw", "20", *FAST, timeout=900
    )
    assert r.returncode == 4 and "turned further than max_yaw" in r.stderr, r.stderr
    r = run_cli(
        photo,
        audio,
        "-o",
        out,
        "--url",
        server.grpc_url,
        "--steps",
        "1",
        "--max-yaw",
        "20",
        "--allow-no-face",
        *FAST,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
