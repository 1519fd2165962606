"""latentsync-export: the repository it writes for both targets (no server here; see test_triton_lipsync.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latentsync_export.export import ExportConfigError, ExportOptions, build_repository, main
from latentsync_export.manifest import read_manifest
from latentsync_export.model_config import InstanceSpec, parse_model_config, templates_dir
from latentsync_serving.bls import FRAME_CALL_BYTES
from latentsync_serving.lipsync_service import INGEST_BACKLOG_FRAMES

mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")

CPU_MODELS = {
    "denoiser_1.5",
    "denoiser_1.6",
    "audio_encoder",
    "vae_encoder",
    "vae_decoder",
    "face_detector",
    "restorer",
    "lipsync",
}
ONNX_MODELS = {"audio_encoder", "vae_encoder", "vae_decoder"}
GPU_PYTHON_MODELS = {"denoiser_1.5", "vae_encoder", "vae_decoder", "audio_encoder", "restorer", "lipsync"}


def configs(repo):
    return {p.parent.name: parse_model_config(p) for p in sorted(repo.glob("*/config.pbtxt"))}


@pytest.fixture(scope="module")
def cpu_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu") / "repo"
    code = main(
        [
            "--tiny",
            "--out",
            str(out),
            "--instances",
            "denoiser=cpu:2",
            "--instances",
            "restorer=gpu:1:0",
            "--max-streams",
            "5",
            "--idle-timeout-s",
            "30",
            "--max-windows",
            "4",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def gpu_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "repo"
    build_repository(ExportOptions(out=out, tiny=True, variants=("1.5",), target="gpu"))
    return out


@pytest.fixture(scope="module")
def tensorrt_repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "repo"
    build_repository(
        ExportOptions(out=out, tiny=True, variants=("1.5",), target="gpu", tensorrt=True, trt_cache_dir="/cache/trt")
    )
    return out


def test_templates_parse_and_cover_every_model():
    found = configs(templates_dir())
    assert {"denoiser", "audio_encoder", "vae_encoder", "vae_decoder", "face_detector", "restorer", "lipsync"} <= set(
        found
    )


def test_cpu_repository(cpu_repo):
    cfg = configs(cpu_repo)
    assert set(cfg) == CPU_MODELS
    assert all(c.backend == "python" and (cpu_repo / n / "1" / "model.py").is_file() for n, c in cfg.items())
    assert all(c.name == n for n, c in cfg.items())
    # instance groups as asked; defaults elsewhere
    assert [(g.kind, g.count) for g in cfg["denoiser_1.6"].instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 2)]
    assert [(g.kind, list(g.gpus)) for g in cfg["restorer"].instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, [0])]
    assert cfg["vae_encoder"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    # the denoiser: decoupled, one window per request, its loop batches up to --max-windows windows per step
    dn = cfg["denoiser_1.5"]
    assert dn.model_transaction_policy.decoupled and dn.max_batch_size == 0
    assert [i.name for i in dn.input] == ["LATENTS", "MASK", "MASKED", "REFERENCE", "AUDIO"]
    assert dn.parameters["max_windows"].string_value == "4" and dn.parameters["dtype"].string_value == "float32"
    # dynamic batching of the per-frame models: a whole window at least
    assert all(
        cfg[m].max_batch_size >= 16 and cfg[m].HasField("dynamic_batching")
        for m in ("vae_encoder", "vae_decoder", "restorer", "face_detector")
    )
    # the orchestrator: decoupled, one sequence per stream, idle timeout and slots as asked
    ls = cfg["lipsync"]
    assert ls.model_transaction_policy.decoupled and ls.max_batch_size == 0
    assert ls.sequence_batching.max_sequence_idle_microseconds == 60_000_000  # twice stream_idle_timeout_s
    assert ls.sequence_batching.oldest.max_candidate_sequences == 5
    p = {k: v.string_value for k, v in ls.parameters.items()}
    assert p["denoiser_models"] == "1.5=denoiser_1.5,1.6=denoiser_1.6" and p["random_weights"] == "true"
    assert p["stream_idle_timeout_s"] == "30" and float(p["vae_scaling_factor"]) == pytest.approx(0.18215)
    assert int(p["frame_call_bytes"]) == FRAME_CALL_BYTES  # the template and the service agree
    assert int(p["ingest_backlog_frames"]) == INGEST_BACKLOG_FRAMES
    # the cpu target: one BLS call in flight per callee (--frame-max-batch 16 / 16), which bounds the pools' growth
    # (docs/OPERATIONS.md "Memory")
    assert p["calls_per_model"] == "1"
    # the per-frame Python work runs on one torch thread per instance (OpenMP's spinning threads cost more)
    assert p["torch_threads"] == cfg["restorer"].parameters["torch_threads"].string_value == "1"
    # --tiny copies the weights into the version folders, referenced relative to them
    unet_ckpt = cfg["denoiser_1.6"].parameters["checkpoint"].string_value
    assert not unet_ckpt.startswith("/") and (cpu_repo / "denoiser_1.6" / "1" / unet_ckpt).is_file()
    assert json.loads(cfg["denoiser_1.6"].parameters["unet_config"].string_value)["in_channels"] == 13
    assert (cpu_repo / "audio_encoder" / "1" / cfg["audio_encoder"].parameters["checkpoint"].string_value).is_file()
    m = read_manifest(cpu_repo)
    assert m["target"] == "cpu" and m["variants"] == ["1.5", "1.6"] and m["random_weights"]
    assert (cpu_repo / m["weights"]["unet"]["1.5"]).is_file()


def test_variants_get_different_unet_weights(cpu_repo):
    a = torch.load(cpu_repo / "denoiser_1.5/1/latentsync_unet.pt", weights_only=True)["state_dict"]
    b = torch.load(cpu_repo / "denoiser_1.6/1/latentsync_unet.pt", weights_only=True)["state_dict"]
    key = next(k for k in a if k.endswith("conv_in.weight"))
    assert not torch.equal(a[key], b[key])


def test_weights_folder_is_referenced_not_copied(tmp_path):
    from latentsync_core.tiny import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "w16", seed=3)
    out = tmp_path / "repo"
    build_repository(ExportOptions(out=out, weights={"1.6": weights}))
    cfg = configs(out)
    assert "denoiser_1.6" in cfg and "denoiser_1.5" not in cfg
    assert cfg["denoiser_1.6"].parameters["checkpoint"].string_value == str((weights / "latentsync_unet.pt").resolve())
    assert cfg["vae_decoder"].parameters["vae"].string_value == str((weights / "vae").resolve())
    assert not (out / "denoiser_1.6" / "1" / "latentsync_unet.pt").exists()
    p = cfg["lipsync"].parameters
    assert p["denoiser_models"].string_value == "1.6=denoiser_1.6"
    assert p["random_weights"].string_value == "true"  # the tiny folder's marker travels with it
    # an existing repository is only replaced with force
    with pytest.raises(ExportConfigError, match="--force"):
        build_repository(ExportOptions(out=out, weights={"1.6": weights}))
    build_repository(ExportOptions(out=out, weights={"1.6": weights}, force=True))
    # a folder that is not such a repository is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ExportConfigError, match="not a repository"):
        build_repository(ExportOptions(out=other, weights={"1.6": weights}, force=True))
    assert (other / "keep.txt").exists()


def test_gpu_repository_configs(gpu_repo):
    """gpu target: the Python models on the GPU, the denoiser and the VAE in bfloat16, sized for a GPU."""
    cfg = configs(gpu_repo)
    assert set(cfg) == {
        "denoiser_1.5",
        "audio_encoder",
        "vae_encoder",
        "vae_decoder",
        "face_detector",
        "restorer",
        "lipsync",
    }
    for name in GPU_PYTHON_MODELS:
        assert cfg[name].backend == "python" and cfg[name].instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert cfg["face_detector"].instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    for name in ("denoiser_1.5", "vae_encoder", "vae_decoder"):
        assert cfg[name].parameters["dtype"].string_value == "bfloat16"
    assert cfg["denoiser_1.5"].parameters["max_windows"].string_value == "16"
    assert cfg["denoiser_1.5"].parameters["compile_unet"].string_value == ""  # eager unless asked
    assert cfg["denoiser_1.5"].parameters["latent_size"].string_value == "32"
    assert cfg["lipsync"].sequence_batching.oldest.max_candidate_sequences == 24
    assert cfg["vae_encoder"].max_batch_size >= 32 and cfg["face_detector"].max_batch_size >= 64
    # GPU tensors of the orchestrator reach the models in device memory
    for name in ("denoiser_1.5", "vae_encoder", "vae_decoder", "restorer"):
        assert cfg[name].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert read_manifest(gpu_repo)["dtype"] == "bfloat16"


@pytest.mark.slow
def test_tensorrt_repository_configs(tensorrt_repo):
    cfg = configs(tensorrt_repo)
    for name in ONNX_MODELS:
        c = cfg[name]
        assert c.platform == "onnxruntime_onnx" and not c.parameters
        assert (tensorrt_repo / name / "1" / "model.onnx").is_file()
        assert not (tensorrt_repo / name / "1" / "model.py").exists()
        assert c.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        (trt,) = c.optimization.execution_accelerators.gpu_execution_accelerator
        assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
        assert trt.parameters["trt_engine_cache_path"] == f"/cache/trt/{name}"
        for kind in ("min", "opt", "max"):  # one profile entry per input
            assert {s.split(":")[0] for s in trt.parameters[f"trt_profile_{kind}_shapes"].split(",")} == {
                i.name for i in c.input
            }
    # the encoder's optimisation profile is at the served batch: one window's masked + reference faces
    (trt,) = cfg["vae_encoder"].optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.parameters["trt_profile_opt_shapes"].startswith("FACES:32x3x")
    assert {i.name: i.data_type for i in cfg["vae_encoder"].input} == {
        "FACES": mc.TYPE_UINT8,
        "KEEP": mc.TYPE_UINT8,
    }
    assert cfg["denoiser_1.5"].backend == "python"


@pytest.mark.slow
def test_tensorrt_repository_onnx_graphs(tensorrt_repo):
    """Graph I/O matches the Triton config; the float32 export matched torch; the shipped float16 graph loads."""
    import onnx
    import onnxruntime as ort

    cfg, manifest = configs(tensorrt_repo), read_manifest(tensorrt_repo)
    for name in ONNX_MODELS:
        record = manifest["onnx"][name]
        print(
            f"{name}: float32 ONNX vs torch max abs error {record['fp32_max_abs_error']:.3g} "
            f"(output scale {record['output_scale']:.3g}); float16: {record['fp16_onnxruntime_cpu']}"
        )
        assert record["dtype"] == "float16"
        assert record["fp32_max_abs_error"] <= 1e-3 * record["output_scale"]
        model = onnx.load(str(tensorrt_repo / name / "1" / "model.onnx"))
        onnx.checker.check_model(model)
        graph_inputs = {i.name: i for i in model.graph.input}
        c = cfg[name]
        assert set(graph_inputs) == {i.name for i in c.input}
        assert {o.name for o in model.graph.output} == {o.name for o in c.output}
        for i in c.input:  # batch dim + config dims = graph rank
            assert len(graph_inputs[i.name].type.tensor_type.shape.dim) == 1 + len(i.dims), i.name
        elem = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        onnx_type = {mc.TYPE_FP32: onnx.TensorProto.FLOAT, mc.TYPE_UINT8: onnx.TensorProto.UINT8}
        assert elem == {i.name: onnx_type[i.data_type] for i in c.input}, name  # float32 / uint8 as configured
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
        ort.InferenceSession(str(tensorrt_repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_stand_in_repository(tmp_path):
    """--stand-ins: the networks' models are switched to their stand-ins; the manifest says so."""
    out = tmp_path / "repo"
    build_repository(ExportOptions(out=out, tiny=True, variants=("1.5",), stand_ins=True))
    cfg = configs(out)
    for name in ("denoiser_1.5", "vae_encoder", "vae_decoder", "audio_encoder"):
        assert cfg[name].parameters["stand_in"].string_value == "true"
    assert read_manifest(out)["stand_ins"] is True


def test_a_weights_folders_mask_image_is_served_and_is_the_references(tmp_path, shared_dir, capsys):
    """Upstream's mask.png beside the checkpoints reaches the lipsync model (copied into its folder, named by its
    `mask` parameter) and the in-process reference built from the repository; without it the export says that the
    drawn approximation is used."""
    from latentsync_core.face.mask import load_fixed_mask, mouth_mask
    from latentsync_core.loaders import load_models
    from latentsync_core.tiny import make_tiny_weights
    from latentsync_export.manifest import load_reference

    weights = make_tiny_weights(tmp_path / "w", seed=1)
    (weights / "TINY_RANDOM_WEIGHTS").unlink()  # as real weights: the export's note about the mask shows
    assert main(["--out", str(tmp_path / "plain"), "--weights", str(weights), "--variants", "1.5"]) == 0
    assert "no mask.png" in capsys.readouterr().out
    assert read_manifest(tmp_path / "plain")["mask"] is None
    assert "mask" not in configs(tmp_path / "plain")["lipsync"].parameters

    upstream = shared_dir / "golden" / "mask.png"
    (weights / "mask.png").write_bytes(upstream.read_bytes())
    out = tmp_path / "repo"
    assert main(["--out", str(out), "--weights", str(weights)]) == 0
    assert "no mask.png" not in capsys.readouterr().out
    assert configs(out)["lipsync"].parameters["mask"].string_value == "mask.png"
    assert (out / "lipsync" / "1" / "mask.png").read_bytes() == upstream.read_bytes()
    expected = load_fixed_mask(str(upstream), 256)
    assert not np.array_equal(expected, mouth_mask(256))
    assert np.array_equal(load_reference(out, "1.5", detector=None).stream().mask, expected)
    assert np.array_equal(load_models(weights, detector=None).mask_image, weights / "mask.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")  # refused at export, not at every stream's first frames
    assert main(["--out", str(tmp_path / "bad"), "--tiny", "--mask", str(tmp_path / "bad.png")]) == 2
    assert "not an image OpenCV can read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tiny", "--weights", "x"], "not allowed with"),
        (["--tiny", "--instances", "denoiser"], "MODEL=KIND"),
        (["--tiny", "--instances", "denoiser=tpu:1"], "KIND"),
        (["--tiny", "--instances", "lipsinc=cpu:2"], "lipsinc: no such model"),
        (["--tiny", "--variants", "1.5", "--instances", "denoiser_1.6=gpu"], "denoiser_1.6: no such model"),
        (["--tiny", "--instances", "enhancer=gpu"], "with --enhancer-weights"),
        (["--tiny", "--instances", "lipsync=cpu", "--instances", "lipsync=gpu:2"], "given twice"),
        (["--tiny", "--max-windows", "0"], ">= 1"),
        (["--tiny", "--compile-unet", "fast"], "invalid choice"),
        (["--tiny", "--dtype", "bfloat16"], "float32"),
        (["--tiny", "--tensorrt"], "--target gpu"),
        (["--tiny", "--detector", "insightface"], "--detector-dir"),
        (["--weights", "/nonexistent/weights"], "not found"),
        (["--tiny", "--mask", "/nonexistent/mask.png"], "--mask /nonexistent/mask.png: no such file"),
    ],
)
def test_cli_errors_say_what_is_wrong(tmp_path, capsys, argv, message):
    try:
        code = main(argv + ["--out", str(tmp_path / "repo")])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_a_variant_denoiser_named_in_instances_overrides_the_template_name(tmp_path):
    out = tmp_path / "repo"
    specs = {"denoiser_1.6": InstanceSpec("cpu", 3), "denoiser": InstanceSpec("cpu", 2)}
    build_repository(ExportOptions(out=out, tiny=True, instances=specs))
    cfg = configs(out)
    assert [g.count for g in cfg["denoiser_1.6"].instance_group] == [3]
    assert [g.count for g in cfg["denoiser_1.5"].instance_group] == [2]


def test_compiled_unet_repository(tmp_path):
    out = tmp_path / "repo"
    build_repository(ExportOptions(out=out, tiny=True, variants=("1.6",), target="gpu", compile_unet="reduce-overhead"))
    params = configs(out)["denoiser_1.6"].parameters
    assert params["compile_unet"].string_value == "reduce-overhead" and params["latent_size"].string_value == "64"


def test_instance_spec():
    assert InstanceSpec.parse("gpu:2:0,1") == InstanceSpec("gpu", 2, (0, 1))
    assert InstanceSpec.parse("CPU") == InstanceSpec("cpu", 1, ())
    for bad in ("cpu:0", "cpu:1:0", "gpu:x"):
        with pytest.raises(ValueError):
            InstanceSpec.parse(bad)
