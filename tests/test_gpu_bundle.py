"""The pieces of the prepared GPU run that need no GPU: the bundle's contents and environment, the served path's
measurements (Prometheus counters, streams against a real CPU server), torch.compile timing."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_gpu_script

from latentsync_contract import num_frames_for_audio
from latentsync_load.gpu_bundle import (
    DIFFUSERS_WITHOUT_TRANSFORMERS,
    HIDDEN_PACKAGES,
    LITERT_FILES,
    PACKAGE_DIRS,
    find_libpython,
    make_env,
    pth_lines,
    triton_files,
    wheel_members,
    write_face_frames,
)
from latentsync_load.gpu_serving import load_frames, parse_counters, synthetic_audio
from latentsync_load.gpu_unet import compiled_time

REPO = Path(__file__).resolve().parents[1]
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def test_triton_files_are_the_server_its_backend_one_stub_and_their_libraries():
    files = triton_files(PYTHON)
    assert {
        "pytriton/tritonserver/bin/tritonserver",
        "pytriton/tritonserver/backends/python/libtriton_python.so",
        f"pytriton/tritonserver/python_backend_stubs/{PYTHON}/triton_python_backend_stub",
        "pytriton/tritonserver/backends/python/triton_python_backend_utils.py",
    } <= set(files)
    libs = [name for name in files if name.startswith("nvidia_pytriton.libs/")]
    assert any("libtritonserver" in n for n in libs) and any("libcudart" in n for n in libs)
    assert not any("libpython" in n for n in libs)  # other Pythons' (the stub uses the machine's)
    assert not any("python_backend_stubs" in n and f"/{PYTHON}/" not in n for n in files)


def test_wheel_members_keep_only_litert_interpreter_and_drop_tests(tmp_path):
    wheel = tmp_path / "ai_edge_litert-2.3.0-cp312-cp312-manylinux_2_27_x86_64.whl"
    names = [f"ai_edge_litert/{f}" for f in LITERT_FILES] + [
        "ai_edge_litert/libLiteRtWebGpuAccelerator.so",
        "ai_edge_litert/tools/apply_plugin_main",
        "ai_edge_litert-2.3.0.dist-info/METADATA",
    ]
    with zipfile.ZipFile(wheel, "w") as z:
        for name in names:
            z.writestr(name, "x")
    assert sorted(m.filename for m in wheel_members(wheel)) == sorted(f"ai_edge_litert/{f}" for f in LITERT_FILES)
    other = tmp_path / "numpy-1.26.4-cp312-cp312-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(other, "w") as z:
        for name in ("numpy/__init__.py", "numpy/core/tests/test_x.py", "numpy-1.26.4.dist-info/METADATA"):
            z.writestr(name, "x")
    assert [m.filename for m in wheel_members(other)] == ["numpy/__init__.py", "numpy-1.26.4.dist-info/METADATA"]


def test_bundle_environment_sees_bundle_first_then_machine_and_project_without_pythonpath(tmp_path):
    """The Triton stub ignores PYTHONPATH: the environment's .pth alone must give it every package."""
    dest = tmp_path / "dest"
    (dest / "site" / "numpy").mkdir(parents=True)
    (dest / "site" / "numpy" / "__init__.py").write_text("__version__ = 'bundled'\n")
    (dest / "site" / "peft").mkdir()  # an installed package that must stay invisible (HIDDEN_PACKAGES)
    (dest / "site" / "peft" / "__init__.py").write_text("raise ImportError('the machine peft')\n")
    code = (
        "import importlib.util, numpy, tritonclient, latentsync_contract, latentsync_serving.serve as s; "
        "assert importlib.util.find_spec('peft') is None; "
        "print(numpy.__version__); print(latentsync_contract.__file__); print(s.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = make_env(dest, REPO, numpy1=True)
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    version, contract, serve = out.split()
    assert version == "bundled" and Path(contract).is_relative_to(REPO / "contract")
    assert Path(serve).is_relative_to(REPO / "serving")  # not an installed copy of the project
    python = make_env(dest, REPO, numpy1=False)  # the machine's numpy wins
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split()[0] == np.__version__


def test_pth_lines_order():
    project = [str((REPO / d).resolve()) for d in PACKAGE_DIRS]
    host = "import site; site.addsitedir('/host/site-packages')"
    lines = pth_lines(Path("/b/site"), ["/host/site-packages"], REPO, numpy1=True).splitlines()
    hide = f"import sys; [sys.modules.setdefault(m, None) for m in {HIDDEN_PACKAGES!r}]"
    assert lines == [f"{hide}; sys.path.insert(0, '/b/site')", *project, host, DIFFUSERS_WITHOUT_TRANSFORMERS]
    lines = pth_lines(Path("/b/site"), ["/host/site-packages"], REPO, numpy1=False).splitlines()
    assert lines == [hide, *project, host, "/b/site", DIFFUSERS_WITHOUT_TRANSFORMERS]


def test_find_libpython_finds_this_interpreters_library_or_says_none():
    found = find_libpython()
    assert found is None or "libpython" in found
    assert find_libpython("2.1") is None


def test_parse_counters_sums_one_models_labels():
    text = "\n".join(
        [
            "# HELP denoiser_steps Iterations of the denoising loop",
            'denoiser_steps{model="denoiser_1.5"} 40',
            'denoiser_steps{model="denoiser_1.6"} 7',
            'denoiser_window_steps{model="denoiser_1.5",instance="a"} 90',
            'denoiser_window_steps{instance="b",model="denoiser_1.5"} 30',
            'nv_inference_count{model="denoiser_1.5",version="1"} 3',
        ]
    )
    counters = parse_counters(text, ("denoiser_window_steps", "denoiser_steps"), "denoiser_1.5")
    assert counters == {"denoiser_window_steps": 120.0, "denoiser_steps": 40.0}


def test_synthetic_audio_gives_exactly_the_frame_count():
    for frames in (2, 16, 17, 48):
        audio = synthetic_audio(frames)
        assert audio.dtype == np.float32 and num_frames_for_audio(len(audio)) == frames
    with pytest.raises(ValueError):
        synthetic_audio(1)


def test_load_frames_cycles_and_resizes(tmp_path, shared_dir):
    write_face_frames(shared_dir / "media" / "demo1_video.mp4", tmp_path / "faces", count=2, stride=10)
    frames = load_frames(tmp_path / "faces", 5, long_side=480)
    assert frames.shape == (5, 480, 270, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[0], frames[2]) and not np.array_equal(frames[0], frames[1])


def test_compiled_time_reports_compile_and_step_seconds():
    module = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
    compile_s, step_s = compiled_time(module, (torch.randn(4, 8),), torch.device("cpu"), None, "eager", 1, 2, 5.0)
    assert compile_s > 0 and step_s > 0


@pytest.mark.server
@pytest.mark.slow
def test_gpu_script_served_path(tmp_path, shared_dir):
    """(b) end to end on the CPU: a tiny cpu repository from the script's own weights, a real Triton server, 1 and
    2 raw gRPC streams of a real face; frames back, the denoiser's counters read from the metrics endpoint."""
    args = ["--parts", "served", "--serve", "--served-streams", "1,2", "--served-frames", "16", "--budget-s", "1500"]
    result = run_gpu_script(tmp_path, shared_dir, *args, timeout=1800)
    assert [(r["streams"], r["frames"], r["errors"]) for r in result["served"]] == [(1, 16, []), (2, 32, [])]
    for row in result["served"]:
        assert row["fps"] > 0 and row["first_frame_s"] > 0
        assert row["denoiser_steps"] >= 1 and 1 <= row["windows_per_step"] <= row["streams"]
    assert (tmp_path / "out" / "tritonserver.log").is_file()
