"""What the Python-backend model.py files share: reading their config, placing torch, moving tensors between
Triton and torch, serving dynamic batches.

These run inside Triton's Python backend stub (one process per model instance). `pb_utils` (the stub's
triton_python_backend_utils module) is passed in, so this module imports without a server. Tensors that live
on a GPU stay there: they cross between models through DLPack (Triton passes device memory, no host copy);
only host tensors go through numpy.
"""

from __future__ import annotations

import ctypes
import hmac
import json
import locale
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, Sequence

import cv2
import numpy as np
import torch

from .serve import INTERNAL_KEY_ENV, INTERNAL_KEY_PARAMETER

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelContext:
    """One model instance as Triton describes it in `initialize(args)`."""

    name: str
    version_dir: Path
    params: dict[str, str]
    device: torch.device
    max_batch_size: int
    internal_key: str = field(default="", repr=False)  # set: this model answers only requests that carry it

    @classmethod
    def from_args(
        cls, args: Mapping[str, str], tf32: bool = False, frames: bool = False, internal: bool = True
    ) -> ModelContext:
        """`tf32`: this instance runs networks, whose float32 products may use TF32 tensor cores on a GPU. Not for
        the orchestrator or the restorer: their alignment and paste-back geometry (3x3 products on the GPU)
        must stay float32, or sample positions move by a fraction of a pixel. `frames`: each of its requests
        carries whole frames (reuse_frame_memory). `internal`: only the lipsync model calls it (`admits`); the
        lipsync model itself, which clients call, is not."""
        utf8_locale()
        if frames:
            reuse_frame_memory()
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        # KIND_GPU is only advisory for Python models: the instance places itself on its device.
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        threads = int(params.get("torch_threads", "0") or 0)
        if threads > 0:  # OpenCV's pool too: the face path's erosions and transposes run there
            torch.set_num_threads(threads)
            cv2.setNumThreads(threads)
        if gpu:
            # the instance's current device: DLPack hand-overs synchronise with its stream, kernels launch there
            torch.cuda.set_device(device)
            if tf32:  # float32 networks may use TF32 tensor cores (half precision is the default there anyway)
                torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return cls(
            config["name"],
            Path(args["model_repository"]) / str(args["model_version"]),
            params,
            device,
            int(config.get("max_batch_size", 0)),
            os.environ.get(INTERNAL_KEY_ENV, "") if internal else "",
        )

    def admits(self, request) -> bool:
        """Whether this model may answer `request`: every request where no internal key is set, else only those
        whose parameters carry it (the lipsync model's calls; serve.INTERNAL_KEY_ENV). An outside client would
        otherwise skip lipsync's checks and limits: shapes, steps, sizes, queues (docs/THREAT-MODEL.md)."""
        if not self.internal_key:
            return True
        try:
            given = json.loads(request.parameters() or "{}").get(INTERNAL_KEY_PARAMETER)
        except (ValueError, AttributeError):
            return False
        return isinstance(given, str) and hmac.compare_digest(given.encode(), self.internal_key.encode())

    def refusal(self, pb_utils):
        """The error an outside request gets (it says where to go, nothing more)."""
        return pb_utils.TritonError(f"model '{self.name}' is internal: send streams to the 'lipsync' model")

    def path(self, key: str) -> Path:
        """A file parameter: absolute, or relative to the model's version folder (weights copied into it)."""
        value = self.params.get(key, "")
        if not value:
            raise ValueError(f"model {self.name}: parameter '{key}' is not set")
        path = Path(value)
        return path if path.is_absolute() else self.version_dir / path

    @property
    def stand_in(self) -> bool:
        """The repository serves a near-zero-cost stand-in instead of this network (stand_ins.py)."""
        return self.params.get("stand_in", "false").strip().lower() == "true"

    def dtype(self) -> torch.dtype:
        name = self.params.get("dtype", "float32") or "float32"
        if name not in DTYPES:
            raise ValueError(f"model {self.name}: dtype must be one of {sorted(DTYPES)}, got {name!r}")
        return DTYPES[name]


def reuse_frame_memory() -> bool:
    """In the face detector, whose requests carry whole frames: blocks up to FRAME_BLOCK_BYTES come from glibc's
    arenas, which keep up to HEAP_KEEP_BYTES free at their top, instead of serve.MALLOC_SETTINGS' 4 MiB threshold,
    and numpy's arrays are not advised into huge pages (avoid_huge_pages). Triton's stub copies each input into
    memory of its own (private_array); as a new mapping per call, every page of that 6.2 MB copy of a 1080p frame
    was faulted in and zeroed by the kernel: a third of the detector's CPU in the stand-in bench, gone with this
    (RESULTS.md, thirteenth round). The preload library's trim of idle processes gives the pages back. (lipsync
    only avoids huge pages: with the arenas too its CPU fell further, but after a stream of 300 s of audio its
    memory did not come back within 30 s in a CI run; RESULTS.md, fourteenth round.) Returns whether the allocator
    took the settings; not where the environment chose the allocator's settings (jemalloc preloaded, a trim
    threshold, another mmap threshold: the preload library's server_frame_memory follows the same rule)."""
    avoid_huge_pages()

    from .serve import FRAME_BLOCK_BYTES, HEAP_KEEP_BYTES, MALLOC_SETTINGS

    env = os.environ
    chosen = "jemalloc" in env.get("LD_PRELOAD", "") or "MALLOC_TRIM_THRESHOLD_" in env
    if chosen or env.get("MALLOC_MMAP_THRESHOLD_", "") not in ("", str(MALLOC_SETTINGS["MALLOC_MMAP_THRESHOLD_"])):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, FRAME_BLOCK_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))


def avoid_huge_pages() -> None:
    """In the processes that copy whole frames (the face detector, lipsync): numpy stops advising its arrays of 4 MB
    and more into 2 MB transparent huge pages, unless the operator chose (NUMPY_MADVISE_HUGEPAGE). The stub's
    copy of each request is such an array, a new mapping each time; in lipsync, zeroing its fresh 2 MB pages was
    10-14 ms of CPU per frame, 4.6-5.3 with 4 KiB pages (RESULTS.md, fourteenth round). It matters where huge pages
    are in `madvise` mode (the default of many distributions); under `always` the kernel uses them anyway."""
    if "NUMPY_MADVISE_HUGEPAGE" not in os.environ:
        numpy_huge_pages(False)


def numpy_huge_pages(enabled: bool) -> bool:
    """Whether numpy advises its arrays of 4 MB and more into transparent huge pages from now on; returns the
    previous setting."""
    try:
        from numpy._core import multiarray  # numpy 2, and 1.26's alias of it
    except ImportError:
        from numpy.core import multiarray
    return multiarray._set_madvise_hugepage(enabled)


def utf8_locale() -> bool:
    """Make files opened without an encoding read as UTF-8 in this process; whether they do. Triton's stub starts
    Python embedded, without setting the process locale or honouring PYTHONUTF8, so they decode as ASCII (in a
    stub torch.compile failed on its UTF-8 templates): the environment's character set if it is UTF-8, else the
    C locale's UTF-8 variant."""
    for name in ("", "C.UTF-8"):
        if _utf8():
            return True
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            continue
    return _utf8()


def _utf8() -> bool:
    return locale.getpreferredencoding(False).lower().replace("-", "") == "utf8"


def to_torch(tensor, device: torch.device | None = None) -> torch.Tensor:
    """A pb_utils.Tensor as torch: device memory through DLPack (no copy), host memory through numpy (valid
    while its request or response is; owned_tensor for longer), then moved to `device` if given."""
    out = torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else torch.from_dlpack(tensor.to_dlpack())
    return out if device is None else out.to(device)


def private_array(array: np.ndarray) -> np.ndarray:
    """`array` itself where numpy owns its memory (it, or the array it is a view of), else a copy: an array that
    outlives the request or response it came from. Triton's Python stub hands host tensors over as arrays it
    copied out of its shared-memory pool (PbTensor: pybind11 copies a buffer given without an owner), so those
    are private already, and copying them again cost a fresh, kernel-zeroed 25 MB per request of four 1080p
    frames: most of `lipsync`'s CPU (RESULTS.md, thirteenth round). A stub that handed over a view of its pool
    (the chain of views ends in a buffer numpy does not own) gets the copy."""
    root = array
    while isinstance(root.base, np.ndarray):
        root = root.base
    owned = root.base is None and root.flags.owndata
    # kept only as torch can take it and write to it: writeable, no negative strides (the stub's arrays are both)
    usable = array.flags.writeable and all(step >= 0 for step in array.strides)
    return array if owned and usable else np.array(array, copy=True)


def owned_tensor(tensor) -> torch.Tensor:
    """A pb_utils.Tensor (a request's input, a BLS response's output) as a torch tensor that outlives it, on its
    device: host memory without a copy where the stub's array is private already (private_array), device memory
    copied (owned_copy)."""
    if tensor.is_cpu():
        return torch.from_numpy(private_array(tensor.as_numpy()))
    return owned_copy(torch.from_dlpack(tensor.to_dlpack()))


_copy_streams = threading.local()


def owned_copy(tensor: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A copy on `device` (default: the tensor's), complete when this returns, of a tensor that a buffer of Triton's
    backs (a request's input, a BLS response's output): that buffer is released when `execute` returns or the
    response is dropped, and may then be reused by another process. Onto a GPU the copy (or the upload of a host
    tensor) runs on this thread's side stream and is waited for there: on the current stream it would queue behind
    the work already there (a whole UNet step of the denoiser's loop) and hold up the request, or read the buffer
    too late. The side stream does not wait for the current one: Triton hands buffers over complete (their
    producer synchronised before sending them). (From another GPU, torch also orders the copy after that GPU's
    current stream, where a model of one GPU runs nothing.)"""
    device = tensor.device if device is None else torch.device(device)
    if device.type != "cuda":
        return tensor.to(device, copy=True)
    streams = _copy_streams.__dict__.setdefault("by_device", {})
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    stream = streams[device]
    with torch.cuda.stream(stream):
        copy = tensor.to(device, copy=True)
    stream.synchronize()
    copy.record_stream(torch.cuda.current_stream(device))  # freed only after the main stream's uses
    return copy


def from_torch(pb_utils, name: str, tensor: torch.Tensor):
    """A torch tensor as a pb_utils.Tensor: GPU tensors stay on their device (DLPack); floats cross as float32,
    the models' declared I/O type, whatever precision they compute in."""
    tensor = tensor.detach()
    if tensor.is_floating_point() and tensor.dtype != torch.float32:
        tensor = tensor.float()
    if tensor.device.type != "cpu":
        # the current device is per thread (set_device in from_args reaches only the loading thread): the
        # hand-over synchronises with the current device's stream, which must be the tensor's
        with torch.cuda.device(tensor.device):
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(row_major(tensor)))
    return pb_utils.Tensor(name, tensor.contiguous().numpy())


def row_major(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor.contiguous()` with the row-major strides of its shape in size-1 dimensions too, where any stride is
    valid and torch keeps odd ones (a one-face window's (4, 1, h, w) latents come as (hw, 4hw, w, 1)): older
    Python backends refuse DLPack tensors whose strides differ from row-major. No copy beyond contiguous()'s."""
    tensor, strides, step = tensor.contiguous(), [], 1
    for size in reversed(tensor.shape):
        strides.insert(0, step)
        step *= max(size, 1)
    return tensor if tuple(strides) == tensor.stride() else tensor.as_strided(tensor.shape, strides)


def serve_admitted(pb_utils, ctx: ModelContext, requests: Sequence, serve: Callable[[list], list]) -> list:
    """The responses to a batch of requests: `serve(admitted)` answers, in order, those that `ctx.admits`; the others
    get its refusal, and their tensors are not read. The lipsync model's requests batched with an outsider's are
    served as usual."""
    responses = [None if ctx.admits(r) else pb_utils.InferenceResponse(error=ctx.refusal(pb_utils)) for r in requests]
    admitted = [r for r, response in zip(requests, responses) if response is None]
    answers = iter(serve(admitted) if admitted else [])
    return [next(answers) if response is None else response for response in responses]


def serve_batch(
    pb_utils,
    requests: Sequence,
    inputs: Sequence[str],
    outputs: Sequence[str],
    run: Callable[..., Sequence[torch.Tensor]],
    ctx: ModelContext,
    host_inputs: Collection[str] = (),
) -> list:
    """Run one dynamic batch as few model calls as possible and answer every request (those the model admits:
    serve_admitted).

    The requests of a batch are concatenated along dim 0 (on `ctx.device`; `host_inputs` in host memory, for a `run`
    that reads them there) and run together; requests whose shapes differ (Triton only batches equal shapes, so
    this is a safeguard) run in separate groups. A failing group gets error responses; the others are unaffected.
    """
    return serve_admitted(
        pb_utils,
        ctx,
        requests,
        lambda admitted: _run_batch(pb_utils, admitted, inputs, outputs, run, ctx.device, host_inputs),
    )


def _run_batch(pb_utils, requests, inputs, outputs, run, device: torch.device, host_inputs: Collection[str]) -> list:
    host = torch.device("cpu")
    tensors = [
        [to_torch(pb_utils.get_input_tensor_by_name(r, n), host if n in host_inputs else device) for n in inputs]
        for r in requests
    ]
    groups: dict[tuple, list[int]] = {}
    for i, xs in enumerate(tensors):
        groups.setdefault(tuple(x.shape[1:] for x in xs), []).append(i)
    responses: list = [None] * len(requests)
    for members in groups.values():
        sizes = [len(tensors[i][0]) for i in members]
        try:
            batch = [
                torch.cat([tensors[i][k] for i in members]) if len(members) > 1 else tensors[members[0]][k]
                for k in range(len(inputs))
            ]
            with torch.no_grad():
                results = run(*batch)
            parts = [r.split(sizes) for r in results]
            for j, i in enumerate(members):
                out = [from_torch(pb_utils, name, part[j]) for name, part in zip(outputs, parts)]
                responses[i] = pb_utils.InferenceResponse(output_tensors=out)
        except Exception as e:  # noqa: BLE001 - reported to the caller, who names the failing model
            for i in members:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))
    return responses
