"""`latentsync-parity GOLDEN_DIR`: run this project's code on upstream golden cases and compare.

Each sub-folder with a case.json is one case; its `kind` picks the runner below, and every tolerance comes
from the case's own case.json (nothing here is specific to one golden set). Prints one line per case with the
max abs error of each output against its tolerance, then `N passed, M failed`; exits 1 if any case fails or
cannot be run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file

from latentsync_contract import num_frames_for_audio

from . import audio
from .checkpoints import module_shapes
from .configs import VAE_SCALING_FACTOR
from .denoise import WindowConditioning, denoise_window, frames_to_batch, mask_latents
from .face.align import FaceAligner, landmarks_to_points
from .face.restore import paste_back
from .loaders import load_unet, load_whisper_encoder
from .models.unet3d import UNet3DConditionModel
from .models.whisper import whisper_state_dict_shapes
from .samplers import make_sampler


@dataclass
class Check:
    name: str
    error: float  # max abs error (or mismatch count for exact checks)
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.error <= self.tol)

    def __str__(self) -> str:
        mark = "" if self.ok else " FAIL"
        note = f" {self.note}" if self.note else ""
        return f"{self.name}={self.error:.3g}/{self.tol:.3g}{note}{mark}"


@dataclass
class CaseResult:
    name: str
    kind: str
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)


# ---------------------------------------------------------------------------------------------- helpers


def max_abs(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape} != expected {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def uint8_check(name: str, ours, ref, tol: float) -> Check:
    ours, ref = np.asarray(ours), np.asarray(ref)
    err = max_abs(ours, ref)
    frac = float((ours.astype(np.int16) != ref.astype(np.int16)).mean()) if ref.size else 0.0
    return Check(name, err, tol, f"({frac:.2%} differ)")


def exact_check(name: str, ours, ref) -> Check:
    ours, ref = np.asarray(ours), np.asarray(ref)
    if ours.shape != ref.shape:
        return Check(name, float("inf"), 0, f"shape {ours.shape} != {ref.shape}")
    return Check(name, float((ours != ref).sum()), 0, "(mismatches)")


def tol_of(case: dict, *keys: str, default: float | None = None) -> float:
    tol = case.get("tolerance", {})
    for k in keys:
        if isinstance(tol.get(k), (int, float)):
            return float(tol[k])
    if default is None:
        raise KeyError(f"no tolerance among {keys} in case.json")
    return default


def external(case_dir: Path, ref: str):
    """Resolve '../other/file.npz:array' or '../other/file' references of case.json."""
    path, _, array = ref.partition(":")
    path = (case_dir / path.strip()).resolve()
    array = array.split()[0] if array.strip() else ""  # "name (16, 50, 384)" -> "name"
    return np.load(path)[array] if array else path


def unet_from_safetensors(weights: Path, config: dict) -> torch.nn.Module:
    """Goes through the official checkpoint format ({'state_dict': ...} in a .pt) and the strict loader."""
    sd = {k: v.float() for k, v in load_file(str(weights)).items()}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "latentsync_unet.pt"
        torch.save({"state_dict": sd}, ckpt)
        return load_unet(ckpt, config)


def unet_config_of(case_dir: Path, case: dict) -> dict:
    cfg = case.get("config", {})
    return cfg["model"] if "model" in cfg else cfg


# ---------------------------------------------------------------------------------------------- runners


def run_unet(case_dir: Path, case: dict) -> list[Check]:
    config = unet_config_of(case_dir, case)
    model = unet_from_safetensors(case_dir / case["weights"]["file"], config)
    inp = np.load(case_dir / case["inputs"]["file"])
    out = np.load(case_dir / case["outputs"]["file"])
    sample = torch.from_numpy(inp["sample"])
    ehs = torch.from_numpy(inp["encoder_hidden_states"])
    tol = tol_of(case, "max_abs", "noise_pred_max_abs")
    preds = []
    with torch.no_grad():
        for t in inp["timesteps"]:
            preds.append(model(sample, torch.tensor(int(t)), ehs).numpy())
    return [Check("noise_pred", max_abs(np.stack(preds), out["noise_pred"]), tol)]


def run_unet_manifest(case_dir: Path, case: dict) -> list[Check]:
    checks = []
    for name, file in case["files"].items():
        manifest = json.loads((case_dir / file).read_text())
        with torch.device("meta"):
            model = UNet3DConditionModel.from_config(manifest["model_config"])
        ours = module_shapes(model)
        ref = {k: tuple(v) for k, v in manifest["state_dict"].items()}
        n_params = sum(p.numel() for p in model.parameters())
        bad = _manifest_mismatches(ours, ref) + int(n_params != manifest.get("n_parameters", n_params))
        checks.append(Check(f"{name}_keys", float(bad), 0, f"({len(ref)} tensors, {n_params:,} params)"))
    return checks


def run_whisper_manifest(case_dir: Path, case: dict) -> list[Check]:
    checks = []
    for name, file in case["files"].items():
        manifest = json.loads((case_dir / file).read_text())
        ours = whisper_state_dict_shapes(manifest["dims"])
        ref = {k: tuple(v) for k, v in manifest["state_dict"].items()}
        checks.append(Check(f"{name}_keys", float(_manifest_mismatches(ours, ref)), 0, f"({len(ref)} tensors)"))
    return checks


def _manifest_mismatches(ours: dict, ref: dict) -> int:
    """Keys in a different order, missing, extra or with another shape all count."""
    if list(ours) == list(ref):
        return sum(tuple(ours[k]) != tuple(ref[k]) for k in ref)
    return max(1, len(set(ours) ^ set(ref)) + sum(tuple(ours[k]) != ref[k] for k in set(ours) & set(ref)))


def run_audio_features(case_dir: Path, case: dict) -> list[Check]:
    dims = json.loads((case_dir / case["weights"]["dims_file"]).read_text())
    sd = load_file(str(case_dir / case["weights"]["file"]))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny.pt"
        torch.save({"dims": dims, "model_state_dict": sd}, ckpt)
        encoder = load_whisper_encoder(ckpt)
    inp = np.load(case_dir / case["inputs"]["file"])
    out = np.load(case_dir / case["outputs"]["file"])
    samples = inp["audio_16k_f32"]
    checks = []
    wav = case_dir / "input.wav"
    if wav.is_file():
        checks.append(Check("load_audio", max_abs(audio.load_audio(wav), samples), 0))
    mel = audio.log_mel_spectrogram(samples)
    with torch.no_grad():
        feats = audio.encode_features(encoder, mel)
    feats = np.asarray(feats, dtype=np.float32)
    chunks = np.asarray(audio.feature_chunks(feats))
    t_feat = tol_of(case, "whisper_features_max_abs")
    t_chunk = tol_of(case, "chunks_max_abs")
    checks += [
        Check("log_mel", max_abs(mel, out["log_mel"]), tol_of(case, "log_mel_max_abs")),
        Check("whisper_features", max_abs(feats, out["whisper_features"]), t_feat),
    ]
    n_ref = case["outputs"].get("n_chunks", len(out["chunk_feature_indices"]))
    checks.append(exact_check("n_chunks", len(chunks), n_ref))
    checks.append(
        exact_check("chunk_feature_indices", audio.feature_chunk_indices(len(feats)), out["chunk_feature_indices"])
    )
    for key in out.files:  # chunks_firstK / chunks_lastK
        if key.startswith("chunks_first"):
            k = len(out[key])
            checks.append(Check(key, max_abs(chunks[:k], out[key]), t_chunk))
        elif key.startswith("chunks_last"):
            k = len(out[key])
            checks.append(Check(key, max_abs(chunks[-k:], out[key]), t_chunk))
    n_frames = num_frames_for_audio(len(samples))
    checks.append(exact_check("num_frames_for_audio", n_frames, n_ref))
    return checks


def run_align_restore(case_dir: Path, case: dict) -> list[Check]:
    frame = cv2.cvtColor(cv2.imread(str(case_dir / "frame.png"), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    inp = np.load(case_dir / "inputs.npz")
    out = np.load(case_dir / "outputs.npz")
    t_mat = tol_of(case, "affine_matrix_max_abs")
    t_bias = tol_of(case, "p_bias_max_abs")
    t_crop = tol_of(case, "face_crop_uint8_max_abs")
    t_res = tol_of(case, "face_resized_uint8_max_abs")
    t_rest = tol_of(case, "restored_region_uint8_max_abs")
    checks: list[Check] = []
    for res in case["config"]["resolutions"]:
        p = f"r{res}_"
        pts = landmarks_to_points(inp["landmark_2d_106"])
        checks.append(Check(p + "landmarks3", max_abs(pts, out[p + "landmarks3"]), 0))
        aligned = FaceAligner(res).align(frame, pts, smooth=True)
        checks += [
            Check(p + "affine", max_abs(aligned.affine, out[p + "affine_matrix"][0]), t_mat),
            uint8_check(p + "crop", aligned.crop, out[p + "face_crop"], t_crop),
            uint8_check(p + "face", _chw(aligned.face), out[p + "face_resized"], t_res),
        ]
        if p + "p_bias" in out.files:
            aligner = FaceAligner(res)
            aligner.align(frame, pts, smooth=True)
            checks.append(Check(p + "p_bias", max_abs(aligner.p_bias, out[p + "p_bias"]), t_bias))
        if p + "affine_matrix_nosmooth" in out.files:
            plain = FaceAligner(res).align(frame, pts, smooth=False)
            checks.append(
                Check(p + "affine_nosmooth", max_abs(plain.affine, out[p + "affine_matrix_nosmooth"][0]), t_mat)
            )
        if p + "restore_face" in inp.files:
            face = torch.from_numpy(inp[p + "restore_face"])
            restored = paste_back(frame, face, out[p + "affine_matrix"][0])
            y0, y1, x0, x1 = (int(v) for v in out[p + "restored_region_box"])
            outside = restored.copy()
            outside[y0:y1, x0:x1] = frame[y0:y1, x0:x1]
            checks.append(uint8_check(p + "restored", restored[y0:y1, x0:x1], out[p + "restored_region"], t_rest))
            checks.append(exact_check(p + "restored_outside", outside, frame))
        if "seq_landmark_2d_106" in inp.files and p + "seq_affine_matrix" in out.files:
            aligner = FaceAligner(res)
            mats, biases, crops, faces, lm3 = [], [], [], [], []
            for lmk in inp["seq_landmark_2d_106"]:
                q = landmarks_to_points(lmk)
                a = aligner.align(frame, q, smooth=True)
                lm3.append(q)
                mats.append(a.affine)
                biases.append(np.array(aligner.p_bias))
                crops.append(a.crop)
                faces.append(_chw(a.face))
            checks.append(Check(p + "seq_landmarks3", max_abs(np.stack(lm3), out[p + "seq_landmarks3"]), 0))
            checks.append(Check(p + "seq_affine", max_abs(np.stack(mats), out[p + "seq_affine_matrix"]), t_mat))
            checks.append(Check(p + "seq_p_bias", max_abs(np.stack(biases), out[p + "seq_p_bias"]), t_bias))
            if p + "seq_face_crop" in out.files:
                checks.append(uint8_check(p + "seq_crop", np.stack(crops), out[p + "seq_face_crop"], t_crop))
            if p + "seq_face_resized" in out.files:
                checks.append(uint8_check(p + "seq_face", np.stack(faces), out[p + "seq_face_resized"], t_res))
    return checks


def _chw(face: np.ndarray) -> np.ndarray:
    """Aligned faces are (R, R, 3); the golden stores (3, R, R)."""
    return np.moveaxis(np.asarray(face), -1, -3)


def run_denoise_loop(case_dir: Path, case: dict) -> list[Check]:
    cfg = case["config"]
    ext = case["inputs"]["external"]
    weights = external(case_dir, ext["unet_weights"])
    unet_case = json.loads((weights.parent / "case.json").read_text())
    model = unet_from_safetensors(weights, unet_config_of(weights.parent, unet_case))
    audio = torch.from_numpy(external(case_dir, ext["audio_chunks"])).float()
    inp = np.load(case_dir / case["inputs"]["file"])
    out = np.load(case_dir / case["outputs"]["file"])
    scale = float(cfg.get("vae_scaling_factor", VAE_SCALING_FACTOR))
    shift = float(cfg.get("vae_shift_factor", 0.0))
    latents = torch.from_numpy(inp["initial_latents"]).float()
    h, w = latents.shape[-2:]
    f = latents.shape[2]
    mask_key = next(k for k in inp.files if k.startswith("mask_image"))  # "mask_image_<height>"
    mask_img = torch.from_numpy(inp[mask_key])
    masks = mask_img[0:1].unsqueeze(0).repeat(f, 1, 1, 1)  # (f, 1, H, W) float64, as upstream
    to_latent = lambda x: frames_to_batch((torch.from_numpy(x).float() - shift) * scale)
    cond = WindowConditioning(
        mask=mask_latents(masks, (h, w)).float(),
        masked=to_latent(inp["vae_masked_image_posterior_sample"]),
        reference=to_latent(inp["vae_ref_image_posterior_sample"]),
        audio=audio[:f],
    )
    scheduler = make_sampler("ddim", cfg["num_inference_steps"])
    rec: dict[str, list] = {"unet_input": [], "noise_pred": [], "latents": []}

    def record(i, d):
        for k in rec:
            rec[k].append(d[k].numpy())

    def unet_fn(sample, timesteps, audio_embeds):
        with torch.no_grad():
            return model(sample, timesteps[0], audio_embeds)

    final = denoise_window(unet_fn, latents, cond, scheduler, float(cfg["guidance_scale"]), callback=record)
    tol = case["tolerance"]
    t_lat = float(tol["latents_per_step_max_abs"])
    checks = [
        exact_check("timesteps", scheduler.timesteps.numpy(), out["timesteps"]),
        Check(
            "mask_latent",
            max_abs(cond.mask[0, 0, 0].numpy(), out[next(k for k in out.files if k.startswith("mask_latent"))]),
            0,
        ),
        Check("unet_input_step0", max_abs(rec["unet_input"][0], out["unet_input_per_step"][0]), 1e-6),
        Check(
            "noise_pred_free_running",
            max_abs(np.stack(rec["noise_pred"]), out["noise_pred_per_step"]),
            float(tol["noise_pred_per_step_max_abs_free_running"]),
        ),
        Check("latents_per_step", max_abs(np.stack(rec["latents"]), out["latents_per_step"]), t_lat),
        Check("final_latents", max_abs(final.numpy(), out["final_latents"]), float(tol["final_latents_max_abs"])),
    ]
    # Teacher forcing: our UNet on upstream's recorded inputs isolates the UNet from accumulated loop error.
    forced = [
        unet_fn(torch.from_numpy(x), torch.tensor([int(t)]), _cfg_audio(audio[:f], len(x))).numpy()
        for x, t in zip(out["unet_input_per_step"], out["timesteps"])
    ]
    checks.append(
        Check(
            "noise_pred_teacher_forced",
            max_abs(np.stack(forced), out["noise_pred_per_step"]),
            float(tol["noise_pred_per_step_max_abs_teacher_forced"]),
        )
    )
    return checks


def _cfg_audio(audio: torch.Tensor, batch: int) -> torch.Tensor:
    a = audio.unsqueeze(0)
    return torch.cat([torch.zeros_like(a), a]) if batch == 2 else a


RUNNERS = {
    "unet": run_unet,
    "unet_manifest": run_unet_manifest,
    "whisper_manifest": run_whisper_manifest,
    "audio_features": run_audio_features,
    "align_restore": run_align_restore,
    "denoise_loop": run_denoise_loop,
}


def run_case(case_dir: Path) -> CaseResult:
    case = json.loads((case_dir / "case.json").read_text())
    kind = case.get("kind", "?")
    result = CaseResult(case_dir.name, kind)
    start = time.perf_counter()
    try:
        runner = RUNNERS.get(kind)
        if runner is None:
            raise ValueError(f"unknown case kind {kind!r}")
        result.checks = runner(case_dir, case)
    except Exception as e:  # a case that cannot run is a failed case, with its reason
        result.error = f"{type(e).__name__}: {e}"
        if "LATENTSYNC_PARITY_TRACE" in os.environ:
            traceback.print_exc()
    result.seconds = time.perf_counter() - start
    return result


def find_cases(golden: Path) -> list[Path]:
    return sorted(p.parent for p in golden.glob("*/case.json"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="latentsync-parity", description=__doc__.splitlines()[0])
    ap.add_argument("golden_dir", type=Path, help="folder of golden case folders (each with a case.json)")
    ap.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = find_cases(args.golden_dir)
    if not cases:
        print(f"no case folders (*/case.json) in {args.golden_dir}", file=sys.stderr)
        return 2
    results = []
    for case_dir in cases:
        r = run_case(case_dir)
        results.append(r)
        status = "PASS" if r.ok else "FAIL"
        detail = r.error if r.error else "  ".join(map(str, r.checks))
        print(f"{status} {r.name} [{r.kind}] {r.seconds:.1f}s  {detail}", flush=True)
    n_pass = sum(r.ok for r in results)
    print(f"{n_pass} passed, {len(results) - n_pass} failed")
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "case": r.name,
                        "kind": r.kind,
                        "ok": r.ok,
                        "error": r.error,
                        "checks": [c.__dict__ for c in r.checks],
                    }
                    for r in results
                ],
                indent=1,
            )
        )
    return 0 if n_pass == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
