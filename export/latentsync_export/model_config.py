"""Reading, adjusting and writing Triton model configurations (config.pbtxt) as tritonclient's protobuf.

The templates under model_repository/ are valid, commented config.pbtxt files with the CPU defaults; the
exporter parses them, sets what the deployment chooses (instance groups, batching, parameters, backend) and
writes the result, so every written file parses by construction.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

ModelConfig = mc.ModelConfig
KINDS = {
    "cpu": mc.ModelInstanceGroup.KIND_CPU,
    "gpu": mc.ModelInstanceGroup.KIND_GPU,
    "auto": mc.ModelInstanceGroup.KIND_AUTO,
}


def templates_dir() -> Path:
    """The model templates (the source tree's model_repository/, shipped inside this package as `templates`)."""
    return Path(str(resources.files("latentsync_export") / "templates"))


def parse_model_config(path: str | os.PathLike) -> ModelConfig:
    """Parse a model's config.pbtxt (or a configs/<name>.pbtxt variant) with Triton's ModelConfig protobuf.

    Unknown fields, wrong enum values and syntax errors raise google.protobuf.text_format.ParseError; a `name`
    that differs from the model folder raises ValueError (Triton refuses to load such a model).
    """
    path = Path(path)
    config = text_format.Parse(path.read_text(), ModelConfig())
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    if config.name and config.name != model_dir.name:
        raise ValueError(f"{path}: name {config.name!r} differs from its folder {model_dir.name!r}")
    return config


def write_model_config(config: ModelConfig, path: str | os.PathLike, header: str = "") -> None:
    comments = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    Path(path).write_text(comments + text_format.MessageToString(config, use_short_repeated_primitives=True))


@dataclass(frozen=True)
class InstanceSpec:
    """`KIND[:COUNT[:GPU,GPU...]]`, e.g. `gpu:2:0,1` (2 instances on each of GPUs 0 and 1) or `cpu:1`."""

    kind: str = "cpu"
    count: int = 1
    gpus: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> InstanceSpec:
        m = re.fullmatch(r"(cpu|gpu|auto)(?::(\d+))?(?::(\d+(?:,\d+)*))?", text.strip().lower())
        if not m or (m.group(2) is not None and int(m.group(2)) < 1):
            raise ValueError(
                f"instance group {text!r}: expected KIND[:COUNT[:GPU,...]] with KIND cpu, gpu or "
                "auto and COUNT >= 1, e.g. gpu:2:0,1"
            )
        gpus = tuple(int(g) for g in m.group(3).split(",")) if m.group(3) else ()
        if gpus and m.group(1) != "gpu":
            raise ValueError(f"instance group {text!r}: GPU ids only go with kind gpu")
        return cls(m.group(1), int(m.group(2) or 1), gpus)

    def apply(self, config: ModelConfig) -> None:
        del config.instance_group[:]
        group = config.instance_group.add(kind=KINDS[self.kind], count=self.count)
        group.gpus.extend(self.gpus)


def set_parameters(config: ModelConfig, values: Mapping[str, object], keep: Sequence[str] | None = None) -> None:
    """Set string parameters; with `keep`, first drop every parameter not named in it."""
    if keep is not None:
        for key in [k for k in config.parameters if k not in keep]:
            del config.parameters[key]
    for key, value in values.items():
        config.parameters[key].string_value = str(value)


def set_batching(config: ModelConfig, max_batch_size: int | None = None, max_queue_delay_us: int | None = None) -> None:
    if max_batch_size is not None:
        config.max_batch_size = max_batch_size
    if max_queue_delay_us is not None and config.HasField("dynamic_batching"):
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us


def use_onnxruntime(config: ModelConfig, tensorrt: Mapping[str, str] | None = None) -> None:
    """Serve `config`'s model from model.onnx with the onnxruntime backend, TensorRT as GPU accelerator."""
    config.ClearField("backend")
    config.platform = "onnxruntime_onnx"
    config.backend = "onnxruntime"
    config.default_model_filename = "model.onnx"
    set_parameters(config, {}, keep=())
    config.ClearField("optimization")
    if tensorrt is not None:
        accel = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        for key, value in tensorrt.items():
            accel.parameters[key] = str(value)
