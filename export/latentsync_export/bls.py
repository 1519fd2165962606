"""`TritonModels`: the pipeline's ModelBackend as BLS calls from the `lipsync` model to the other Triton models.

The per-stream numerics (alignment, masks, posterior sampling with the stream's generator, the DDIM + CFG loop,
compositing) stay in latentsync_core.pipeline.LipSyncStream; only the model calls cross the process boundary, as
float32 tensors, so a Triton stream computes exactly what LocalModels computes in-process. Every call blocks
its stream's thread only; the calls of concurrent streams meet in the callee's dynamic batcher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from latentsync_core.pipeline import Detections
from latentsync_core.vae import Posterior


class ModelCallError(RuntimeError):
    """A BLS call that a composing model answered with an error."""


@dataclass(frozen=True)
class ModelNames:
    """Names of the composing models (they can be renamed in the exported repository)."""

    face_detector: str = "face_detector"
    audio_encoder: str = "audio_encoder"
    unet: str = "unet_1.5"
    vae_encoder: str = "vae_encoder"
    vae_decoder: str = "vae_decoder"
    restorer: str = "restorer"


class TritonModels:
    """ModelBackend over BLS; one per stream (it names that stream's UNet variant)."""

    def __init__(self, pb_utils, names: ModelNames, vae_scale: float, audio_max_batch: int = 8,
                 track_faces: bool = False, unet_batcher: Callable | None = None):
        self.pb, self.names, self.vae_scale, self.audio_max_batch = pb_utils, names, float(vae_scale), audio_max_batch
        # With the detector's "track" policy the stream's last face box is its reference for the next window.
        self.last_box = np.full(4, np.nan, np.float32) if track_faces else None
        # Optional: a shared StepBatcher that merges the UNet steps of concurrent streams into one request.
        self.unet_batcher = unet_batcher
        # Ask GPU models (ONNX/TensorRT) for host outputs: this process works on the CPU.
        memory = getattr(pb_utils, "PreferredMemory", None)
        self._cpu_outputs = {} if memory is None else {
            "preferred_memory": memory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)}

    # ------------------------------------------------------------------------------------------ transport
    def call(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        pb = self.pb
        request = pb.InferenceRequest(
            model_name=model, requested_output_names=outputs,
            inputs=[pb.Tensor(name, np.ascontiguousarray(x)) for name, x in inputs.items()],
            **self._cpu_outputs)
        response = request.exec()
        if response.has_error():
            raise ModelCallError(f"model '{model}' failed: {response.error().message()}")
        return [_as_numpy(pb.get_output_tensor_by_name(response, name)) for name in outputs]

    # ------------------------------------------------------------------------------------------ ModelBackend
    def detect(self, frames: np.ndarray) -> Detections:
        inputs = {"FRAMES": frames}
        if self.last_box is not None:
            inputs["REFERENCE_BOX"] = np.repeat(self.last_box[None], len(frames), axis=0)  # row 0 is used
        box, points, found = self.call(self.names.face_detector, inputs, ["BOX", "POINTS", "FOUND"])
        found = found.reshape(len(frames)).astype(bool)
        if self.last_box is not None and found.any():
            self.last_box = box[np.flatnonzero(found)[-1]].astype(np.float32)
        return Detections(points.astype(np.float32), found)

    def encode_audio(self, mel_segments: torch.Tensor) -> torch.Tensor:
        mel = mel_segments.float().numpy()
        parts = [self.call(self.names.audio_encoder, {"MEL": mel[i:i + self.audio_max_batch]}, ["FEATURES"])[0]
                 for i in range(0, len(mel), self.audio_max_batch)]
        return torch.from_numpy(np.concatenate(parts))

    def vae_posterior(self, pixels: torch.Tensor) -> Posterior:
        mean, std = self.call(self.names.vae_encoder, {"PIXELS": _f32(pixels)}, ["MEAN", "STD"])
        return Posterior(torch.from_numpy(mean), torch.from_numpy(std), self.vae_scale)

    def unet(self, sample: torch.Tensor, timesteps: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        inputs = {"SAMPLE": _f32(sample), "TIMESTEP": timesteps.to(torch.int64).numpy().reshape(-1, 1),
                  "AUDIO": _f32(audio)}
        if self.unet_batcher is not None:
            return torch.from_numpy(self.unet_batcher(inputs)[0])
        return torch.from_numpy(self.call(self.names.unet, inputs, ["NOISE_PRED"])[0])

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.call(self.names.vae_decoder, {"LATENTS": _f32(latents)}, ["PIXELS"])[0])

    def paste_back(self, frames: np.ndarray, faces: torch.Tensor, affines: np.ndarray) -> np.ndarray:
        inputs = {"FRAMES": frames, "FACES": _f32(faces), "AFFINES": np.asarray(affines, np.float32)}
        return self.call(self.names.restorer, inputs, ["RESTORED"])[0]


def _f32(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(torch.float32).cpu().contiguous().numpy()


def _as_numpy(tensor) -> np.ndarray:
    """A BLS output as an owned CPU array (GPU outputs of ONNX/TensorRT models come through DLPack)."""
    if tensor.is_cpu():
        return np.array(tensor.as_numpy(), copy=True)
    return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()
