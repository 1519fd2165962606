"""UNet3DConditionModel against upstream LatentSync: state_dict layout of the official configs (manifests) and
numerical parity on the golden tiny-config forward pass, plus the input conventions the pipeline relies on."""

import copy
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsync_core.models.unet3d import UNet3DConditionModel


@pytest.fixture(scope="module")
def manifest_case(shared_dir):
    case_dir = shared_dir / "golden" / "unet_manifest"
    return case_dir, json.loads((case_dir / "case.json").read_text())


@pytest.fixture(scope="module")
def golden(shared_dir):
    """(case.json, float32 model loaded strictly from weights.safetensors, inputs, outputs) of the unet case."""
    case_dir = shared_dir / "golden" / "unet"
    case = json.loads((case_dir / "case.json").read_text())
    model = UNet3DConditionModel.from_config(case["config"]).eval()
    state_dict = {k: v.float() for k, v in load_file(case_dir / case["weights"]["file"]).items()}
    model.load_state_dict(state_dict, strict=True)
    inputs = {k: torch.from_numpy(v) for k, v in np.load(case_dir / case["inputs"]["file"]).items()}
    outputs = dict(np.load(case_dir / case["outputs"]["file"]))
    return case, model, inputs, outputs


@pytest.fixture(scope="module")
def first_pred(golden):
    """Our float32 prediction at the first golden timestep (3-D audio, 0-d tensor timestep)."""
    _, model, inputs, _ = golden
    with torch.no_grad():
        return model(inputs["sample"], inputs["timesteps"][0], inputs["encoder_hidden_states"])


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def test_manifests_keys_order_and_shapes(manifest_case):
    case_dir, case = manifest_case
    assert case["files"], "no manifest listed"
    for name, file in case["files"].items():
        manifest = json.loads((case_dir / file).read_text())
        with torch.device("meta"):
            model = UNet3DConditionModel.from_config(manifest["model_config"])
        ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
        assert ours == [(k, list(v)) for k, v in manifest["state_dict"].items()], name
        assert sum(p.numel() for p in model.parameters()) == manifest["n_parameters"], name
        assert sorted(k for k, _ in model.named_buffers()) == sorted(manifest["buffers"]), name


def test_golden_noise_pred_every_timestep(golden):
    case, model, inputs, outputs = golden
    with torch.no_grad():
        preds = [model(inputs["sample"], t, inputs["encoder_hidden_states"]).numpy() for t in inputs["timesteps"]]
    assert len(preds) == len(outputs["noise_pred"])
    assert max_abs(np.stack(preds), outputs["noise_pred"]) < case["tolerance"]["max_abs"]


def block_outputs(model, inputs, names) -> dict[str, np.ndarray]:
    """Forward-hook outputs of the named blocks (first timestep), in upstream's 5-D layout, as float64."""
    b, _, f, _, _ = inputs["sample"].shape
    dtype = next(model.parameters()).dtype
    captured, hooks = {}, []
    for name in names:
        module = model.get_submodule(re.sub(r"_(\d+)$", r".\1", name[len("debug_") :]))

        def hook(_, __, out, name=name):
            out = out[0] if isinstance(out, tuple) else out
            if out.dim() == 4:  # frame batch (b*f, c, h, w) -> (b, c, f, h, w)
                out = out.unflatten(0, (b, f)).transpose(1, 2)
            captured[name] = out.double().numpy()

        hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(inputs["sample"].to(dtype), inputs["timesteps"][0], inputs["encoder_hidden_states"].to(dtype))
    for h in hooks:
        h.remove()
    return captured


def test_golden_debug_activations(golden):
    """The blocks named by the debug_* arrays agree with upstream's: within debug_max_abs, or within 3x upstream's
    own float32 rounding at that block (how far its values are from the float64 evaluation of the same weights),
    whichever is larger. At the 1x1-spatial deepest levels that rounding is ~3e-3 (case.json: their GroupNorms
    amplify it), and a float32 run on other kernels lands a few 1e-3 away and carries some of it up: on a Zen 3 VM
    with MKL_CBWR=COMPATIBLE (conftest.py) the deepest block is 5.5e-3 from upstream's (its rounding 2.7e-3) and
    the 4x4 up block 6.7e-4 (3.3e-4). A real mistake moves them ~0.2; the final noise_pred is held to max_abs."""
    case, model, inputs, outputs = golden
    tolerance = case["tolerance"]["debug_max_abs"]
    names = [n for n in outputs if n.startswith("debug_")]
    ours = block_outputs(model, inputs, names)
    exact = block_outputs(copy.deepcopy(model).double(), inputs, names)
    assert names and set(ours) == set(names)
    ill_conditioned = []
    for name in names:
        assert ours[name].shape == outputs[name].shape, name
        upstream_rounding = max_abs(exact[name], outputs[name])
        allowed = max(tolerance, 3 * upstream_rounding)
        ill_conditioned += [name] if upstream_rounding > tolerance else []
        assert max_abs(ours[name], outputs[name]) < allowed, (name, max_abs(ours[name], outputs[name]), allowed)
    assert not {"debug_down_blocks_0", "debug_up_blocks_1"} & set(ill_conditioned), ill_conditioned  # 4x4 levels


def test_fresh_position_tables_equal_upstream(golden, shared_dir):
    """The '*.pos_encoder.pe' buffers a new model computes equal the ones upstream stored."""
    case, _, _, _ = golden
    stored = load_file(shared_dir / "golden" / "unet" / case["weights"]["file"])
    fresh = UNet3DConditionModel.from_config(case["config"]).state_dict()
    pe_keys = [k for k in stored if k.endswith(".pos_encoder.pe")]
    assert pe_keys
    for k in pe_keys:
        assert torch.allclose(fresh[k], stored[k].float(), atol=1e-6), k


def test_4d_audio_and_python_int_timestep_match(golden, first_pred):
    _, model, inputs, _ = golden
    sample, audio, t = inputs["sample"], inputs["encoder_hidden_states"], inputs["timesteps"][0]
    b, ref = sample.shape[0], first_pred
    with torch.no_grad():
        assert torch.equal(model(sample, t, audio.unflatten(0, (b, -1))), ref)
        assert torch.equal(model(sample, int(t), audio), ref)
        assert torch.equal(model(sample, t.expand(b).clone(), audio), ref)


def test_batch_items_are_independent_with_per_item_timesteps(golden):
    """Windows batched together (e.g. from several streams, each at its own step) do not influence each other.
    Run in float64 so that kernel-order rounding cannot hide or fake a leak between batch items."""
    case, model, inputs, _ = golden
    model64 = UNet3DConditionModel.from_config(case["config"]).eval()
    model64.load_state_dict(model.state_dict())
    model64.double()
    sample, audio, ts = inputs["sample"].double(), inputs["encoder_hidden_states"].double(), inputs["timesteps"]
    b, f = sample.shape[0], sample.shape[2]
    per_item = torch.stack([ts[i % len(ts)] for i in range(b)])
    with torch.no_grad():
        batched = model64(sample, per_item, audio)
        for i in range(b):
            alone = model64(sample[i : i + 1], per_item[i], audio[i * f : (i + 1) * f])
            assert max_abs(batched[i : i + 1], alone) < 1e-9, i


def test_short_window_runs(golden, first_pred):
    """The last window of a clip can hold fewer frames; the temporal layers must accept any f <= max_len."""
    case, model, inputs, _ = golden
    sample, audio = inputs["sample"], inputs["encoder_hidden_states"]
    b, f = sample.shape[0], sample.shape[2]
    short = max(1, f // 3)
    with torch.no_grad():
        out = model(sample[:, :, :short], inputs["timesteps"][0], audio.unflatten(0, (b, f))[:, :short])
    assert out.shape == (b, case["config"]["out_channels"], short, *sample.shape[3:])
    assert torch.isfinite(out).all()
    # temporal attention mixes frames: a shorter window gives different values for the same frames
    assert max_abs(out, first_pred[:, :, :short]) > 1e-3


def test_float16_forward_stays_close(golden):
    case, model, inputs, outputs = golden
    informational = case.get("precision", {}).get("fp16_cpu_vs_fp64_max_abs (informational)", 0.0)
    half = UNet3DConditionModel.from_config(case["config"]).eval()
    half.load_state_dict(model.state_dict())
    half.half()
    with torch.no_grad():
        out = half(inputs["sample"].half(), inputs["timesteps"][0], inputs["encoder_hidden_states"].half())
    assert out.dtype == torch.float16
    reference = outputs.get("noise_pred_fp64", outputs["noise_pred"])[0]
    assert max_abs(out.float(), reference) < max(0.1, 2 * informational)


def test_config_fields_are_checked():
    from latentsync_core.configs import unet_config

    with pytest.raises(TypeError, match="no_such_field"):
        UNet3DConditionModel.from_config(unet_config(no_such_field=1))
    with pytest.raises(NotImplementedError, match="use_linear_projection"):
        UNet3DConditionModel.from_config(unet_config(use_linear_projection=True))
    with pytest.raises(TypeError):
        UNet3DConditionModel.from_config(unet_config(motion_module_kwargs={"bogus": 1}))
    with torch.device("meta"):  # fields upstream accepts at their default values are fine
        UNet3DConditionModel.from_config(unet_config(upcast_attention=False, use_inflated_groupnorm=False))
