"""Reading official checkpoints strictly, with errors that say what is wrong.

Every loader (latentsync_core.loaders) checks the full key set and every shape against the model built from
its config with `check_state_dict`; a mismatch is one `CheckpointError` naming the first offending key and a
likely cause.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used with the requested model/config."""


def read_checkpoint(path: str | Path) -> dict:
    """torch.load (weights only) or safetensors, turning low-level failures into one clear message."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{path}: not a PyTorch weights checkpoint ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def unwrap(obj: Mapping, key: str, path: str | Path) -> dict:
    """Take obj[key] (e.g. 'state_dict' of latentsync_unet.pt), with a clear error if it is absent."""
    if key not in obj:
        found = ", ".join(list(map(str, obj))[:5])
        raise CheckpointError(f"{path}: no '{key}' entry (top-level keys: {found or 'none'})")
    inner = obj[key]
    if not isinstance(inner, Mapping):
        raise CheckpointError(f"{path}: '{key}' is a {type(inner).__name__}, expected a dict of tensors")
    return dict(inner)


def check_state_dict(expected: Mapping[str, tuple], state_dict: Mapping, what: str, hint: str = "") -> None:
    """Raise CheckpointError unless state_dict has exactly the expected keys with the expected shapes."""
    hint = f" {hint}" if hint else ""
    for key, shape in expected.items():
        if key not in state_dict:
            n_missing = sum(k not in state_dict for k in expected)
            raise CheckpointError(f"{what}: missing key '{key}' ({n_missing} missing in all).{hint}")
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what}: '{key}' is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{what}: key '{key}' has shape {tuple(value.shape)}, the config expects {tuple(shape)}.{hint}"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise CheckpointError(f"{what}: unexpected key '{extra[0]}' ({len(extra)} unexpected in all).{hint}")


def module_shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _is_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
