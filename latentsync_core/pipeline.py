"""The in-process reference pipeline, and the per-stream logic the Triton orchestrator reuses.

`LipSyncStream` holds what upstream keeps per call (alignment smoothing, the one initial noise, the RNG, the
audio chunks) and turns one window of frames (<= 16) into synced frames. `WindowedStream` cuts a stream's
frames, however they arrive, into those windows and applies the stream-level rules. Both reach the models only
through a `ModelBackend`; `LocalModels` implements it with torch modules in this process (the oracle), and the
`lipsync` Triton model implements it with BLS calls to the other Triton models. The numerics are shared.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from latentsync_contract import ContractError, apply_regions, check_stream_frames, no_face_message

from . import audio as audio_features
from .configs import DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS, NUM_FRAMES, Variant, get_variant
from .denoise import DenoiseSpec, WindowConditioning, frames_to_batch, initial_noise, mask_latents, step
from .face.align import FaceAligner, box_hw
from .face.enhance import EnhanceSpec, enhance_mouths
from .face.mask import channels_first, fixed_mask, keep_levels, normalized_faces
from .face.pose import too_turned
from .face.restore import Window, paste_faces, paste_window
from .vae import Posterior, sample_latents


@dataclass
class Detections:
    points: np.ndarray  # (n, 3, 2) float32: left eyebrow, right eyebrow, nose centre (upstream's 3 points)
    found: np.ndarray  # (n,) bool
    boxes: np.ndarray | None = None  # (n, 4) float32 x0, y0, x1, y1


class ModelBackend(Protocol):
    """The model calls of the pipeline; each is batchable across frames/windows/streams. `mask_image`: upstream's
    mask.png where the weights have one (face.mask.fixed_mask), else None."""

    mask_image: Path | None

    def detect(self, frames: np.ndarray) -> Detections: ...
    def encode_audio(self, mel_segments: torch.Tensor) -> torch.Tensor: ...  # (s,80,3000) -> (s,1500,L+1,C)
    # uint8 faces (n, 3, R, R) and keep levels (n, 1, R, R) -> posterior of face.mask.encoder_pixels
    def vae_posterior(self, faces: torch.Tensor, keep: torch.Tensor) -> Posterior: ...
    def denoise(self, latents: torch.Tensor, cond: WindowConditioning, spec: DenoiseSpec) -> torch.Tensor: ...
    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor: ...
    def enhance(self, faces: torch.Tensor) -> torch.Tensor: ...  # the face restorer at its native size and back
    def paste_regions(
        self,
        regions: list[np.ndarray],
        faces: torch.Tensor,
        affines: np.ndarray,
        windows: list[Window],
        frame_hw: tuple[int, int],
    ) -> list[np.ndarray]: ...  # paste_faces


@dataclass
class WindowResult:
    """A window's synced frames as what changed in them: each frame's paste region and its new pixels (a server
    keeps no whole frame past its request; the client pastes the regions into the frames it sent)."""

    indices: np.ndarray  # (n,) int64 frame index in the stream
    face_found: np.ndarray  # (n,) bool: synced; False = passed through (no face, or one turned past max_yaw)
    boxes: np.ndarray  # (n, 4) int32 (y0, y1, x0, x1) of each frame's region; empty where nothing changed
    regions: list[np.ndarray]  # n (y1 - y0, x1 - x0, 3) uint8 arrays: the new pixels there
    turned: int = 0  # frames passed through because their face was turned past max_yaw
    frames: np.ndarray | None = None  # (n, H, W, 3) uint8 whole synced frames, where the caller kept the inputs

    def packed_regions(self) -> np.ndarray:
        """The REGIONS response tensor: every region's bytes, in frame order."""
        parts = [r.reshape(-1) for r in self.regions if r.size]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """Paste the regions into `frames` (the window's input frames, (n, H, W, 3)) IN PLACE; sets and returns
        `self.frames`."""
        apply_regions(frames, self.boxes, self.packed_regions())
        self.frames = frames
        return frames


@dataclass
class AlignedFrame:
    """One frame after the stream-ordered, per-frame phase (LipSyncStream.ingest): no whole frame is kept."""

    index: int  # in the stream
    frame_hw: tuple[int, int]
    points: np.ndarray  # (3, 2) float32 detected alignment points (zeros without a face)
    box: np.ndarray | None  # (4,) float32 detected face box, if the detector gives one
    detected: bool  # a face was found
    turned: bool  # ... but turned past max_yaw: passed through
    face: np.ndarray | None = None  # (R, R, 3) uint8 aligned face; None: the frame passes through
    affine: np.ndarray | None = None  # (2, 3) float32 frame -> crop
    paste_box: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(4, np.int32))  # y0, y1, x0, x1
    region: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0, 3), np.uint8))  # its pixels


@dataclass
class PreparedWindow:
    """A window after the stream-ordered phase (detection, alignment, VAE encoding, the stream's RNG draws). It
    holds no whole frame: only each synced frame's paste region (paste_window), all that paste-back reads."""

    frame_hw: tuple[int, int]
    regions: list[np.ndarray]  # n (h, w, 3) uint8 copies of the frames' paste regions ((0, 0, 3): no face)
    boxes: np.ndarray  # (n, 4) int32 (y0, y1, x0, x1) of those regions
    indices: np.ndarray  # (n,) int64
    detections: Detections
    found: np.ndarray  # (n,) bool: the frames that are synced
    affines: np.ndarray  # (k, 2, 3) of the k frames with a face
    reference: torch.Tensor | None  # (k, 3, R, R) aligned faces in [-1, 1] (compositing)
    masks: torch.Tensor | None  # (k, 1, R, R) mouth masks, 1 = keep the reference pixel
    latents: torch.Tensor | None  # (1, 4, k, h, w) initial noisy latents
    cond: WindowConditioning | None
    turned: int = 0  # faces found but turned past max_yaw (passed through)
    synced: torch.Tensor | None = None  # (k, 3, R, R) the generated faces that were pasted back (after finish)


class LipSyncStream:
    """One video stream: call `set_audio` once, then `process` windows of frames in order.

    `process` = `prepare` (stream order: alignment smoothing and the seeded RNG), `denoise` and `finish`
    (decode, composite, paste back). A server may prepare the next window while the current one denoises:
    as long as `prepare` runs in window order the results are the same.
    """

    def __init__(
        self,
        backend: ModelBackend,
        variant: str | Variant = "1.5",
        steps: int = DEFAULT_STEPS,
        guidance: float = DEFAULT_GUIDANCE,
        seed: int = DEFAULT_SEED,
        mask: np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        sampler: str = "ddim",
        deepcache: int = 0,
        enhance: EnhanceSpec | None = None,
        max_yaw: float = 0.0,
    ):
        self.backend = backend
        self.variant = variant if isinstance(variant, Variant) else get_variant(variant)
        self.spec = DenoiseSpec(int(steps), float(guidance), sampler, int(deepcache))
        self.enhance, self.max_yaw = enhance, float(max_yaw)
        self.dtype, self.device = dtype, torch.device(device)
        self.aligner = FaceAligner(self.variant.resolution)
        self.mask = fixed_mask(self.variant.resolution, backend.mask_image) if mask is None else mask
        self.keep = keep_levels(self.mask).to(self.device)[None, None]  # (1, 1, R, R) as the encoder receives it
        self.generator = torch.Generator().manual_seed(int(seed))
        self.latent_hw = (self.variant.latent_size, self.variant.latent_size)
        # Drawn first, as upstream's prepare_latents runs before any VAE posterior sample.
        self.noise = initial_noise(self.generator, self.latent_hw).to(self.device)
        self.chunks: torch.Tensor | None = None
        self.next_index = 0

    @property
    def num_frames(self) -> int:
        return 0 if self.chunks is None else len(self.chunks)

    def set_audio(self, samples: np.ndarray) -> int:
        """Whole 16 kHz track -> per-frame whisper chunks; returns the number of output frames (upstream's count)."""
        mel = audio_features.log_mel_spectrogram(samples)
        features = audio_features.encode_features(self.backend.encode_audio, mel)
        self.chunks = torch.as_tensor(audio_features.feature_chunks(features))
        return self.num_frames

    def process(self, frames: np.ndarray) -> WindowResult:
        """Synced frames for the next window (n <= 16 frames, RGB uint8); the result's `frames` are new arrays.
        Frames without a face pass through."""
        window = self.prepare(frames)
        return self.finish(window, self.denoise(window)).apply(np.array(frames, copy=True))

    def prepare(self, frames: np.ndarray) -> PreparedWindow:
        """Detect and align the faces of the next window and build its conditioning (in window order). The
        window keeps copies of the paste regions only: `frames` may be dropped (or reused) once this returns."""
        return self.prepare_window(self.ingest(frames))

    def ingest(self, frames: np.ndarray) -> list[AlignedFrame]:
        """The next frames of the stream (any number, in order) -> what their window will need of each: detection,
        alignment (the stream's smoothing runs in frame order) and a copy of the paste region. Nothing refers to
        `frames` afterwards, so a server holds whole frames only while they are ingested."""
        if self.chunks is None:
            raise RuntimeError("set_audio() must be called before process()")
        n = len(frames)
        if not n:
            return []
        if self.next_index + n > self.num_frames:
            raise ValueError(f"frame {self.next_index + n - 1} is past the audio's {self.num_frames} frames")
        det = self.backend.detect(frames)
        detected = det.found.astype(bool)
        turned = too_turned(det.points, self.max_yaw) & detected if self.max_yaw else np.zeros_like(detected)
        synced = detected & ~turned  # a frontal template does not fit a face turned that far: pass it through
        frame_hw, box = tuple(frames.shape[1:3]), box_hw(self.variant.resolution)
        records = []
        for i in range(n):
            record = AlignedFrame(
                self.next_index + i,
                frame_hw,
                det.points[i],
                None if det.boxes is None else det.boxes[i],
                bool(detected[i]),
                bool(turned[i]),
            )
            if synced[i]:
                aligned = self.aligner.align(frames[i], det.points[i])
                y0, y1, x0, x1 = record.paste_box = paste_window(aligned.affine, box, frame_hw)
                record.face, record.affine, record.region = aligned.face, aligned.affine, frames[i, y0:y1, x0:x1].copy()
            records.append(record)
        self.next_index += n
        return records

    def prepare_window(self, records: list[AlignedFrame]) -> PreparedWindow:
        """A window of ingested frames (1..16, in order) -> its conditioning: masks, one VAE encoder call, the
        stream's RNG draws (in window order)."""
        n = len(records)
        if not 0 < n <= NUM_FRAMES:
            raise ValueError(f"a window holds 1..{NUM_FRAMES} frames, got {n}")
        found = np.array([r.face is not None for r in records])
        boxes = [r.box for r in records]
        detections = Detections(
            np.stack([r.points for r in records]).astype(np.float32),
            np.array([r.detected for r in records]),
            None if any(b is None for b in boxes) else np.stack(boxes).astype(np.float32),
        )
        window = PreparedWindow(
            records[0].frame_hw,
            [r.region for r in records],
            np.stack([r.paste_box for r in records]).astype(np.int32),
            np.array([r.index for r in records], np.int64),
            detections,
            found,
            np.zeros((0, 2, 3), np.float32),
            None,
            None,
            None,
            None,
            turned=sum(r.turned for r in records),
        )
        rows = np.flatnonzero(found)
        if not len(rows):
            return window
        indices = window.indices
        faces = torch.from_numpy(np.stack([records[i].face for i in rows])).to(self.device)
        window.affines = np.stack([records[i].affine for i in rows])
        dt, k, faces = self.dtype, len(rows), channels_first(faces)
        # The paste blends with these (the masked pixels exist only inside the encoder); keep / 255 is the float
        # mask bit for bit (keep_levels refuses any other mask).
        ref = normalized_faces(faces)
        masks = (self.keep.float() / 255.0).expand(k, -1, -1, -1).contiguous()
        # One encoder call for both, in uint8 (the encoder masks and normalises): the masked faces, then the
        # reference faces (keep 255 everywhere). The stream's generator draws the masked sample first, as upstream.
        both = faces.repeat(2, 1, 1, 1)
        keep = torch.cat([self.keep.expand(k, -1, -1, -1), torch.full_like(self.keep, 255).expand(k, -1, -1, -1)])
        post = self.backend.vae_posterior(both, keep)
        post_masked = Posterior(post.mean[:k], post.std[:k], post.scale)
        post_ref = Posterior(post.mean[k:], post.std[k:], post.scale)
        window.cond = WindowConditioning(
            mask=mask_latents(masks, self.latent_hw).to(dt),
            masked=frames_to_batch(sample_latents(post_masked, self.generator)),
            reference=frames_to_batch(sample_latents(post_ref, self.generator)),
            audio=self.chunks[indices[rows]].to(self.device, dt),
        )
        window.latents = self.noise.repeat(1, 1, k, 1, 1)  # float32: the sampler's precision
        window.reference, window.masks = ref, masks
        return window

    def denoise(self, window: PreparedWindow) -> torch.Tensor | None:
        """The window's final latents (None without faces); the only step a server may overlap."""
        return None if window.cond is None else self.backend.denoise(window.latents, window.cond, self.spec)

    def finish(self, window: PreparedWindow, latents: torch.Tensor | None) -> WindowResult:
        """Decode, keep only the mouth region from the diffusion output, paste the faces into their regions."""
        regions = list(window.regions)
        if latents is not None:
            # on the stream's device, where its masks and reference faces are (LocalModels answers on the host)
            decoded = self.backend.vae_decode(latents[0].transpose(0, 1)).to(self.device)
            # mask 1 = keep the original pixels; only the masked mouth region comes from the diffusion output
            masks = window.masks.to(decoded.dtype)
            # decoded * (1 - masks) + reference * masks, in decoded's own memory (a fresh copy): a window's
            # whole-tensor temporaries cost more than the arithmetic on a CPU (17 -> 12 ms at 256 px)
            synced = decoded.mul_(1 - masks).add_(window.reference.to(decoded.dtype) * masks)
            if self.enhance is not None:
                e = self.enhance
                synced = enhance_mouths(self.backend.enhance, synced, self.mask, e.blend, e.feather, e.min_sharpness)
            rows = np.flatnonzero(window.found)
            boxes = [tuple(int(v) for v in window.boxes[r]) for r in rows]
            pasted = self.backend.paste_regions(
                [regions[r] for r in rows], synced, window.affines, boxes, window.frame_hw
            )
            for r, region in zip(rows, pasted):
                regions[r] = region
            window.synced = synced
        return WindowResult(window.indices, window.found, window.boxes, regions, window.turned)


class LocalModels:
    """ModelBackend with every model in this process (the reference the Triton deployment must match)."""

    def __init__(self, unet, whisper, codec, detector=None, device: str = "cpu", enhancer=None, mask_image=None):
        self.unet_model, self.whisper, self.codec, self.detector = unet, whisper, codec, detector
        self.enhancer, self.device, self.mask_image = enhancer, torch.device(device), mask_image

    def detect(self, frames):
        if self.detector is None:
            raise RuntimeError("no face detector configured")
        res = self.detector.detect(frames)
        return Detections(res.points.astype(np.float32), res.found.astype(bool), res.boxes.astype(np.float32))

    @torch.no_grad()
    def encode_audio(self, mel_segments):
        return self.whisper(mel_segments.to(self.device, self._dtype(self.whisper))).float().cpu()

    @torch.no_grad()
    def vae_posterior(self, faces, keep):
        # encode_faces computes on contiguous pixels, as a server does: oneDNN's result depends on the memory
        # layout (~1e-3 on a VAE posterior), and the Triton deployment must reproduce this oracle exactly.
        post = self.codec.encode_faces(faces.to(self.device), keep.to(self.device))
        # float32, as a served encoder answers: the stream's noise is then drawn the same way at any precision
        return Posterior(post.mean.float(), post.std.float(), post.scale)

    @torch.no_grad()
    def denoise(self, latents, cond, spec):
        job = spec.job(latents.to(self.device), cond.to(self.device, self._dtype(self.unet_model)))
        while not job.done:
            step(self.unet_model, [job])
        return job.latents

    @torch.no_grad()
    def vae_decode(self, latents):
        return self.codec.decode(latents.to(self.device, self.codec.dtype).contiguous()).float().cpu()

    @torch.no_grad()
    def enhance(self, faces):
        if self.enhancer is None:
            raise RuntimeError("no face enhancer configured")
        return self.enhancer(faces.to(self.device))

    def paste_regions(self, regions, faces, affines, windows, frame_hw):
        return paste_faces(regions, faces, affines, windows, frame_hw)

    @staticmethod
    def _dtype(module) -> torch.dtype:
        return next(module.parameters()).dtype


class NoFaceInStream(ContractError):
    """No frame of a whole stream had a face: nothing was synced."""


class WindowedStream:
    """A stream's frames, in any chunking, cut into windows of 16 in order, with the stream-level rules: one
    frame size, at most the audio's frame count, and (at `end`) at least one frame with a face.

    Frames are ingested as they are pushed (detection and alignment, LipSyncStream.ingest): no whole frame is
    kept past its `push`, only each synced face and its paste region. Results (regions, WindowResult) go to
    `deliver(result, tag)` in window order, with the `tag` of the `push` or `end` call that completed the window.
    With `overlap`, a window's denoising, decoding and paste-back run on a worker thread while the caller goes on
    with the next frames (ingestion and the window's VAE encoding, in order, so the results are the same); at
    most two windows are in flight, and a third waits for a slot. An error
    on the worker goes to `fail(error, tag)`, and no later window is computed; `after(fn)` runs fn once every
    earlier window is delivered or skipped (the server sends a request's final response that way).
    """

    DEPTH = 2

    def __init__(
        self,
        stream: LipSyncStream,
        deliver: Callable[[WindowResult, Any], None],
        fail: Callable[[BaseException, Any], None] | None = None,
        overlap: bool = False,
    ):
        self.stream, self.deliver, self.fail = stream, deliver, fail
        self.pending: list[AlignedFrame] = []  # ingested frames of the window being filled
        self.frame_shape: tuple | None = None
        self.received = self.done = self.with_face = self.turned = 0
        self.failed: BaseException | None = None  # set on the first error: later windows are skipped
        self.in_flight = 0  # windows scheduled and not yet delivered
        self._slots = threading.Semaphore(self.DEPTH) if overlap else None
        self._queue: queue.SimpleQueue | None = queue.SimpleQueue() if overlap else None
        self._worker = threading.Thread(target=self._work, name="lipsync-window", daemon=True) if overlap else None
        if self._worker is not None:
            self._worker.start()

    def push(self, frames: np.ndarray, tag: Any = None) -> int:
        """Add (n, H, W, 3) RGB frames: they are ingested at once (the caller may drop or reuse them when this
        returns), and every window they complete is prepared and scheduled; returns the number of those."""
        check_stream_frames(self.frame_shape, frames.shape, self.received, self.stream.num_frames)
        self.frame_shape = self.frame_shape or frames.shape[1:]
        self.received += len(frames)
        self.pending += self.stream.ingest(frames)
        scheduled = 0
        while len(self.pending) >= NUM_FRAMES:
            self._schedule_window(tag)
            scheduled += 1
        return scheduled

    def end(self, tag: Any = None) -> None:
        """The last, shorter window; then NoFaceInStream if no frame of the stream had a face."""
        if self.pending:
            self._schedule_window(tag)
        self._schedule(self._check_faces, tag)

    def after(self, fn: Callable[[], None]) -> None:
        """Run `fn` once every window scheduled so far was delivered or skipped (at once without overlap)."""
        self._schedule(fn, None, always=True)

    def close(self) -> None:
        """Stop the worker after what was scheduled (nothing more is delivered after an error)."""
        if self._queue is not None:
            self._queue.put(None)

    # ------------------------------------------------------------------------------------------ internals
    def _schedule_window(self, tag: Any) -> None:
        records, self.pending = self.pending[:NUM_FRAMES], self.pending[NUM_FRAMES:]
        if self._slots is not None:
            self._slots.acquire()  # released when a window in flight is delivered
        self.in_flight += 1
        try:
            prepared = self.stream.prepare_window(records)  # the caller's thread: stream order
        except BaseException:
            self._window_done()
            raise
        self._schedule(lambda: self._complete(prepared, tag), tag, release=True)

    def _complete(self, prepared: PreparedWindow, tag: Any) -> None:
        result = self.stream.finish(prepared, self.stream.denoise(prepared))
        self.done += len(result.indices)
        self.with_face += int(result.face_found.sum())
        self.turned += result.turned
        self.deliver(result, tag)

    def _window_done(self) -> None:
        self.in_flight -= 1
        if self._slots is not None:
            self._slots.release()

    def _check_faces(self) -> None:
        if self.done and not self.with_face:
            raise NoFaceInStream(no_face_message(self.done, self.turned))

    def _schedule(self, fn: Callable[[], None], tag: Any, always: bool = False, release: bool = False) -> None:
        item = (fn, tag, always, release)
        if self._queue is None:
            self._run(item)
            if self.failed is not None and not always:
                raise self.failed
        else:
            self._queue.put(item)

    def _run(self, item) -> None:
        fn, tag, always, release = item
        try:
            if always or self.failed is None:
                fn()
        except BaseException as e:  # noqa: BLE001 - handed to the stream's owner, which ends the stream
            self.failed = e
            if self.fail is not None and self._queue is not None:
                self.fail(e, tag)
        finally:
            if release:
                self._window_done()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self._run(item)


class LipSyncPipeline:
    """Video frames + 16 kHz audio in, synced frames out, window by window (bounded memory)."""

    def __init__(self, models: LocalModels, variant: str = "1.5"):
        self.models, self.variant = models, get_variant(variant)

    def stream(self, steps=DEFAULT_STEPS, guidance=DEFAULT_GUIDANCE, seed=DEFAULT_SEED, **kw) -> LipSyncStream:
        return LipSyncStream(self.models, self.variant, steps, guidance, seed, **kw)

    def __call__(self, frames: Iterable[np.ndarray], samples: np.ndarray, **params) -> Iterator[WindowResult]:
        """Windows with whole synced frames (`.frames`). Frames beyond the audio's frame count are dropped (the
        caller loops a short video, as upstream). Raises NoFaceInStream at the end if no frame had a face, as the
        server does."""
        stream = self.stream(**params)
        results: list[WindowResult] = []
        sent: dict[int, np.ndarray] = {}  # the input frames of windows not yet answered, as a client keeps them

        def deliver(result: WindowResult, _) -> None:
            result.apply(np.stack([sent.pop(int(i)) for i in result.indices]))
            results.append(result)

        windows = WindowedStream(stream, deliver)
        total = stream.set_audio(samples)
        batch: list[np.ndarray] = []  # pushed a window at a time: one detector call per window, as a server's
        for i, frame in enumerate(frames):
            if i >= total:
                break
            sent[i] = np.array(frame, copy=True)  # the caller may reuse its buffer
            batch.append(sent[i])
            if len(batch) == NUM_FRAMES:
                windows.push(np.stack(batch))
                batch.clear()
            yield from results
            results.clear()
        try:
            if batch:
                windows.push(np.stack(batch))
            windows.end()
        except NoFaceInStream:
            yield from results  # the frames first, then the stream's error, as the server sends them
            raise
        yield from results
