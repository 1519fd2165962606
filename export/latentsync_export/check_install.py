"""`python -m latentsync_export.check_install`: can this environment run every model of a repository?

Imports what each model_repository/*/1/model.py imports (the Python backend stub would fail to load a model
whose import fails, long after an image was built), builds the default face detector from its installed weights,
loads spandrel for the face enhancer and checks that the face path's compiled loops (numba) are there. Exits 1
with the failing model and error; the container build runs it.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from latentsync_core.face import kernels
from latentsync_core.face.detect import create_detector
from latentsync_core.face.enhance import import_spandrel

from .model_config import templates_dir

STUB_MODULES = {"triton_python_backend_utils"}  # provided by the Python backend stub at run time


def model_imports(templates: Path) -> dict[str, set[str]]:
    """model name -> the modules its model.py imports (absolute imports only)."""
    found = {}
    for model_py in sorted(templates.glob("*/1/model.py")):
        tree = ast.parse(model_py.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        found[model_py.parent.parent.name] = names - STUB_MODULES
    return found


def require_face_kernels() -> None:
    """Alignment and paste-back run without numba too, but slower (face/kernels.py): not in a built image."""
    if not kernels.AVAILABLE:
        raise ImportError("numba does not import: alignment and paste-back would take their slower paths")


def main() -> int:
    failures = []
    for model, modules in model_imports(templates_dir()).items():
        for module in sorted(modules):
            try:
                importlib.import_module(module)
            except Exception as e:  # noqa: BLE001 - reported per model
                failures.append(f"{model}: import {module}: {type(e).__name__}: {e}")
    checks = (
        ("face_detector", lambda: create_detector("mediapipe")),
        ("enhancer", import_spandrel),
        ("lipsync and restorer", require_face_kernels),
    )
    for model, check in checks:
        try:
            check()
        except Exception as e:  # noqa: BLE001 - reported per model
            failures.append(f"{model}: {type(e).__name__}: {e}")
    for line in failures:
        print(line, file=sys.stderr)
    print("every model's dependencies import" if not failures else f"{len(failures)} problems", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
