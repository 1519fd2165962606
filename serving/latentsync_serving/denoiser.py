"""The `denoiser_<variant>` model: each window's whole denoising loop, the steps of all windows batched.

A request is one window: its initial latents and conditioning (mask, masked-face and reference latents,
audio chunks) and the stream's denoising parameters. The window's conditioning crosses into this process once;
every step then runs here, on the model's device, with nothing crossing a process boundary: classifier-free
guidance's zero-audio branch, the UNet, guidance and the sampler update. One worker thread advances all
windows in flight together (iteration-level batching, as LLM servers batch tokens): a window that arrives
while others denoise joins them at the next step, so the UNet's batch is every active window of every stream,
whichever step each one is at. The decoupled response (the final latents) is sent when the window's last step
is done.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from latentsync_contract import VARIANTS
from latentsync_contract import WINDOW as WINDOW_FRAMES
from latentsync_core.configs import get_variant
from latentsync_core.denoise import DenoiseSpec, WindowConditioning, WindowJob, step
from latentsync_core.loaders import load_unet

from .backend import ModelContext, from_torch, owned_copy, to_torch
from .compiled_unet import CompiledUNet
from .metrics import Metrics, log
from .stand_ins import NullUNet

INPUTS = ("LATENTS", "MASK", "MASKED", "REFERENCE", "AUDIO")  # (c, f, h, w) each; AUDIO (f, 50, 384)


def check_window(inputs: Mapping[str, torch.Tensor], latent_size: int | None) -> None:
    """Refuse a window whose tensors would not batch with the others (the whole step, every stream's windows in it,
    would fail): (4, f, L, L) latents, masked and reference latents, a (1, f, L, L) mask and (f, 50, 384) audio
    features, L the model's latent size, 1 <= f <= 16 frames."""
    frames = inputs["LATENTS"].shape[1] if inputs["LATENTS"].dim() == 4 else 0
    latent_size = latent_size or inputs["LATENTS"].shape[-1]  # None: a model that does not know its own
    expected = {
        "LATENTS": (4, frames, latent_size, latent_size),
        "MASK": (1, frames, latent_size, latent_size),
        "MASKED": (4, frames, latent_size, latent_size),
        "REFERENCE": (4, frames, latent_size, latent_size),
        "AUDIO": (frames, *inputs["AUDIO"].shape[1:]),
    }
    wrong = [f"{name} {tuple(inputs[name].shape)}" for name, shape in expected.items() if inputs[name].shape != shape]
    if wrong or not 1 <= frames <= WINDOW_FRAMES or inputs["AUDIO"].dim() != 3:
        raise ValueError(
            f"a window is 1..{WINDOW_FRAMES} frames of (4, f, {latent_size}, {latent_size}) latents, a (1, f, ...) "
            f"mask and (f, ...) audio features; got {', '.join(wrong) or f'{frames} frames'}"
        )


@dataclass(eq=False)
class _Window:
    job: WindowJob
    sender: Any
    arrived: float


class DenoiserService:
    def __init__(
        self,
        pb_utils,
        unet,
        device: torch.device,
        dtype: torch.dtype,
        max_windows: int,
        model: str = "denoiser",
        latent_size: int | None = 32,  # None: unknown (windows are checked against each other only)
        gate: ModelContext | None = None,
        instance: str = "",
    ):
        self.pb, self.unet, self.device, self.dtype, self.gate = pb_utils, unet, device, dtype, gate
        # gauges carry the instance: instances (one per GPU) would otherwise set one shared series, last one wins
        self.gauge_labels = {"instance": instance} if instance else {}
        self.max_windows, self.latent_size, self.model = max_windows, latent_size, model
        self.ready, self.startup_error = threading.Event(), None
        self.metrics = Metrics(
            pb_utils,
            model,
            counters={
                "denoiser_steps": "Iterations of the denoising loop (each advances every active window by one step)",
                "denoiser_window_steps": "Window-steps done (mean windows per iteration = this / denoiser_steps)",
                "denoiser_unet_forwards": "UNet forwards (windows of different frame counts need their own)",
                "denoiser_windows": "Windows denoised to their last step",
            },
            gauges={
                "denoiser_active_windows": "Windows being denoised now",
                # its own backlog: Triton's queue metrics do not see it (the model takes every request at once)
                "denoiser_waiting_windows": "Windows waiting for a place among the max_windows being denoised",
            },
        )
        self._pending: deque[_Window] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"{model}-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_args(cls, args: Mapping[str, str], pb_utils) -> DenoiserService:
        ctx = ModelContext.from_args(args, tf32=True)
        dtype = ctx.dtype()
        if ctx.stand_in:
            unet = NullUNet()
        else:
            config = json.loads(ctx.params.get("unet_config") or "null")  # null -> stage2.yaml
            unet = load_unet(ctx.path("checkpoint"), config, device=ctx.device, dtype=dtype)
            if ctx.device.type == "cuda":  # cuDNN's NHWC kernels: the layout the prepared GPU run measured
                unet = unet.to(memory_format=torch.channels_last)
        max_windows, mode = int(ctx.params.get("max_windows") or 16), ctx.params.get("compile_unet", "").strip()
        if mode and not ctx.stand_in:
            unet = CompiledUNet(unet, mode, 2 * max_windows)
        log(pb_utils, "info", f"{ctx.name}: UNet on {ctx.device} in {dtype}{f', compiled ({mode})' if mode else ''}")
        # repositories built before the parameter: the variant in the model's name (denoiser_<variant>)
        variant = ctx.name.removeprefix("denoiser_")
        latent_size = int(
            ctx.params.get("latent_size") or (get_variant(variant).latent_size if variant in VARIANTS else 0)
        )
        instance = args.get("model_instance_name", "")
        service = cls(pb_utils, unet, ctx.device, dtype, max_windows, ctx.name, latent_size or None, ctx, instance)
        service.ready.wait()  # the model is ready once its loop thread compiled the UNet
        if service.startup_error is not None:
            raise RuntimeError(f"{ctx.name}: compiling the UNet failed: {service.startup_error}")
        return service

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, request) -> None:
        """Parse one window (on the model's device) and queue it; errors are answered at once."""
        sender = request.get_response_sender()
        try:
            if self.gate is not None and not self.gate.admits(request):
                error = self.gate.refusal(self.pb)
            else:
                job, error = self._job(request), None
        except Exception as e:  # noqa: BLE001 - the caller (lipsync) names this model in its error
            error = self.pb.TritonError(f"{type(e).__name__}: {e}")
        if error is not None:
            sender.send(self.pb.InferenceResponse(error=error), flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        with self._cond:
            self._pending.append(_Window(job, sender, time.monotonic()))
            self._cond.notify()

    def _job(self, request) -> WindowJob:
        # Copies: the window outlives the request's own buffers (a decoupled model answers later). Made on the model's
        # device off the current stream, where the loop thread's UNet steps are queued: a host input (a `lipsync` on
        # the CPU) uploaded there would wait for the step in flight before the window could even queue.
        # (Host inputs are the stub's own arrays, which owned_tensor would keep without a copy; measured, that made
        # this model's CPU per frame 2 -> 13 ms in the stand-in bench, for reasons not found; these are small.)
        inputs = {name: to_torch(self.pb.get_input_tensor_by_name(request, name)) for name in INPUTS}
        check_window(inputs, self.latent_size)  # before any copy: a window that does not fit fails alone
        t = {name: owned_copy(tensor, self.device) for name, tensor in inputs.items()}
        spec = DenoiseSpec(**json.loads(json.loads(request.parameters() or "{}").get("spec", "{}")))
        dt = self.dtype
        cond = WindowConditioning(
            mask=t["MASK"][None].to(dt),
            masked=t["MASKED"][None].to(dt),
            reference=t["REFERENCE"][None].to(dt),
            audio=t["AUDIO"].to(dt),
        )
        return spec.job(t["LATENTS"][None].float(), cond)

    # ------------------------------------------------------------------------------------------ the loop
    def _warm_up(self) -> None:
        try:
            if isinstance(self.unet, CompiledUNet):
                log_info = lambda text: log(self.pb, "info", f"{self.model}: {text}")  # noqa: E731
                self.unet.warm_up(self.latent_size or 32, self.device, self.dtype, log_info)
        except Exception as e:  # noqa: BLE001 - reported by from_args: the model does not load
            self.startup_error = f"{type(e).__name__}: {e}"
            self._stop = True
        finally:
            self.ready.set()

    def _run(self) -> None:
        if self.device.type == "cuda":  # the current device is per thread: this one launches the steps
            torch.cuda.set_device(self.device)
        self._warm_up()  # on this thread: the one that calls the UNet
        active: list[_Window] = []
        self._set_gauges(active)  # the series exist (at 0) before the first window: the autoscaler reads them
        while True:
            with self._cond:
                while not self._stop and not active and not self._pending:
                    self._cond.wait()
                if self._stop:
                    break
                while self._pending and len(active) < self.max_windows:
                    active.append(self._pending.popleft())
            try:
                with torch.no_grad():
                    forwards = step(self.unet, [w.job for w in active])
            except Exception as e:  # noqa: BLE001 - every window of the failed step is answered with the error
                for w in active:
                    self._answer(w, error=f"{type(e).__name__}: {e}")
                active = []
                self._set_gauges(active)
                continue
            self.metrics.add("denoiser_steps")
            self.metrics.add("denoiser_window_steps", len(active))
            self.metrics.add("denoiser_unet_forwards", forwards)
            finished = [w for w in active if w.job.done]
            for w in finished:
                self._answer(w)
            active = [w for w in active if not w.job.done]
            self._set_gauges(active)
        for w in [*active, *self._pending]:
            self._answer(w, error="the denoiser is shutting down")

    def _set_gauges(self, active: list[_Window]) -> None:
        self.metrics.set("denoiser_active_windows", len(active), **self.gauge_labels)
        self.metrics.set("denoiser_waiting_windows", len(self._pending), **self.gauge_labels)

    def _answer(self, w: _Window, error: str | None = None) -> None:
        pb = self.pb
        if error is None:
            self.metrics.add("denoiser_windows")
            response = pb.InferenceResponse(output_tensors=[from_torch(pb, "LATENTS", w.job.latents[0])])
        else:
            response = pb.InferenceResponse(error=pb.TritonError(error))
        w.sender.send(response, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
