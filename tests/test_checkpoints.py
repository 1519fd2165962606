"""Loading official-format checkpoints: strict key/shape checks and one clear error per failure mode."""

import json

import pytest
import torch

from latentsync_core.checkpoints import CheckpointError, read_checkpoint
from latentsync_core.configs import unet_config
from latentsync_core.loaders import load_unet
from latentsync_core.models.unet3d import UNet3DConditionModel

SMALL = unet_config(block_out_channels=[32, 32, 32, 32], sample_size=8)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "latentsync_unet.pt"
    torch.manual_seed(0)
    model = UNet3DConditionModel.from_config(SMALL)
    torch.save({"state_dict": model.state_dict(), "global_step": 1}, path)
    return path, model


def test_official_format_roundtrip(small_ckpt):
    path, model = small_ckpt
    loaded = load_unet(path, SMALL)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_wrong_config_names_the_key(small_ckpt):
    path, _ = small_ckpt
    other = unet_config(block_out_channels=[32, 32, 32, 64], sample_size=8)
    with pytest.raises(CheckpointError, match=r"key '.*' has shape .* config expects .*1\.5 and 1\.6"):
        load_unet(path, other)


def test_missing_motion_modules_is_reported(small_ckpt):
    path, _ = small_ckpt
    efficient = dict(SMALL, motion_module_decoder_only=True)
    with pytest.raises(CheckpointError, match=r"unexpected key 'down_blocks\.0\.motion_modules"):
        load_unet(path, efficient)


def test_missing_key(tmp_path, small_ckpt):
    _, model = small_ckpt
    sd = dict(model.state_dict())
    sd.pop("conv_out.bias")
    torch.save({"state_dict": sd}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"missing key 'conv_out\.bias' \(1 missing"):
        load_unet(tmp_path / "x.pt", SMALL)


def test_truncated_file(tmp_path, small_ckpt):
    path, _ = small_ckpt
    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_unet(bad, SMALL)


@pytest.mark.parametrize("content", [b"not a checkpoint at all", json.dumps({"a": 1}).encode()])
def test_not_a_checkpoint(tmp_path, content):
    bad = tmp_path / "notes.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{bad.name}: (not a PyTorch|truncated)"):
        read_checkpoint(bad)


def test_no_state_dict_entry(tmp_path):
    torch.save({"model": {}}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no 'state_dict' entry"):
        load_unet(tmp_path / "x.pt", SMALL)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.pt")
