"""ONNX graphs of the VAE encoder/decoder and the whisper encoder for a TensorRT repository (--tensorrt).

Each graph keeps float32 inputs/outputs and the Triton tensor names, with dynamic batch (and frame/size) axes.
The float32 graph is checked against torch with onnxruntime on the CPU, on shapes other than the traced ones
(so a baked-in shape fails); the float16 graph that is shipped (float16 weights and compute, float32 I/O) is
checked structurally and, where onnxruntime's CPU kernels allow, numerically for information. TensorRT
engines are built from the shipped graph on the GPU at deploy time (onnxruntime's TensorRT provider).
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

OPSET = 17


class ExportError(RuntimeError):
    """An ONNX graph that does not reproduce its torch module."""


@dataclass
class GraphSpec:
    """How one torch module becomes one Triton ONNX model."""

    module: torch.nn.Module
    inputs: dict[str, Callable[[], torch.Tensor]]  # name -> example tensor maker (traced shapes)
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    checks: list[dict[str, torch.Tensor]] = field(default_factory=list)  # validation inputs, other shapes


# ---------------------------------------------------------------------------------------------------- modules
class PosteriorGraph(torch.nn.Module):
    """Unscaled posterior mean and std (the random draw stays with the stream in `lipsync`)."""

    def __init__(self, codec):
        super().__init__()
        self.codec = codec

    def forward(self, faces, keep):
        post = self.codec.encode_faces(faces, keep)
        return post.mean, post.std


class DecoderGraph(torch.nn.Module):
    def __init__(self, codec):
        super().__init__()
        self.codec = codec

    def forward(self, latents):
        return self.codec.decode(latents)


class Float16(torch.nn.Module):
    """A module computing in float16 behind float32 inputs and outputs (integer inputs pass through)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half()

    def forward(self, *xs):
        out = self.module(*(x.half() if x.is_floating_point() else x for x in xs))
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


# ---------------------------------------------------------------------------------------------------- specs
def vae_encoder_spec(codec, resolutions: list[int], seed: int = 0) -> GraphSpec:
    g = torch.Generator().manual_seed(seed)
    u8 = lambda n, c, r: torch.randint(0, 256, (n, c, r, r), generator=g, dtype=torch.uint8)  # noqa: E731
    inputs = lambda n, r: {"FACES": u8(n, 3, r), "KEEP": u8(n, 1, r)}  # noqa: E731
    axes = {0: "batch", 2: "height", 3: "width"}
    traced = inputs(2, resolutions[0])
    return GraphSpec(
        PosteriorGraph(codec),
        {k: (lambda v=v: v) for k, v in traced.items()},
        ["MEAN", "STD"],
        {"FACES": axes, "KEEP": axes, "MEAN": axes, "STD": axes},
        [inputs(3, r) for r in resolutions],
    )


def vae_decoder_spec(codec, latent_sizes: list[int], seed: int = 0) -> GraphSpec:
    g = torch.Generator().manual_seed(seed)
    lat = lambda n, s: torch.randn(n, 4, s, s, generator=g)  # noqa: E731
    axes = {0: "batch", 2: "height", 3: "width"}
    traced = lat(2, latent_sizes[0])
    return GraphSpec(
        DecoderGraph(codec),
        {"LATENTS": lambda: traced},
        ["PIXELS"],
        {"LATENTS": axes, "PIXELS": axes},
        [{"LATENTS": lat(3, s)} for s in latent_sizes],
    )


def audio_encoder_spec(encoder, n_mels: int = 80, n_frames: int = 3000, seed: int = 0) -> GraphSpec:
    g = torch.Generator().manual_seed(seed)
    mel = lambda s: torch.rand(s, n_mels, n_frames, generator=g) * 2.5 - 1.5  # noqa: E731 - log-mel range
    traced = mel(1)
    return GraphSpec(
        encoder,
        {"MEL": lambda: traced},
        ["FEATURES"],
        {"MEL": {0: "batch"}, "FEATURES": {0: "batch"}},
        [{"MEL": mel(2)}],
    )


# ---------------------------------------------------------------------------------------------------- export
def export_graph(module: torch.nn.Module, spec: GraphSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(make() for make in spec.inputs.values())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=list(spec.inputs),
            output_names=spec.outputs,
            dynamic_axes=spec.dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _single_data_file(path)


def _single_data_file(path: Path) -> None:
    """Models over 2 GB come out with one external-data file per tensor; keep one `model.onnx.data` instead."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {e.value for init in model.graph.initializer for e in init.external_data if e.key == "location"}
    if not files:
        return
    model = onnx.load(str(path))
    for name in files:
        (path.parent / name).unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")


def reference_outputs(module: torch.nn.Module, checks: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
    with torch.no_grad():
        outs = [module(*feed.values()) for feed in checks]
    return [o if isinstance(o, tuple) else (o,) for o in outs]


def max_abs_error(path: Path, checks: list[dict[str, torch.Tensor]], refs: list[tuple[torch.Tensor, ...]]) -> float:
    """Largest |onnxruntime(CPU) - torch| over the check inputs and all outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for feed, ref in zip(checks, refs):
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})
        for r, o in zip(ref, got):
            if tuple(r.shape) != o.shape:
                raise ExportError(f"{path}: output shape {o.shape} != torch {tuple(r.shape)} (a baked-in shape?)")
            worst = max(worst, float(np.abs(r.float().numpy() - o).max()))
    return worst


def check_structure(path: Path) -> None:
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def export_and_validate(spec: GraphSpec, path: Path, fp16: bool, rtol: float = 1e-3) -> dict:
    """Write the shipped graph to `path` (float16 if asked) and return the validation record.

    The float32 graph must match torch within rtol * max(1, max|torch|); otherwise ExportError.
    """
    module = spec.module.eval().float()
    refs = reference_outputs(module, spec.checks)
    with tempfile.TemporaryDirectory(prefix="latentsync-onnx-") as tmp:
        fp32_path = Path(tmp) / "model.onnx" if fp16 else path
        export_graph(module, spec, fp32_path)
        check_structure(fp32_path)
        err = max_abs_error(fp32_path, spec.checks, refs)
    scale = max(1.0, *(float(t.abs().max()) for ref in refs for t in ref))
    record = {"fp32_max_abs_error": err, "output_scale": scale}
    if err > rtol * scale:
        raise ExportError(
            f"{path.parent.parent.name}: ONNX float32 graph differs from torch by {err:.3g} (limit {rtol * scale:.3g})"
        )
    if fp16:
        export_graph(Float16(module), spec, path)
        check_structure(path)
        record["dtype"] = "float16"
        record["fp16_onnxruntime_cpu"] = _try_fp16_on_cpu(path, spec.checks, refs)
    else:
        record["dtype"] = "float32"
    return record


def _try_fp16_on_cpu(path: Path, checks, refs) -> str:
    """Informational: the float16 graph is meant for the GPU; onnxruntime's CPU kernels may not cover it."""
    try:
        return f"max abs error vs torch float32: {max_abs_error(path, checks, refs):.3g}"
    except Exception as e:  # noqa: BLE001 - NOT_IMPLEMENTED kernels are acceptable on CPU
        return f"not runnable on onnxruntime CPU ({str(e).splitlines()[0][:160]})"
