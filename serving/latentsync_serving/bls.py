"""`TritonModels`: the pipeline's ModelBackend as BLS calls from the `lipsync` model to the other Triton models.

The per-stream numerics (alignment, masks, posterior sampling with the stream's generator, compositing) stay in
latentsync_core.pipeline.LipSyncStream; only the model calls cross the process boundary, so a Triton stream
computes exactly what LocalModels computes in-process. Tensors cross as torch tensors of the stream's device:
on a GPU through DLPack in device memory (the callee answers in device memory too), on the CPU through numpy.
Per window a stream makes one call to each model, except that frames (detector) and paste regions with their
faces (restorer) go in calls of at most `frame_call_bytes`; the denoising loop's steps all run inside the
denoiser.
Every call blocks its stream's thread only; the calls of concurrent streams meet in the callees' batchers, at
most `CallSlots.per_model` at a time per callee. Each call's count and bytes are counted per callee
(`lipsync_bls_*` metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from latentsync_core.denoise import DenoiseSpec, WindowConditioning
from latentsync_core.face.restore import Window
from latentsync_core.pipeline import Detections
from latentsync_core.vae import Posterior

from .backend import from_torch, owned_tensor
from .metrics import Metrics
from .serve import INTERNAL_KEY_PARAMETER

# Bytes of frame data per call to the face detector or the restorer, at most (call_spans): one 1080p frame.
FRAME_CALL_BYTES = 10 << 20

TRAFFIC = {
    "lipsync_bls_requests": "BLS requests sent, by callee",
    "lipsync_bls_input_bytes": "Bytes of the tensors sent to each callee",
    "lipsync_bls_output_bytes": "Bytes of the tensors received from each callee",
}


class ModelCallError(RuntimeError):
    """A BLS call that a composing model answered with an error."""


@dataclass(frozen=True)
class ModelNames:
    """Names of the composing models (they can be renamed in the exported repository)."""

    face_detector: str = "face_detector"
    audio_encoder: str = "audio_encoder"
    denoiser: str = "denoiser_1.5"
    vae_encoder: str = "vae_encoder"
    vae_decoder: str = "vae_decoder"
    restorer: str = "restorer"
    enhancer: str = ""  # empty: the repository has no face enhancer


class CallSlots:
    """At most `per_model` calls in flight to each model, shared by every stream of a lipsync instance (0: no
    limit). A call's tensors are copied into the caller's and then the callee's Python-backend shared-memory pool
    and stay there until it returns, queueing included, and those pools never shrink: with one window per stream
    in every queue they would keep the frames of every stream at once (~100 MB per window at 1080p). A callee
    batches at most `per_model` windows (its max batch / 16 frames); calls beyond wait here, in no pool."""

    def __init__(self, per_model: int):
        self.per_model = per_model
        self._slots: dict[str, threading.Semaphore] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str):
        if self.per_model <= 0:
            return contextlib.nullcontext()
        with self._lock:
            return self._slots.setdefault(model, threading.Semaphore(self.per_model))


class TritonModels:
    """ModelBackend over BLS; one per stream (it names that stream's denoiser variant)."""

    def __init__(
        self,
        pb_utils,
        names: ModelNames,
        vae_scale: float,
        traffic: Metrics,
        device: torch.device,
        audio_max_batch: int = 8,
        track_faces: bool = False,
        slots: CallSlots | None = None,
        frame_call_bytes: int = FRAME_CALL_BYTES,
        internal_key: str = "",
        mask_image: Path | None = None,
    ):
        self.pb, self.names, self.vae_scale, self.traffic = pb_utils, names, float(vae_scale), traffic
        # every call carries the key the internal models ask for (serve.INTERNAL_KEY_ENV), if the server set one
        self.key_parameter = {INTERNAL_KEY_PARAMETER: internal_key} if internal_key else {}
        self.mask_image = mask_image  # upstream's mask.png in the lipsync model's folder, if the weights had it
        self.slots = slots or CallSlots(0)
        self.frame_call_bytes = frame_call_bytes
        self.device, self.audio_max_batch = device, audio_max_batch
        # With the detector's "track" policy the stream's last face box is its reference for the next window.
        self.last_box = np.full(4, np.nan, np.float32) if track_faces else None
        # Where callees answer: in the stream's device memory, except outputs the stream reads on the host
        # (detections, pasted regions, audio features): asked for in host memory, a GPU callee's copied there.
        memory = getattr(pb_utils, "PreferredMemory", None)
        kind = pb_utils.TRITONSERVER_MEMORY_GPU if device.type == "cuda" else pb_utils.TRITONSERVER_MEMORY_CPU
        self._memory = {} if memory is None else {"preferred_memory": memory(kind, device.index or 0)}
        self._host_memory = {} if memory is None else {"preferred_memory": memory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)}

    # ------------------------------------------------------------------------------------------ transport
    def call(
        self,
        model: str,
        inputs: dict[str, torch.Tensor | np.ndarray],
        outputs: list[str],
        parameters: dict | None = None,
        decoupled: bool = False,
        on_host: bool = False,
    ) -> list[torch.Tensor]:
        """The outputs of one request to `model`, in the stream's device memory (`on_host`: host memory)."""
        # The denoiser holds a window for all its steps and batches up to its max_windows: not limited here.
        with contextlib.nullcontext() if decoupled else self.slots(model):
            found = self._call(model, inputs, outputs, parameters, decoupled, on_host)
        self.traffic.add("lipsync_bls_requests", callee=model)
        self.traffic.add("lipsync_bls_input_bytes", sum(_nbytes(v) for v in inputs.values()), callee=model)
        self.traffic.add("lipsync_bls_output_bytes", sum(_nbytes(v) for v in found.values()), callee=model)
        return [found[name] for name in outputs]

    def _call(
        self,
        model: str,
        inputs: dict[str, torch.Tensor | np.ndarray],
        outputs: list[str],
        parameters: dict | None,
        decoupled: bool,
        on_host: bool = False,
    ) -> dict[str, torch.Tensor]:
        pb, parameters = self.pb, {**(parameters or {}), **self.key_parameter}
        tensors = [
            pb.Tensor(k, np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else from_torch(pb, k, v)
            for k, v in inputs.items()
        ]
        request = pb.InferenceRequest(
            model_name=model,
            requested_output_names=outputs,
            inputs=tensors,
            **({"parameters": parameters} if parameters else {}),
            **(self._host_memory if on_host else self._memory),
        )
        responses = request.exec(decoupled=True) if decoupled else [request.exec()]
        found: dict[str, torch.Tensor] = {}
        for response in responses:
            if response.has_error():
                raise ModelCallError(f"model '{model}' failed: {response.error().message()}")
            for name in outputs:
                tensor = pb.get_output_tensor_by_name(response, name)
                if tensor is not None:
                    found[name] = owned_tensor(tensor)  # outlives the response, whose buffer is released with it
        missing = [name for name in outputs if name not in found]
        if missing:
            raise ModelCallError(f"model '{model}' answered without {', '.join(missing)}")
        return found

    # ------------------------------------------------------------------------------------------ ModelBackend
    def detect(self, frames: np.ndarray) -> Detections:
        """Detections of a request's frames, in calls of at most `frame_call_bytes` (`call_spans`). With the
        "track" policy a request goes in one call: within a call the detector chains its own stage-1 boxes,
        across calls the reported box."""
        spans = call_spans(len(frames), frames[:1].nbytes, self.frame_call_bytes)
        if self.last_box is not None or len(spans) <= 1:
            return self._detect(frames)
        parts = [self._detect(frames[span]) for span in spans]
        return Detections(
            np.concatenate([d.points for d in parts]),
            np.concatenate([d.found for d in parts]),
            np.concatenate([d.boxes for d in parts]),
        )

    def _detect(self, frames: np.ndarray) -> Detections:
        inputs = {"FRAMES": frames}
        if self.last_box is not None:
            inputs["REFERENCE_BOX"] = np.repeat(self.last_box[None], len(frames), axis=0)  # row 0 is used
        box, points, found = self.call(self.names.face_detector, inputs, ["BOX", "POINTS", "FOUND"], on_host=True)
        found = found.reshape(len(frames)).numpy().astype(bool)
        if self.last_box is not None and found.any():
            self.last_box = box[np.flatnonzero(found)[-1]].numpy().astype(np.float32)
        return Detections(points.numpy().astype(np.float32), found, box.numpy().astype(np.float32))

    def encode_audio(self, mel_segments: torch.Tensor) -> torch.Tensor:
        mel = mel_segments.float()
        return torch.cat(
            [
                self.call(
                    self.names.audio_encoder, {"MEL": mel[i : i + self.audio_max_batch]}, ["FEATURES"], on_host=True
                )[0]
                for i in range(0, len(mel), self.audio_max_batch)
            ]
        )

    def vae_posterior(self, faces: torch.Tensor, keep: torch.Tensor) -> Posterior:
        mean, std = self.call(self.names.vae_encoder, {"FACES": faces, "KEEP": keep}, ["MEAN", "STD"])
        return Posterior(mean.to(self.device), std.to(self.device), self.vae_scale)

    def denoise(self, latents: torch.Tensor, cond: WindowConditioning, spec: DenoiseSpec) -> torch.Tensor:
        inputs = {
            "LATENTS": latents[0],
            "MASK": cond.mask[0],
            "MASKED": cond.masked[0],
            "REFERENCE": cond.reference[0],
            "AUDIO": cond.audio,
        }
        # One JSON parameter: BLS parameters take bool/int/str only, and a float's repr round-trips exactly.
        params = {"spec": json.dumps(dataclasses.asdict(spec))}
        (out,) = self.call(self.names.denoiser, inputs, ["LATENTS"], params, decoupled=True)
        return out.to(self.device)[None]

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.call(self.names.vae_decoder, {"LATENTS": latents}, ["PIXELS"])[0].to(self.device)

    def enhance(self, faces: torch.Tensor) -> torch.Tensor:
        return self.call(self.names.enhancer, {"FACES": faces}, ["RESTORED"])[0].to(self.device)

    def paste_regions(
        self,
        regions: list[np.ndarray],
        faces: torch.Tensor,
        affines: np.ndarray,
        windows: list[Window],
        frame_hw: tuple[int, int],
    ) -> list[np.ndarray]:
        """Only each face's paste window of its frame travels (padded to the largest of a call), never whole
        frames; in calls of at most `frame_call_bytes` of regions and host-memory faces (`call_spans`: faces on a
        GPU travel in device memory, not through the shared-memory pools)."""
        face_bytes = _nbytes(faces[:1]) if faces.device.type == "cpu" else 0
        per_face = max((r.nbytes for r in regions), default=0) + face_bytes
        pasted = []
        for span in call_spans(len(regions), per_face, self.frame_call_bytes):
            padded, sizes = _pad_regions(regions[span])
            inputs = {
                "REGIONS": padded,
                "FACES": faces[span],
                "AFFINES": np.asarray(affines[span], np.float32),
                "WINDOWS": np.asarray(windows[span], np.int32),
                "FRAME_HW": np.tile(np.int32(frame_hw), (len(sizes), 1)),
            }
            restored = self.call(self.names.restorer, inputs, ["RESTORED"], on_host=True)[0].numpy()
            pasted += [restored[i, :h, :w] for i, (h, w) in enumerate(sizes)]
        return pasted


def _pad_regions(regions: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(h, w, 3) regions -> one zero-padded (n, max h, max w, 3) batch, and each region's (h, w)."""
    sizes = [r.shape[:2] for r in regions]
    padded = np.zeros((len(regions), max(h for h, _ in sizes), max(w for _, w in sizes), 3), np.uint8)
    for i, (region, (h, w)) in enumerate(zip(regions, sizes)):
        padded[i, :h, :w] = region
    return padded, sizes


def call_spans(n: int, item_bytes: int, limit: int) -> list[slice]:
    """n items (frames, or faces with their paste regions) in as few calls as keep each under `limit` bytes (at
    least one item per call), split evenly. A call's tensors sit in the caller's and the callee's shared-memory
    pools until it returns, and those pools never shrink: under the 16 MiB a pool starts with (serve.py
    PYTHON_SHM_BYTES), a call fits the callee's pool with its outputs, and does not grow with the client's request
    size or the window (16 1080p frames are 100 MB; 16 faces at 256 px with their regions ~18 MB)."""
    per_call = max(1, limit // max(1, item_bytes))
    calls = -(-n // per_call)  # an even split of n into this many calls puts at most per_call in each
    bounds = np.linspace(0, n, calls + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _nbytes(x: torch.Tensor | np.ndarray) -> int:
    return x.nbytes if isinstance(x, np.ndarray) else x.numel() * x.element_size()
