"""The parts stay apart: numerics import no serving or client code, the client imports nothing of the server,
the contract imports nothing at all, every model.py imports only the runtime and the numerics."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import latentsync_core
from latentsync_export.model_config import templates_dir

REPO = Path(__file__).resolve().parents[1]
PARTS = (
    "latentsync_core",
    "latentsync_contract",
    "latentsync_serving",
    "latentsync_export",
    "latentsync_client",
    "latentsync_load",
)


def loaded_after(code: str) -> set[str]:
    """Top-level packages in sys.modules after running `code` in a fresh interpreter."""
    probe = f"{code}; import sys; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(ast.literal_eval(out.strip().splitlines()[-1]))


def test_numerics_import_no_serving_client_or_builder_code():
    modules = [m.name for m in pkgutil.walk_packages(latentsync_core.__path__, "latentsync_core.")]
    loaded = loaded_after("; ".join(f"import {m}" for m in modules))
    assert not loaded & {
        "latentsync_serving",
        "latentsync_export",
        "latentsync_client",
        "latentsync_load",
        "tritonclient",
    }


def test_client_imports_nothing_of_the_server_and_no_torch():
    loaded = loaded_after("import latentsync_client, latentsync_client.cli")
    assert not loaded & {"torch", "latentsync_core", "latentsync_serving", "latentsync_export", "latentsync_load"}


def test_the_contract_imports_nothing_but_the_standard_library():
    loaded = loaded_after("import latentsync_contract")
    assert not loaded & {*PARTS[:1], *PARTS[2:], "numpy", "torch"}


@pytest.mark.parametrize(
    "modules",
    [
        "latentsync_serving.lipsync_service",  # the orchestrator holds no weights
        "latentsync_core.loaders, latentsync_serving.stand_ins",  # the audio encoder's and the stand-ins' stubs
    ],
)
def test_stubs_load_diffusers_only_where_its_models_are_built(modules):
    """Without diffusers (and the UNet built on its blocks) a stub starts ~3 s of CPU sooner and idles ~90 MB
    smaller (measured with -X importtime and RSS on the 2-core Xeon)."""
    loaded = loaded_after(f"import {modules}; import sys; assert 'latentsync_core.models.unet3d' not in sys.modules")
    assert not loaded & {"diffusers", "transformers", "spandrel"}


@pytest.mark.parametrize("model_py", sorted(templates_dir().glob("*/1/model.py")), ids=lambda p: p.parent.parent.name)
def test_model_py_is_thin_and_imports_only_runtime_and_numerics(model_py):
    tree = ast.parse(model_py.read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    project = {m.split(".")[0] for m in imported if m.startswith("latentsync_")}
    assert project <= {"latentsync_core", "latentsync_serving"}, imported
    assert len(model_py.read_text().splitlines()) <= 40  # the work lives in the packages


def test_templates_ship_with_the_exporter_and_are_the_source_tree():
    assert templates_dir().resolve() == (REPO / "model_repository").resolve()
    assert {p.parent.name for p in templates_dir().glob("*/config.pbtxt")} >= {
        "lipsync",
        "denoiser",
        "face_detector",
        "audio_encoder",
        "vae_encoder",
        "vae_decoder",
        "restorer",
        "enhancer",
    }
