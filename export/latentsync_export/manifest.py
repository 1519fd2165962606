"""`repository.json`: what latentsync-export built, and the in-process pipeline on exactly those weights.

The manifest records the target, the variants, where every model's weights are and the face detector; tests and
benchmarks use `load_reference` as the oracle a served stream must equal.
"""

from __future__ import annotations

import json
from pathlib import Path

from latentsync_core.face.detect import FaceDetector, create_detector
from latentsync_core.face.enhance import load_face_enhancer
from latentsync_core.loaders import load_unet, load_vae, load_whisper_encoder
from latentsync_core.pipeline import LipSyncPipeline, LocalModels

MANIFEST = "repository.json"


def read_manifest(repo: str | Path) -> dict:
    path = Path(repo) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a repository built by latentsync-export")
    return json.loads(path.read_text())


def load_reference(
    repo: str | Path, variant: str | None = None, detector: FaceDetector | None = None, device: str = "cpu"
) -> LipSyncPipeline:
    """The in-process LipSyncPipeline on exactly the weights a built repository serves (the parity oracle).

    `detector`: a FaceDetector, or None for the one the repository was built with.
    """
    repo = Path(repo).resolve()
    m = read_manifest(repo)
    variant = variant or m["variants"][0]
    w = m["weights"]
    sources = [w["unet"].get(variant), w.get("whisper"), w.get("vae")]
    if None in sources:
        raise FileNotFoundError(f"{repo}: built from temporary tiny weights for the gpu target; no torch weights")
    unet_path, whisper_path, vae_path = (repo / p for p in sources)  # absolute paths stay absolute
    if detector is None:
        d = m["detector"]
        copied = repo / "face_detector" / "1" / "detector"
        model_dir = copied if copied.exists() else d["model_dir"]
        detector = create_detector(d["kind"], model_dir, policy=d.get("policy", "largest"))
    enhancer = m.get("enhancer") and load_face_enhancer(repo / m["enhancer"]["weights"], device=device)
    models = LocalModels(
        load_unet(unet_path, w["unet_config"][variant], device=device),
        load_whisper_encoder(whisper_path, device=device),
        load_vae(vae_path, device=device),
        detector,
        device=device,
        enhancer=enhancer or None,
        mask_image=repo / m["mask"] if m.get("mask") else None,
    )
    return LipSyncPipeline(models, variant)
