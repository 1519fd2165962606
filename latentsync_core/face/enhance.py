"""Optional face enhancer: restore the generated mouth region with a face restoration network before paste-back.

LatentSync leaves the regenerated lower face soft (1.5 generates 256 px faces). A restorer (GFPGAN v1.2-1.4,
RestoreFormer or CodeFormer, the user's official weights loaded through spandrel) runs on the aligned generated
crops at its native 512 px, and its pixels are blended in only inside the feathered mouth region of the fixed mask:
every pixel outside that region stays bit-identical. A Laplacian-variance gate restores only the blurry faces.

CodeFormer comes from spandrel-extra-arches and its weights and code are licensed for non-commercial use only
(S-Lab License 1.0); `FaceEnhancer.non_commercial` says so, for the exporter and the docs to flag.
"""

from __future__ import annotations

import functools
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError, _first_line, read_checkpoint
from .restore import erode, gaussian_blur, resize_face_to_box


@dataclass(frozen=True)
class EnhanceSpec:
    """A stream's use of the enhancer: how much of the restored mouth replaces the generated one, and the gate."""

    blend: float = 1.0
    min_sharpness: float = 0.0  # restore only faces whose mouth sharpness is below this (0 = every face)
    feather: int = 8  # px of the soft edge inside the mouth region


class FaceEnhancerError(CheckpointError):
    """A face restorer weights file that is missing, unreadable, or not of a supported face restoration network."""


@dataclass(frozen=True)
class RestorerArch:
    license: str
    non_commercial: bool
    package: str  # the PyPI package whose spandrel registry knows the architecture
    native_size: int = 512  # the face size the network was trained on (GFPGAN/CodeFormer accept nothing else)


# spandrel architecture id -> facts. Only these are accepted: each has the call convention `restore` knows.
FACE_ARCHS = {
    "GFPGAN": RestorerArch("Apache-2.0", False, "spandrel"),
    "RestoreFormer": RestorerArch("Apache-2.0", False, "spandrel"),
    "CodeFormer": RestorerArch("S-Lab License 1.0 (non-commercial use only)", True, "spandrel-extra-arches"),
}
SUPPORTED = "GFPGAN v1.2-1.4, RestoreFormer, CodeFormer (needs spandrel-extra-arches)"


class FaceEnhancer(nn.Module):
    """Aligned faces (n, 3, R, R) float in [-1, 1] -> restored faces, same shape, dtype, device and range.

    Faces are resized to the network's native size and back with bicubic, antialiased resampling (the project's
    face resize, `resize_face_to_box`): bicubic keeps the input sharper than bilinear going up, and the antialias
    keeps the restored fine detail from aliasing going down. The network runs on its own device and dtype (`.to()`):
    float32 or bfloat16; spandrel marks all three networks as unsafe in float16.
    """

    def __init__(self, network: nn.Module, arch: str, size: int = 512, fidelity: float = 0.5):
        super().__init__()
        self.network, self.arch, self.size, self.fidelity = network.eval().requires_grad_(False), arch, size, fidelity
        facts = FACE_ARCHS[arch]
        self.license, self.non_commercial = facts.license, facts.non_commercial

    @torch.no_grad()
    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        param = next(self.network.parameters())
        hw = tuple(faces.shape[-2:])
        x = faces.to(device=param.device, dtype=param.dtype)
        if hw != (self.size, self.size):
            x = resize_face_to_box(x, (self.size, self.size)).clamp(-1, 1)
        y = self.restore(x).clamp(-1, 1)
        if hw != (self.size, self.size):
            y = resize_face_to_box(y, hw).clamp(-1, 1)
        return y.to(device=faces.device, dtype=faces.dtype)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """The network on (n, 3, size, size) in [-1, 1]; every supported network returns (image, extras...)."""
        if self.arch == "GFPGAN":
            # The file's stored noise maps instead of fresh noise per call: the same face gives the same output.
            return self.network(x, return_rgb=False, randomize_noise=False)[0]
        if self.arch == "CodeFormer":
            return self.network(x, weight=self.fidelity)[0]  # weight: 0 = most restored, 1 = most faithful
        return self.network(x)[0]


def load_face_enhancer(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, fidelity: float = 0.5
) -> FaceEnhancer:
    """An official face restorer file (.pth/.ckpt/.safetensors, e.g. GFPGANv1.4.pth {'params_ema': ...}) ->
    FaceEnhancer. Any failure is one FaceEnhancerError naming the file."""
    try:
        state_dict = read_checkpoint(path)
    except CheckpointError as e:
        raise FaceEnhancerError(str(e)) from None
    return face_enhancer_from_state_dict(state_dict, str(path), device, dtype, fidelity)


def face_enhancer_from_state_dict(
    state_dict: Mapping,
    what: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    fidelity: float = 0.5,
) -> FaceEnhancer:
    """Detect the architecture from the keys (spandrel), refuse anything but a supported face restorer, load
    strictly. Under `torch.device("meta")` with meta tensors it checks an official layout without any memory."""
    spandrel, registry = import_spandrel()
    state_dict = spandrel.canonicalize_state_dict(dict(state_dict))
    support = next((a for a in registry.architectures("detection") if a.detect(state_dict)), None)
    if support is None:
        missing = "" if "CodeFormer" in registry else "; spandrel-extra-arches is not installed, so not CodeFormer"
        raise FaceEnhancerError(
            f"{what}: not a face restoration checkpoint (no known architecture matches its "
            f"keys; supported: {SUPPORTED}{missing})"
        )
    arch = str(support.architecture.id)
    if arch not in FACE_ARCHS:
        raise FaceEnhancerError(f"{what}: a {arch} checkpoint, not a face restorer (supported: {SUPPORTED})")
    try:
        network = support.architecture.load(state_dict).model
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise FaceEnhancerError(f"{what}: looks like {arch} but does not load ({_first_line(e)})") from None
    size = FACE_ARCHS[arch].native_size
    return FaceEnhancer(network, arch, size, fidelity).to(device=device, dtype=dtype)


@functools.cache
def import_spandrel():
    """(spandrel, registry of spandrel's architectures plus spandrel-extra-arches' where installed).

    spandrel imports torchvision.transforms.functional at import time, for LaMa and for RestoreFormer's own input
    normalisation, neither of which runs here (FaceEnhancer calls the networks itself). PyPI's torchvision does not
    import beside a CPU build of torch, so where it is missing or broken, a stand-in whose functions raise is put in
    place for the duration of the import only.
    """
    with _torchvision_or_stand_in():
        try:
            import spandrel
        except ImportError as e:
            raise FaceEnhancerError(
                f"the face enhancer needs spandrel ({e}); install it with "
                "`pip install --no-deps spandrel==0.4.2 einops==0.8.2`"
            ) from None
        registry = spandrel.MAIN_REGISTRY.copy()
        try:
            import spandrel_extra_arches
        except ImportError:
            pass
        else:
            registry.add(*spandrel_extra_arches.EXTRA_REGISTRY, ignore_duplicates=True)
    return spandrel, registry


@contextmanager
def _torchvision_or_stand_in():
    try:
        import torchvision.transforms.functional  # noqa: F401

        usable = True
    except (ImportError, RuntimeError):  # RuntimeError: "operator torchvision::nms does not exist"
        usable = False
    if usable:
        yield
        return
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "torchvision" or k.startswith("torchvision.")}

    def unavailable(name: str) -> Callable:
        def call(*args, **kwargs):
            raise ImportError(f"torchvision.transforms.functional.{name}: torchvision is not importable here")

        return call

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    stand_ins = {name: types.ModuleType(name) for name in names}
    stand_ins["torchvision.transforms.functional"].__getattr__ = unavailable
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


def mouth_blend_weight(
    mask: np.ndarray | torch.Tensor, feather: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(R, R) weight of the restored pixels: the mouth region (mask < 0.5; mask 1 = keep the reference) eroded by
    `feather` px, then Gaussian-blurred with a (2 * feather + 1) kernel. It rises from 0 at the region's edge to 1
    (to float rounding) deep inside, and is exactly 0 outside the region: the blur reaches no farther than the
    erosion took away. feather 0 = the hard region."""
    mask = torch.as_tensor(mask, dtype=torch.float32, device=device)
    region = (mask < 0.5).float()[None, None]
    if feather > 0:
        region = gaussian_blur(erode(region, feather, feather), 2 * feather + 1).clamp(0, 1)
    return region[0, 0]


def enhance_faces(
    faces: torch.Tensor, restored: torch.Tensor, mask: np.ndarray | torch.Tensor, blend: float = 1.0, feather: int = 8
) -> torch.Tensor:
    """faces, restored (n, 3, R, R) -> faces with restored pixels mixed in by blend * mouth_blend_weight; pixels where
    that weight is 0 are the input's, bit for bit."""
    if blend <= 0:
        return faces
    weight = mouth_blend_weight(mask, feather, faces.device).mul(min(blend, 1.0)).to(faces.dtype)
    return torch.where(weight > 0, torch.lerp(faces, restored.to(faces.dtype), weight), faces)


LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
GRAY = torch.tensor([0.299, 0.587, 0.114])  # cv2 RGB2GRAY weights


def mouth_sharpness(faces: torch.Tensor, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(n, 3, R, R) RGB in [-1, 1] -> (n,) float32: the variance of the Laplacian over the mouth region (mask < 0.5).

    The classic blur measure `cv2.Laplacian(gray, cv2.CV_64F).var()`: gray = 0.299 R + 0.587 G + 0.114 B on the
    0..255 scale (float, not rounded to uint8), the 3x3 Laplacian (ksize=1) with cv2's default border
    (reflect-101), the population variance taken over the region's pixels only. Sharper faces score higher."""
    x = faces.float()
    gray = torch.einsum("nchw,c->nhw", x, GRAY.to(x.device)).add(1).mul(127.5)[:, None]
    lap = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="reflect"), LAPLACIAN.to(x.device)[None, None])[:, 0]
    region = torch.as_tensor(mask, device=x.device) < 0.5
    values = lap[:, region]
    return values.var(dim=1, correction=0)


def enhance_mouths(
    enhancer: Callable[[torch.Tensor], torch.Tensor],
    faces: torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    blend: float = 1.0,
    feather: int = 8,
    min_sharpness: float | None = None,
) -> torch.Tensor:
    """The optional step on generated faces (n, 3, R, R) before paste-back: restore the faces whose mouth region is
    blurry (sharpness below min_sharpness; every face when it is 0/None) and blend them in (enhance_faces).
    `enhancer` is a FaceEnhancer or anything with its call signature (e.g. a call to a served model)."""
    if blend <= 0 or len(faces) == 0:
        return faces
    if not min_sharpness:
        return enhance_faces(faces, enhancer(faces), mask, blend, feather)
    picked = torch.nonzero(mouth_sharpness(faces, mask) < min_sharpness)[:, 0].to(faces.device)
    if len(picked) == 0:
        return faces
    out = faces.clone()
    out[picked] = enhance_faces(faces[picked], enhancer(faces[picked]), mask, blend, feather)
    return out
