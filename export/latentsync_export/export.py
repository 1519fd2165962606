"""`latentsync-export`: build a ready Triton model repository from LatentSync weights.

    latentsync-export --out REPO --tiny                      # seeded random test weights, 1.5 and 1.6
    latentsync-export --out REPO --weights DIR               # official LatentSync-1.5 files (layout: loaders.py)
    latentsync-export --out REPO --weights 1.6=DIR16 --weights 1.5=DIR15 --target gpu
    latentsync-export --out REPO --tiny --stand-ins          # the networks replaced by near-zero-cost stand-ins

Targets:
  cpu  every model is a Python-backend model running latentsync_core in torch, float32, on the CPU (works on the
       pytriton server). Weights are referenced by absolute path, or copied into the models' version folders
       with --copy-weights (always for --tiny).
  gpu  the same Python models on the GPU (KIND_GPU): the denoiser and the VAE in bfloat16 (--dtype), the lipsync
       orchestrator on the GPU too, so the tensors of a window stay in device memory between the models
       (DLPack); the face detector stays on the CPU. With --tensorrt, the VAE encoder/decoder and the audio
       encoder become float16 ONNX graphs (float32 I/O) for the onnxruntime backend with TensorRT (engines built
       on the GPU at deploy time and cached), validated here against torch with onnxruntime on the CPU.

Sizing for a GPU (defaults of --target gpu, arithmetic in docs/PERFORMANCE.md "Sizing"): the denoiser advances
up to --max-windows windows per step (16: 32 UNet items under guidance, enough for about half of an H100/H200's
bf16 peak at 1.5), so at least that many streams must have a window in flight: --max-streams 24 per lipsync
instance keeps 16 denoising while the others are prepared or pasted back. On a card with less memory or
throughput, lower --max-windows (memory grows with it, the UNet's efficiency falls below ~8) and --max-streams
with it (about 1.5x --max-windows); use one server per GPU (docker/compose.per-gpu.yaml).

The repository: model_repository/ templates filled in (docs/REPOSITORY.md), one denoiser model per variant
(`denoiser_1.5`, `denoiser_1.6`; the audio encoder and VAE are shared), and `repository.json` describing it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from latentsync_core.configs import get_variant
from latentsync_core.face.enhance import FACE_ARCHS, load_face_enhancer
from latentsync_core.face.mask import load_fixed_mask
from latentsync_core.loaders import load_vae, load_whisper_encoder, locate
from latentsync_core.tiny import make_tiny_weights
from latentsync_serving.backend import DTYPES

from .manifest import MANIFEST
from .model_config import (
    InstanceSpec,
    parse_model_config,
    set_batching,
    set_parameters,
    templates_dir,
    use_onnxruntime,
    write_model_config,
)
from .onnx_export import (
    ExportError,
    audio_encoder_spec,
    export_and_validate,
    vae_decoder_spec,
    vae_encoder_spec,
)

VARIANT_ORDER = ("1.5", "1.6")
PER_FRAME_MODELS = ("face_detector", "vae_encoder", "vae_decoder", "restorer")  # batch = frames
NETWORKS = ("audio_encoder", "denoiser", "vae_encoder", "vae_decoder")  # stand-ins replace these
ONNX_MODELS = ("audio_encoder", "vae_encoder", "vae_decoder")  # --tensorrt converts these
HALF_MODELS = ("denoiser", "vae_encoder", "vae_decoder")  # --dtype applies to these
SHARED_MODELS = ("audio_encoder", "vae_encoder", "vae_decoder", "face_detector", "restorer", "lipsync")
MIN_FRAME_BATCH = 16  # one whole window per call


class ExportConfigError(ValueError):
    """Options or inputs that cannot give a working repository."""


@dataclass(frozen=True)
class TargetDefaults:
    """What a target serves with unless told otherwise (docs/PERFORMANCE.md "Sizing" for the gpu numbers)."""

    dtype: str
    max_windows: int
    max_streams: int
    frame_max_batch: int


TARGETS = {"cpu": TargetDefaults("float32", 8, 8, 16), "gpu": TargetDefaults("bfloat16", 16, 24, 64)}


# torch.compile's modes, for the denoiser's UNet (serving/latentsync_serving/compiled_unet.py)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class ExportOptions:
    out: Path
    target: str = "cpu"
    weights: dict[str, Path] = field(default_factory=dict)  # variant -> weights folder (first = shared models)
    tiny: bool = False
    variants: tuple[str, ...] = VARIANT_ORDER  # --tiny: which variants to make
    seed: int = 0
    copy_weights: bool = False
    detector: str = "mediapipe"
    detector_dir: Path | None = None
    face_policy: str = "largest"
    instances: dict[str, InstanceSpec] = field(default_factory=dict)  # template or model name -> spec
    dtype: str | None = None  # denoiser and VAE; None: the target's default
    max_windows: int | None = None  # windows the denoiser advances together
    compile_unet: str = ""  # torch.compile mode of the denoiser's UNet ("": eager), one of COMPILE_MODES
    max_streams: int | None = None  # streams per lipsync instance
    frame_max_batch: int | None = None  # per-frame models' batch
    max_queue_delay_us: int = 2000
    idle_timeout_s: float = 300.0  # longer than a client may wait for its windows (Triton counts only requests)
    overlap_windows: bool = True
    stand_ins: bool = False
    enhancer_weights: Path | None = None  # an official face restorer file: adds the `enhancer` model
    mask_image: Path | None = None  # upstream's mask.png; None: the weights folder's mask.png, if it has one
    tensorrt: bool = False
    fp16: bool = True
    trt_cache_dir: str = "/tmp/latentsync-trt-cache"
    force: bool = False

    def __post_init__(self):
        defaults = TARGETS.get(self.target, TARGETS["cpu"])
        for name in ("dtype", "max_windows", "max_streams", "frame_max_batch"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(defaults, name))

    def check(self) -> None:
        if self.target not in TARGETS:
            raise ExportConfigError(f"target must be cpu or gpu, got {self.target!r}")
        if self.tiny == bool(self.weights):
            raise ExportConfigError("give exactly one of --tiny and --weights")
        for v in (*self.weights, *self.variants):
            if v not in VARIANT_ORDER:
                raise ExportConfigError(f"unknown variant {v!r} in --weights; expected one of {VARIANT_ORDER}")
        if self.dtype not in DTYPES:
            raise ExportConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.target == "cpu" and self.dtype != "float32":
            raise ExportConfigError("--dtype: the cpu target computes in float32 (half precision is for GPUs)")
        if self.tensorrt and self.target != "gpu":
            raise ExportConfigError("--tensorrt needs --target gpu")
        if self.compile_unet not in ("", *COMPILE_MODES):
            raise ValueError(
                f"compile_unet must be one of {', '.join(COMPILE_MODES)} (or empty), not {self.compile_unet!r}"
            )
        if self.max_windows < 1:
            raise ExportConfigError("--max-windows must be >= 1")
        if self.frame_max_batch < MIN_FRAME_BATCH:
            raise ExportConfigError(f"--frame-max-batch must be >= {MIN_FRAME_BATCH} (one whole window)")
        if self.detector == "insightface" and self.detector_dir is None:
            raise ExportConfigError("--detector insightface needs --detector-dir (a buffalo_l / buffalo_s folder)")
        if self.mask_image is not None:
            if not Path(self.mask_image).is_file():
                raise ExportConfigError(
                    f"--mask {self.mask_image}: no such file (upstream's latentsync/utils/mask.png)"
                )
            try:  # read as a stream will: a bad image fails here, not at every stream's first frames
                load_fixed_mask(str(self.mask_image), 256)
            except ValueError as e:
                raise ExportConfigError(f"--mask: {e}") from None
        if self.face_policy not in ("largest", "track"):
            raise ExportConfigError(f"face policy must be largest or track, got {self.face_policy!r}")
        if self.max_streams < 1 or self.idle_timeout_s <= 0 or self.max_queue_delay_us < 0:
            raise ExportConfigError("--max-streams >= 1, --idle-timeout-s > 0 and --max-queue-delay-us >= 0")
        unknown = sorted(set(self.instances) - set(self.model_names()))
        if unknown:  # a typo would otherwise leave that model on the target's default placement, silently
            enhancer = " (enhancer: with --enhancer-weights)" if "enhancer" in unknown else ""
            raise ExportConfigError(
                f"--instances {', '.join(unknown)}: no such model in this repository; it has "
                f"{', '.join(self.model_names())}{enhancer}"
            )

    def model_names(self) -> list[str]:
        """What --instances may name: the models this repository will have, and `denoiser` for all denoisers."""
        variants = self.weights or self.variants
        optional = ["enhancer"] if self.enhancer_weights is not None else []
        return [*(f"denoiser_{v}" for v in variants), "denoiser", *SHARED_MODELS, *optional]

    def instance_spec(self, template: str, model: str) -> InstanceSpec:
        on_gpu = self.target == "gpu" and template != "face_detector"
        return self.instances.get(model) or self.instances.get(template) or InstanceSpec("gpu" if on_gpu else "cpu")

    def onnx(self, template: str) -> bool:
        return self.tensorrt and template in ONNX_MODELS and not self.stand_ins


# ---------------------------------------------------------------------------------------------------- build
def build_repository(opts: ExportOptions) -> dict:
    """Write the repository to opts.out (built beside it, then moved into place); returns the manifest."""
    opts.check()
    out = Path(opts.out).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / MANIFEST).is_file():
            raise ExportConfigError(f"{out} is not empty and not a repository built by latentsync-export")
        if not opts.force:
            raise ExportConfigError(f"{out} exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: rename works
    tiny_dir = Path(tempfile.mkdtemp(prefix="latentsync-tiny-")) if opts.tiny else None
    try:
        weights = _tiny_weights(tiny_dir, opts.seed, opts.variants) if opts.tiny else dict(opts.weights)
        paths = {v: locate(d) for v, d in weights.items()}
        manifest = _Builder(opts, staging, paths, copy=opts.copy_weights or opts.tiny).build()
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if tiny_dir is not None:
            shutil.rmtree(tiny_dir, ignore_errors=True)


def _tiny_weights(root: Path, seed: int, variants: Sequence[str]) -> dict[str, Path]:
    """Random tiny weights per variant (different seeds, so a variant mix-up shows in the output)."""
    return {v: make_tiny_weights(root / v, seed + VARIANT_ORDER.index(v)) for v in variants}


class _Builder:
    def __init__(self, opts: ExportOptions, root: Path, paths: dict, copy: bool):
        self.opts, self.root, self.paths, self.copy = opts, root, paths, copy
        self.variants = [v for v in paths]  # first = default and source of the shared models
        self.shared = paths[self.variants[0]]
        self.templates = templates_dir()
        self.manifest: dict = {
            "format": 1,
            "generator": "latentsync-export",
            "target": opts.target,
            "variants": self.variants,
            "random_weights": any(p.is_random for p in paths.values()),
            "models": {},
            "weights": {"unet": {}, "unet_config": {}},
            "onnx": {},
            "stand_ins": opts.stand_ins,
            "enhancer": None,
            "mask": None,  # upstream's mask.png in the repository (None: the drawn approximation, face/mask.py)
            "dtype": opts.dtype,
            "detector": {
                "kind": opts.detector,
                "policy": opts.face_policy,
                "model_dir": str(opts.detector_dir) if opts.detector_dir else None,
            },
        }

    def build(self) -> dict:
        self.codec = load_vae(self.shared.vae)
        self.resolutions = [get_variant(v).resolution for v in self.variants]
        for v in self.variants:
            self.denoiser(v)
        self.audio_encoder()
        self.vae("vae_encoder")
        self.vae("vae_decoder")
        self.face_detector()
        self.simple("restorer")
        if self.opts.enhancer_weights is not None:
            self.enhancer(Path(self.opts.enhancer_weights))
        self.lipsync()
        assert set(self.manifest["models"]) <= set(self.opts.model_names()), "ExportOptions.model_names is stale"
        return self.manifest

    # ------------------------------------------------------------------------------------------ helpers
    def start(self, template: str, model: str | None = None):
        """Copy a template folder (config + model.py for Python models) and return its parsed config."""
        model = model or template
        src = self.templates / template
        if not (src / "config.pbtxt").is_file():
            raise ExportConfigError(f"template {src}/config.pbtxt not found (a broken installation?)")
        (self.root / model / "1").mkdir(parents=True)
        config = parse_model_config(src / "config.pbtxt")
        config.name = model
        self.opts.instance_spec(template, model).apply(config)
        set_batching(config, max_queue_delay_us=self.opts.max_queue_delay_us)
        if template in PER_FRAME_MODELS:
            set_batching(config, max(config.max_batch_size, self.opts.frame_max_batch))
        return config

    def finish(self, template: str, model: str, config, python: bool) -> None:
        if python:
            for f in (self.templates / template / "1").glob("*.py"):
                shutil.copy2(f, self.root / model / "1" / f.name)
        backend = "python" if python else "onnxruntime"
        header = (
            f"Generated by latentsync-export (target {self.opts.target}) from model_repository/{template}/"
            "config.pbtxt;\nsee that template and docs/REPOSITORY.md for what every field means."
        )
        write_model_config(config, self.root / model / "config.pbtxt", header)
        self.manifest["models"][model] = {"template": template, "backend": backend}

    def weight(self, src: Path, model: str, name: str) -> str:
        """Copy (hard-link where possible) into the model's version folder, or reference by absolute path."""
        if not self.copy:
            return str(Path(src).resolve())
        dst = self.root / model / "1" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if Path(src).is_dir():
            shutil.copytree(src, dst, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)
        return name

    def record(self, value: str, model: str) -> str:
        """A weight path for the manifest: relative to the repository root when it was copied into it."""
        return value if Path(value).is_absolute() else f"{model}/1/{value}"

    def onnx(self, model: str, spec, profiles: dict[str, tuple[str, str, str]] | None, config) -> None:
        record = export_and_validate(spec, self.root / model / "1" / "model.onnx", fp16=self.opts.fp16)
        self.manifest["onnx"][model] = record
        trt = {
            "precision_mode": "FP16" if self.opts.fp16 else "FP32",
            "max_workspace_size_bytes": str(4 << 30),
            "trt_engine_cache_enable": "1",
            "trt_engine_cache_path": f"{self.opts.trt_cache_dir.rstrip('/')}/{model}",
        }
        if profiles:
            for i, kind in enumerate(("min", "opt", "max")):
                trt[f"trt_profile_{kind}_shapes"] = ",".join(f"{k}:{v[i]}" for k, v in profiles.items())
        use_onnxruntime(config, trt)

    # ------------------------------------------------------------------------------------------ models
    def networks(self, template: str, model: str, config) -> dict:
        """Parameters every network template shares: precision, and the stand-in switch."""
        values = {"stand_in": str(self.opts.stand_ins).lower()}
        if template in HALF_MODELS:
            values["dtype"] = self.opts.dtype
        return values

    def denoiser(self, variant: str) -> None:
        model, paths = f"denoiser_{variant}", self.paths[variant]
        config = self.start("denoiser", model)
        ckpt = self.weight(paths.unet, model, "latentsync_unet.pt")
        set_parameters(
            config,
            {
                "checkpoint": ckpt,
                "unet_config": json.dumps(paths.unet_config),
                "max_windows": self.opts.max_windows,
                "compile_unet": self.opts.compile_unet,
                "latent_size": get_variant(variant).latent_size,
                **self.networks("denoiser", model, config),
            },
        )
        self.manifest["weights"]["unet"][variant] = self.record(ckpt, model)
        self.manifest["weights"]["unet_config"][variant] = paths.unet_config
        self.finish("denoiser", model, config, python=True)

    def audio_encoder(self) -> None:
        config = self.start("audio_encoder")
        if self.opts.onnx("audio_encoder"):
            mb = config.max_batch_size
            self.onnx(
                "audio_encoder",
                audio_encoder_spec(load_whisper_encoder(self.shared.whisper)),
                {"MEL": ("1x80x3000", "1x80x3000", f"{mb}x80x3000")},
                config,
            )
            self.manifest["weights"]["whisper"] = None if self.opts.tiny else str(self.shared.whisper.resolve())
        else:
            ckpt = self.weight(self.shared.whisper, "audio_encoder", "whisper/tiny.pt")
            set_parameters(config, {"checkpoint": ckpt, **self.networks("audio_encoder", "audio_encoder", config)})
            self.manifest["weights"]["whisper"] = self.record(ckpt, "audio_encoder")
        self.finish("audio_encoder", "audio_encoder", config, python=not self.opts.onnx("audio_encoder"))

    def vae(self, model: str) -> None:
        config = self.start(model)
        if self.opts.onnx(model):
            mb, lo, hi = config.max_batch_size, min(self.resolutions), max(self.resolutions)
            # optimisation profiles at the served batch: one window's masked + reference faces, or its 16 latents
            if model == "vae_encoder":
                spec = vae_encoder_spec(self.codec, self.resolutions)
                profiles = {
                    name: (f"1x{c}x{lo}x{lo}", f"{2 * MIN_FRAME_BATCH}x{c}x{hi}x{hi}", f"{mb}x{c}x{hi}x{hi}")
                    for name, c in (("FACES", 3), ("KEEP", 1))
                }
            else:
                spec = vae_decoder_spec(self.codec, [r // 8 for r in self.resolutions])
                lo, hi = lo // 8, hi // 8
                profiles = {"LATENTS": (f"1x4x{lo}x{lo}", f"{MIN_FRAME_BATCH}x4x{hi}x{hi}", f"{mb}x4x{hi}x{hi}")}
            self.onnx(model, spec, profiles, config)
            self.manifest["weights"]["vae"] = None if self.opts.tiny else str(self.shared.vae.resolve())
        else:
            folder = self.weight(self.shared.vae, model, "vae")
            set_parameters(config, {"vae": folder, **self.networks(model, model, config)})
            self.manifest["weights"]["vae"] = self.record(folder, model)
        self.finish(model, model, config, python=not self.opts.onnx(model))

    def face_detector(self) -> None:
        config = self.start("face_detector")
        values = {"kind": self.opts.detector, "policy": self.opts.face_policy}
        if self.opts.detector_dir is not None:
            values["model_dir"] = self.weight(self.opts.detector_dir, "face_detector", "detector")
        set_parameters(config, values)
        self.finish("face_detector", "face_detector", config, python=True)

    def simple(self, model: str) -> None:
        self.finish(model, model, self.start(model), python=True)

    def enhancer(self, path: Path) -> None:
        network = load_face_enhancer(path)  # one clear error naming the file if it is not a face restorer
        arch = FACE_ARCHS[network.arch]
        config = self.start("enhancer")
        weights = self.weight(path, "enhancer", path.name)
        # spandrel marks these networks unsafe in float16: bfloat16 on GPUs, float32 otherwise
        set_parameters(
            config, {"weights": weights, "dtype": "bfloat16" if self.opts.dtype == "bfloat16" else "float32"}
        )
        self.manifest["enhancer"] = {
            "weights": self.record(weights, "enhancer"),
            "arch": network.arch,
            "license": arch.license,
            "non_commercial": arch.non_commercial,
        }
        self.finish("enhancer", "enhancer", config, python=True)

    def lipsync(self) -> None:
        config = self.start("lipsync")
        seq = config.sequence_batching
        # lipsync drops an idle stream itself and tells its next request so; Triton keeps the sequence's slot
        # for as long again (its clock counts only requests), then refuses the id with its own START-flag message.
        seq.max_sequence_idle_microseconds = int(2 * self.opts.idle_timeout_s * 1e6)
        seq.oldest.max_candidate_sequences = self.opts.max_streams
        set_parameters(
            config,
            {
                "denoiser_models": ",".join(f"{v}=denoiser_{v}" for v in self.variants),
                "audio_encoder_max_batch": _max_batch(self.root / "audio_encoder"),
                "vae_scaling_factor": repr(1.0 if self.opts.stand_ins else float(self.codec.scaling_factor)),
                "stream_idle_timeout_s": f"{self.opts.idle_timeout_s:g}",
                "max_streams": self.opts.max_streams,  # lipsync's own bound on streams open or finishing
                "random_weights": str(self.manifest["random_weights"]).lower(),
                "face_policy": self.opts.face_policy,
                "overlap_windows": str(self.opts.overlap_windows).lower(),
                "calls_per_model": self.opts.frame_max_batch // MIN_FRAME_BATCH,
                "enhancer_model": "enhancer" if self.opts.enhancer_weights is not None else "",
            },
        )
        mask = self.opts.mask_image or next((p.mask for p in self.paths.values() if p.mask is not None), None)
        if mask is not None:  # always copied: a 2 KB image, read by the stub from its own folder
            for resolution in self.resolutions:
                load_fixed_mask(str(mask), resolution)  # ValueError naming the file if the weights' one is bad
            _link_or_copy(mask, self.root / "lipsync" / "1" / "mask.png")
            set_parameters(config, {"mask": "mask.png"})
            self.manifest["mask"] = "lipsync/1/mask.png"
        self.finish("lipsync", "lipsync", config, python=True)


def _max_batch(model_dir: Path) -> int:
    return parse_model_config(model_dir / "config.pbtxt").max_batch_size


def _link_or_copy(src, dst) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------------- cli
def parse_weights(items: Sequence[str]) -> dict[str, Path]:
    """`[VARIANT=]DIR` items; a bare DIR is variant 1.5."""
    out: dict[str, Path] = {}
    for item in items:
        variant, sep, folder = item.partition("=")
        variant, folder = (variant, folder) if sep else ("1.5", item)
        if variant in out:
            raise ExportConfigError(f"--weights names variant {variant} twice")
        out[variant] = Path(folder)
    return out


def parse_instances(items: Sequence[str]) -> dict[str, InstanceSpec]:
    out = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep:
            raise ExportConfigError(
                f"--instances {item!r}: expected MODEL=KIND[:COUNT[:GPUS]], e.g. denoiser=gpu:2:0,1"
            )
        if name.strip() in out:  # else the last one would win, silently
            raise ExportConfigError(f"--instances {name.strip()!r} is given twice")
        out[name.strip()] = InstanceSpec.parse(spec)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="latentsync-export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--out", required=True, type=Path, help="repository folder to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="[VARIANT=]DIR",
        help="weights folder (latentsync_unet.pt, whisper/tiny.pt, vae/); VARIANT 1.5 (default) or "
        "1.6; repeat for both; the audio encoder and VAE come from the first",
    )
    src.add_argument("--tiny", action="store_true", help="seeded random tiny weights for 1.5 and 1.6 (tests, demo)")
    p.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the --tiny weights")
    p.add_argument(
        "--variants",
        default=",".join(VARIANT_ORDER),
        help="--tiny: comma-separated variants to build (the first is the default variant)",
    )
    p.add_argument("--copy-weights", action="store_true", help="copy weights into the repository (cpu target)")
    p.add_argument(
        "--mask",
        type=Path,
        dest="mask_image",
        help="upstream's mouth mask image (latentsync/utils/mask.png of the LatentSync repository; default: "
        "mask.png in the weights folder, else a drawn approximation)",
    )
    p.add_argument("--detector", choices=("mediapipe", "insightface"), default="mediapipe")
    p.add_argument(
        "--detector-dir",
        type=Path,
        help="insightface: buffalo_l / buffalo_s folder; mediapipe: a folder of its .tflite files "
        "(default: the installed mediapipe wheel's)",
    )
    p.add_argument(
        "--face-policy",
        choices=("largest", "track"),
        default="largest",
        help="several faces in a frame: the largest (upstream) or the one tracked from the last frame",
    )
    p.add_argument(
        "--instances",
        action="append",
        default=[],
        metavar="MODEL=KIND[:COUNT[:GPUS]]",
        help="instance group of a model, e.g. denoiser=gpu:2:0,1 or lipsync=cpu:2 (repeatable)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        help="gpu target: precision of the denoiser and the VAE (default bfloat16; the cpu target is float32)",
    )
    p.add_argument(
        "--max-windows",
        type=int,
        help="windows the denoiser advances together, 2 UNet items each under "
        "guidance (default: cpu 8, gpu 16; see Sizing above)",
    )
    p.add_argument(
        "--compile-unet",
        default="",
        choices=COMPILE_MODES,
        help="run the denoiser's UNet under torch.compile in this mode (e.g. reduce-overhead on a GPU: 1.6-1.7x "
        "the eager bf16 step on an H200, RESULTS.md); each batch size compiles at start-up (minutes); default eager",
    )
    p.add_argument("--max-streams", type=int, help="concurrent streams per lipsync instance (default: cpu 8, gpu 24)")
    p.add_argument("--frame-max-batch", type=int, help="batch of the per-frame models, >= 16 (default: cpu 16, gpu 64)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching delay of every model")
    p.add_argument(
        "--idle-timeout-s",
        type=float,
        default=300.0,
        help="drop a stream that sent nothing for this long; must exceed the time a client may wait "
        "for its in-flight windows (Triton's idle clock restarts only on requests)",
    )
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="do not prepare a stream's next window while the current one denoises (same results)",
    )
    p.add_argument(
        "--stand-ins",
        action="store_true",
        help="serve near-zero-cost stand-ins instead of the UNet, "
        "VAE and audio encoder: measures the serving path's own ceiling (latentsync-bench --stand-ins)",
    )
    p.add_argument(
        "--enhancer-weights",
        type=Path,
        metavar="FILE",
        help="official face restorer weights (GFPGANv1.4.pth / RestoreFormer.pth / codeformer.pth, "
        "through spandrel): adds the `enhancer` model that streams asking for `enhance` use; "
        "CodeFormer's licence allows non-commercial use only",
    )
    p.add_argument("--tensorrt", action="store_true", help="gpu target: VAE and audio encoder as ONNX for TensorRT")
    p.add_argument("--fp32", action="store_true", help="--tensorrt: ship float32 ONNX graphs")
    p.add_argument("--trt-cache-dir", default="/tmp/latentsync-trt-cache", help="--tensorrt: engine cache")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    a = p.parse_args(argv)
    try:
        opts = ExportOptions(
            out=a.out,
            target=a.target,
            weights=parse_weights(a.weights),
            tiny=a.tiny,
            variants=tuple(v.strip() for v in a.variants.split(",") if v.strip()),
            seed=a.seed,
            copy_weights=a.copy_weights,
            detector=a.detector,
            detector_dir=a.detector_dir,
            face_policy=a.face_policy,
            instances=parse_instances(a.instances),
            dtype=a.dtype,
            max_windows=a.max_windows,
            compile_unet=a.compile_unet,
            frame_max_batch=a.frame_max_batch,
            max_queue_delay_us=a.max_queue_delay_us,
            max_streams=a.max_streams,
            idle_timeout_s=a.idle_timeout_s,
            overlap_windows=not a.no_overlap,
            stand_ins=a.stand_ins,
            enhancer_weights=a.enhancer_weights,
            mask_image=a.mask_image,
            tensorrt=a.tensorrt,
            fp16=not a.fp32,
            trt_cache_dir=a.trt_cache_dir,
            force=a.force,
        )
        manifest = build_repository(opts)
    except (ExportConfigError, ExportError, FileNotFoundError, ValueError) as e:
        print(f"latentsync-export: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {opts.out} (target {opts.target}; variants {', '.join(manifest['variants'])}; "
        f"models {', '.join(manifest['models'])})"
    )
    for model, rec in manifest["onnx"].items():
        print(f"  {model}: ONNX {rec['dtype']}, float32 graph vs torch max abs error {rec['fp32_max_abs_error']:.3g}")
    if manifest["enhancer"]:
        e = manifest["enhancer"]
        print(
            f"  enhancer: {e['arch']} ({e['license']})"
            + ("  NOTE: NON-COMMERCIAL USE ONLY (CodeFormer's licence)" if e["non_commercial"] else "")
        )
    if manifest["stand_ins"]:
        print("NOTE: STAND-INS instead of the networks (--stand-ins): for measuring the serving path only.")
    elif manifest["random_weights"]:
        print("NOTE: RANDOM test weights (--tiny): the output video will NOT be lip-synced.")
    elif manifest["mask"] is None:
        print(
            "NOTE: no mask.png (upstream's latentsync/utils/mask.png, the mouth mask the UNet was trained with) in the "
            "weights folder nor --mask: using this project's drawn approximation of it (a few latent cells along "
            "the jaw differ). Copy it beside the checkpoints, or pass --mask, for upstream's exact mask."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
