"""What the Python-backend model.py files share: reading their config, placing torch, serving dynamic batches.

These run inside Triton's Python backend stub (one process per model instance). `pb_utils` (the stub's
triton_python_backend_utils module) is passed in, so this module imports without a server.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class ModelContext:
    """One model instance as Triton describes it in `initialize(args)`."""

    name: str
    version_dir: Path
    params: dict[str, str]
    device: torch.device
    max_batch_size: int

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> "ModelContext":
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        # KIND_GPU is only advisory for Python models: the instance places itself on its device.
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        threads = int(params.get("torch_threads", "0") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        return cls(config["name"], Path(args["model_repository"]) / str(args["model_version"]), params, device,
                   int(config.get("max_batch_size", 0)))

    def path(self, key: str) -> Path:
        """A file parameter: absolute, or relative to the model's version folder (weights copied into it)."""
        value = self.params.get(key, "")
        if not value:
            raise ValueError(f"model {self.name}: parameter '{key}' is not set")
        path = Path(value)
        return path if path.is_absolute() else self.version_dir / path

    def dtype(self) -> torch.dtype:
        name = self.params.get("dtype", "float32") or "float32"
        if name not in DTYPES:
            raise ValueError(f"model {self.name}: dtype must be one of {sorted(DTYPES)}, got {name!r}")
        return DTYPES[name]


def serve_batch(pb_utils, requests: Sequence, inputs: Sequence[str], outputs: Sequence[str],
                run: Callable[..., Sequence[np.ndarray]]) -> list:
    """Run one dynamic batch as few model calls as possible and answer every request.

    The requests of a batch are concatenated along dim 0 and run together; requests whose shapes differ
    (Triton only batches equal shapes, so this is a safeguard) run in separate groups. A failing group gets
    error responses; the others are unaffected.
    """
    arrays = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in inputs] for r in requests]
    groups: dict[tuple, list[int]] = {}
    for i, xs in enumerate(arrays):
        groups.setdefault(tuple(x.shape[1:] for x in xs), []).append(i)
    responses: list = [None] * len(requests)
    for members in groups.values():
        sizes = [len(arrays[i][0]) for i in members]
        try:
            batch = [np.concatenate([arrays[i][k] for i in members]) for k in range(len(inputs))]
            results = run(*batch)
            parts = [np.split(np.ascontiguousarray(r), np.cumsum(sizes)[:-1]) for r in results]
            for j, i in enumerate(members):
                tensors = [pb_utils.Tensor(name, part[j]) for name, part in zip(outputs, parts)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as e:  # noqa: BLE001 - reported to the caller, who names the failing model
            for i in members:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))
    return responses


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()
