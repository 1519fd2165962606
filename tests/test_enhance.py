"""The optional face enhancer: official restorer checkpoints load through spandrel, the restored pixels land only in
the feathered mouth region, and the sharpness gate picks the blurry faces."""

import sys

import cv2
import numpy as np
import pytest
import torch

from latentsync_core.checkpoints import CheckpointError
from latentsync_core.face.enhance import (
    FaceEnhancer,
    FaceEnhancerError,
    enhance_faces,
    enhance_mouths,
    face_enhancer_from_state_dict,
    import_spandrel,
    load_face_enhancer,
    mouth_blend_weight,
    mouth_sharpness,
)
from latentsync_core.face.mask import mouth_mask
from latentsync_core.tiny import FACE_RESTORER_FILES, face_restorer_network, make_face_restorer, make_unet

# Scaled-down but real architectures, for numbers in seconds. spandrel reads RestoreFormer's sizes from its weights;
# GFPGAN loads only at its official size, so the small one is wrapped directly (its call convention is the same).
SMALL_RESTOREFORMER = dict(ch=32, ch_mult=(1,) * 6, num_res_blocks=1, n_embed=64, embed_dim=16, z_channels=32)
SMALL_GFPGAN = dict(out_size=64, num_style_feat=64, channel_multiplier=1, narrow=0.125)


def random_faces(n: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)  # bit patterns: tells -0.0 from 0.0, unlike ==


@pytest.fixture(scope="module")
def restoreformer_file(tmp_path_factory):
    return make_face_restorer(
        tmp_path_factory.mktemp("enhancer") / "RestoreFormer.pth", "RestoreFormer", **SMALL_RESTOREFORMER
    )


@pytest.mark.parametrize("arch", list(FACE_RESTORER_FILES))
def test_official_layout_loads_and_runs(arch):
    """Full-size official key and shape layout, wrapped as in the released file ({'params_ema': ...}), is detected
    and loaded strictly, and the whole 256 -> 512 -> 256 call runs; on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        official = {"params_ema": face_restorer_network(arch).state_dict()}
        enhancer = face_enhancer_from_state_dict(official, FACE_RESTORER_FILES[arch], device="meta")
        out = enhancer(torch.empty(2, 3, 256, 256))
    assert (enhancer.arch, enhancer.size) == (arch, 512)
    assert enhancer.non_commercial == (arch == "CodeFormer") == ("non-commercial" in enhancer.license)
    assert out.shape == (2, 3, 256, 256)
    loaded = enhancer.network.state_dict()
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in official["params_ema"].items()}


def test_restorer_file_loads_and_runs(restoreformer_file):
    enhancer = load_face_enhancer(restoreformer_file)
    assert (enhancer.arch, enhancer.size, enhancer.non_commercial) == ("RestoreFormer", 512, False)
    saved = torch.load(restoreformer_file, weights_only=True)["params_ema"]  # the official files' layout
    loaded = enhancer.network.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(v, saved[k]) for k, v in loaded.items())

    faces = random_faces(1)
    before = faces.clone()
    out = enhancer(faces)
    assert out.shape == faces.shape and out.dtype == faces.dtype
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    assert (out - faces).abs().mean() > 0.05  # the network's output, not the input
    assert torch.equal(faces, before)


@pytest.mark.parametrize("arch, hyper", [("RestoreFormer", SMALL_RESTOREFORMER), ("GFPGAN", SMALL_GFPGAN)])
def test_enhancer_batches_resizes_and_is_deterministic(arch, hyper):
    enhancer = FaceEnhancer(face_restorer_network(arch, **hyper), arch, size=64)
    faces = random_faces(3, 128)
    out = enhancer(faces)
    assert out.shape == faces.shape and out.abs().max() <= 1
    assert torch.equal(out, enhancer(faces))  # GFPGAN: its stored noise maps, not fresh noise per call
    torch.testing.assert_close(out[1:2], enhancer(faces[1:2]), atol=1e-3, rtol=0)  # kernels vary with batch size
    native = random_faces(2, 64)
    torch.testing.assert_close(enhancer(native), enhancer.restore(native).clamp(-1, 1), atol=0, rtol=0)

    assert enhancer(faces.to(torch.bfloat16)).dtype == torch.bfloat16  # the caller's dtype back
    double = enhancer.to(dtype=torch.float64)(faces)  # the network's own dtype inside (bfloat16 is slow on CPUs)
    assert next(enhancer.network.parameters()).dtype == torch.float64
    assert double.dtype == torch.float32
    torch.testing.assert_close(double, out, atol=1e-3, rtol=0)


def test_one_clear_error_for_unusable_files(tmp_path):
    make_unet(tmp_path, torch.Generator().manual_seed(0))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    sr_network = tmp_path / "4x_compact.pth"
    import_spandrel()
    from spandrel.architectures.Compact import Compact

    torch.save({"params": Compact(num_feat=8, num_conv=2).state_dict()}, sr_network)
    shrunk_gfpgan = make_face_restorer(tmp_path / "GFPGANv1.4.pth", "GFPGAN", **SMALL_GFPGAN)
    cases = {
        tmp_path / "missing.pth": "no such checkpoint file",
        garbage: "not a PyTorch weights checkpoint",
        tmp_path / "latentsync_unet.pt": "not a face restoration checkpoint",
        sr_network: "a Compact checkpoint, not a face restorer",
        shrunk_gfpgan: "looks like GFPGAN but does not load",
    }
    for path, what in cases.items():
        with pytest.raises(FaceEnhancerError) as e:
            load_face_enhancer(path)
        assert isinstance(e.value, CheckpointError)
        assert str(path) in str(e.value) and what in str(e.value)
        assert e.value.__cause__ is None  # one error, not a chain of low-level ones


def test_spandrel_import_leaves_torchvision_as_it_was():
    import_spandrel()
    tv = sys.modules.get("torchvision")
    assert tv is None or getattr(tv, "__file__", None)  # absent, or the real package; never the stand-in


@pytest.mark.parametrize("size, feather", [(256, 8), (512, 16), (256, 0)])
def test_blend_changes_only_the_feathered_mouth_region(size, feather):
    mask = mouth_mask(size)
    weight = mouth_blend_weight(mask, feather)
    region = torch.from_numpy(mask) < 0.5
    assert (weight[~region] == 0).all() and (weight >= 0).all() and weight.max() == pytest.approx(1, abs=1e-6)
    if feather:
        assert ((weight > 0) & (weight < 1)).sum() > 0  # a soft edge
    else:
        assert torch.equal(weight > 0, region)

    faces = random_faces(2, size)
    faces[0, :, 0, 0] = -0.0
    restored = random_faces(2, size, seed=1)
    out = enhance_faces(faces, restored, mask, blend=1.0, feather=feather)
    keep = (weight == 0).expand_as(faces)
    assert torch.equal(bits(out[keep]), bits(faces[keep]))
    full = (weight > 1 - 1e-6).expand_as(faces)
    torch.testing.assert_close(out[full], restored[full], atol=1e-5, rtol=0)
    soft = ((weight > 0) & (weight < 1 - 1e-6)).expand_as(faces)
    torch.testing.assert_close(out[soft], torch.lerp(faces, restored, weight)[soft], atol=0, rtol=0)
    assert not (out == faces)[(weight > 1e-3).expand_as(faces)].any()

    half = enhance_faces(faces, restored, mask, blend=0.5, feather=feather)
    torch.testing.assert_close(half[full], (faces[full] + restored[full]) / 2, atol=1e-5, rtol=0)
    assert torch.equal(bits(half[keep]), bits(faces[keep]))
    assert enhance_faces(faces, restored, mask, blend=0.0, feather=feather) is faces


def test_sharpness_is_cv2_laplacian_variance_of_the_mouth_region():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    images[1] = cv2.GaussianBlur(images[1], (0, 0), 1.5)
    mask = mouth_mask(256)
    faces = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    got = mouth_sharpness(faces, mask)
    region = mask < 0.5
    for image, value in zip(images, got):
        gray = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        expected = cv2.Laplacian(gray, cv2.CV_64F)[region].var()
        assert value.item() == pytest.approx(expected, rel=1e-4)
    # Only the mouth region counts: pixels beyond the Laplacian's reach of it change nothing.
    reach = cv2.dilate(region.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    outside = faces.clone()
    outside[:, :, ~torch.from_numpy(reach)] = 0
    torch.testing.assert_close(mouth_sharpness(outside, mask), got, rtol=1e-5, atol=0)


def test_gate_enhances_only_the_blurry_faces():
    rng = np.random.default_rng(1)
    sharp = rng.integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    images = np.stack([cv2.GaussianBlur(im, (0, 0), 2.0) if i in (1, 3) else im for i, im in enumerate(sharp)])
    faces = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    mask = mouth_mask(256)
    scores = mouth_sharpness(faces, mask)
    threshold = float((scores[[1, 3]].max() + scores[[0, 2]].min()) / 2)

    seen = []

    def enhancer(batch):
        seen.append(batch.clone())
        return torch.zeros_like(batch)

    out = enhance_mouths(enhancer, faces, mask, blend=1.0, feather=8, min_sharpness=threshold)
    assert len(seen) == 1 and torch.equal(seen[0], faces[[1, 3]])
    assert torch.equal(out[[0, 2]], faces[[0, 2]])
    assert not torch.equal(out[[1, 3]], faces[[1, 3]])
    torch.testing.assert_close(
        out[[1, 3]], enhance_faces(faces[[1, 3]], torch.zeros_like(faces[[1, 3]]), mask, 1.0, 8), atol=0, rtol=0
    )
    seen.clear()
    everything = enhance_mouths(enhancer, faces, mask, blend=1.0, feather=8, min_sharpness=None)
    assert len(seen) == 1 and len(seen[0]) == 4 and not torch.equal(everything[0], faces[0])
    seen.clear()
    assert enhance_mouths(enhancer, faces, mask, min_sharpness=float(scores.min()) / 2) is faces and not seen
