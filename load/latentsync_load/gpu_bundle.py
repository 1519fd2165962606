"""`make gpu-bundle`: what a lent GPU machine lacks for `latentsync-gpu-bench`, in one ignored folder.

That machine (docs/PERFORMANCE.md "The prepared GPU run") has Python 3.12 with torch, numpy 2, opencv and
onnxruntime, but no Triton server, diffusers, tritonclient or LiteRT, and no network: only the working tree
and up to 8 carried paths travel, 64 MiB in all. The bundle (at most LIMIT_BYTES) holds:
  triton.tar.xz  tritonserver 2.51 from the installed nvidia-pytriton wheel: bin/, the Python backend, the stub
                 of the machine's Python and every shared library they load (ldd), less other Pythons' libpython;
                 the stub itself needs the machine's libpython3.12.so.1.0 (prepare() checks for it)
  site.tar.xz    packages for that Python, unpacked from their wheels: numpy 1.26 (the 2.51 stub was built with
                 pybind11 2.11, which reads numpy 2 arrays wrongly: inputs arrive as zeros) and ml-dtypes 0.5.4,
                 diffusers, tritonclient (+ python-rapidjson), LiteRT's interpreter alone (the face detector)
  detector/      MediaPipe's face detector and face mesh .tflite files, from the installed mediapipe wheel
  frames/        JPEG frames of a real face, the served path's input (../shared does not travel)
  bundle.json    every file with its size, and the total

On the GPU machine `prepare(bundle, dest)` unpacks it and makes a virtual environment whose one .pth file adds
the bundle's packages first, then the project's folders and the machine's own site-packages: the Python
backend stub ignores PYTHONPATH and reads only the site-packages of the `python3` first on PATH, so the
benchmark runs under that environment's python (and TritonServer puts its bin/ first on PATH).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

LIMIT_BYTES = 60 << 20
REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("contract", ".", "serving", "export", "client", "load")  # the project, without pip install


def locked_versions(names: tuple[str, ...]) -> dict[str, str]:
    """{name: version} of `names` in the project's lock (constraints.txt): the bundle runs what CI ran."""
    lines = (REPO / "constraints.txt").read_text().splitlines()
    canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731 - PEP 503 (no `packaging` on a GPU host)
    lock = {canonical(name): version for name, version in (line.split("==") for line in lines if "==" in line)}
    return {name: lock[canonical(name)] for name in names}


# numpy 1.x shadows the machine's numpy 2, and with it what tritonclient needs from numpy's ABI (ml-dtypes, its pin)
WHEELS = locked_versions(("numpy", "ml-dtypes", "diffusers", "tritonclient", "python-rapidjson", "ai-edge-litert"))
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
LITERT_FILES = (
    "__init__.py",
    "interpreter.py",
    "metrics_portable.py",
    "metrics_interface.py",
    "_pywrap_litert_interpreter_wrapper.so",
    "libpywrap_litert_common.so",
)
TFLITE_FILES = ("face_detection_full_range_sparse.tflite", "face_landmark.tflite")
FACE_FRAMES = 4


# ---------------------------------------------------------------------------------------------------- build
def triton_files(python: str) -> dict[str, Path]:
    """Archive name -> installed file: the server, the Python backend, one stub and their libraries."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed here (make setup)")
    site = Path(list(spec.submodule_search_locations)[0]).parent
    home = site / "pytriton" / "tritonserver"
    binaries = [
        home / "bin" / "tritonserver",
        home / "backends" / "python" / "libtriton_python.so",
        home / "python_backend_stubs" / python / "triton_python_backend_stub",
    ]
    files = [*binaries, home / "backends" / "python" / "triton_python_backend_utils.py"]
    libs = site / "nvidia_pytriton.libs"
    for binary in binaries:  # ldd lists the whole closure; the stub's libpython is the host's ("not found")
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
        files += [
            Path(p)
            for p in (line.split("=>")[-1].split("(")[0].strip() for line in out.splitlines())
            if p and Path(p).resolve().parent == libs.resolve()
        ]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"not in the installed pytriton: {', '.join(map(str, missing))}")
    return {str(f.resolve().relative_to(site.resolve())): f.resolve() for f in files}


def download_wheels(python: str, cache: Path) -> list[Path]:
    """The wheels for the GPU machine's Python (manylinux x86_64), through pip, kept in `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    tag = python.replace(".", "")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        python,
        "--implementation",
        "cp",
        "--abi",
        f"cp{tag}",
        "--abi",
        "abi3",
        "--abi",
        "none",
        *(f"--platform={p}" for p in PLATFORMS),
        "--platform=any",
        "-d",
        str(cache),
        *(f"{name}=={version}" for name, version in WHEELS.items()),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wheels = []
    for name, version in WHEELS.items():
        stem = name.replace("-", "_")
        found = sorted(
            w for w in cache.glob(f"{stem}-{version}-*.whl") if f"-cp{tag}-" in w.name or "-py3-none-" in w.name
        )
        if not found:
            raise FileNotFoundError(f"pip did not fetch {name}=={version} for Python {python}")
        wheels.append(found[-1])
    return wheels


def wheel_members(wheel: Path) -> list[zipfile.ZipInfo]:
    """What a wheel installs, less tests; LiteRT: only the interpreter (the rest is 50 MB of converters)."""
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.infolist() if not m.is_dir() and "/tests/" not in m.filename]
    if wheel.name.startswith("ai_edge_litert-"):
        members = [m for m in members if m.filename in {f"ai_edge_litert/{f}" for f in LITERT_FILES}]
    return members


def add_wheels(tar: tarfile.TarFile, wheels: list[Path]) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for m in wheel_members(wheel):
                info = tarfile.TarInfo(m.filename)
                info.size, info.mode = m.file_size, 0o755 if m.filename.endswith(".so") else 0o644
                tar.addfile(info, io.BytesIO(z.read(m)))


def tflite_files() -> list[Path]:
    from latentsync_core.face.detectors.mediapipe_tflite import find_model_file, mediapipe_model_dir

    return [find_model_file(mediapipe_model_dir(), name) for name in TFLITE_FILES]


def write_face_frames(video: Path, out: Path, count: int = FACE_FRAMES, stride: int = 5) -> None:
    """`count` frames, `stride` apart, of a real face video as JPEG (RGB order kept by cv2's BGR round trip)."""
    import av
    import cv2

    out.mkdir(parents=True)
    with av.open(str(video)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i // stride >= count:
                break
            if i % stride == 0:
                cv2.imwrite(
                    str(out / f"face_{i // stride:02d}.jpg"),
                    frame.to_ndarray(format="bgr24"),
                    [cv2.IMWRITE_JPEG_QUALITY, 92],
                )


def default_face_video() -> Path:
    shared = Path(os.environ.get("LATENTSYNC_SHARED", REPO.parent / "shared"))
    return shared / "media" / "demo1_video.mp4"


def cached_archive(dest: Path, cache: Path, key: dict, write) -> None:
    """dest (a .tar.xz) from the cache when `key` (what went into it) is unchanged, else write(tar) and keep it:
    xz takes minutes on a small machine."""
    cached, key_text = cache / dest.name, json.dumps(key, sort_keys=True)
    key_file = cached.with_name(cached.name + ".key")
    if not (cached.is_file() and key_file.is_file() and key_file.read_text() == key_text):
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(cached, "w:xz") as tar:
            write(tar)
        key_file.write_text(key_text)
    shutil.copy2(cached, dest)


def build(
    out: Path, python: str = "3.12", face_video: Path | None = None, cache: Path | None = None, limit: int = LIMIT_BYTES
) -> dict:
    """Write the bundle to `out` (replaced); returns its manifest. Raises if it is larger than `limit`."""
    out, cache = Path(out), cache or REPO / "build" / "gpu-bundle-cache"
    face_video = face_video or default_face_video()
    if not face_video.is_file():
        raise FileNotFoundError(f"{face_video}: no face video (--face-video, or LATENTSYNC_SHARED=../shared)")
    staging = Path(tempfile.mkdtemp(prefix=".gpu-bundle.", dir=out.parent if out.parent.exists() else None))
    try:
        server = triton_files(python)
        cached_archive(
            staging / "triton.tar.xz",
            cache / python,
            {k: p.stat().st_size for k, p in server.items()},
            lambda tar: [tar.add(path, arcname=name) for name, path in server.items()],
        )
        wheels = download_wheels(python, cache / "wheels")
        cached_archive(
            staging / "site.tar.xz",
            cache / python,
            {w.name: w.stat().st_size for w in wheels},
            lambda tar: add_wheels(tar, wheels),
        )
        (staging / "detector").mkdir()
        for f in tflite_files():
            shutil.copy2(f, staging / "detector" / f.name)
        write_face_frames(face_video, staging / "frames")
        manifest = describe(staging, python)
        (staging / "bundle.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if manifest["total_bytes"] > limit:
            raise ValueError(f"the bundle is {manifest['total_bytes'] / 2**20:.1f} MiB, over {limit / 2**20:.0f} MiB")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def describe(root: Path, python: str) -> dict:
    files = {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}
    archives = {}
    for name in ("triton.tar.xz", "site.tar.xz"):
        with tarfile.open(root / name) as tar:
            members = tar.getmembers()
        archives[name] = {"files": len(members), "unpacked_bytes": sum(m.size for m in members)}
    return {
        "python": python,
        "packages": WHEELS,
        "files": files,
        "archives": archives,
        "total_bytes": sum(files.values()) + 4096,
    }  # + bundle.json itself (a few kB)


def print_manifest(manifest: dict) -> None:
    for name, size in manifest["files"].items():
        print(f"{size:>12,d}  {name}")
    for name, a in manifest["archives"].items():
        print(f"  {name}: {a['files']} files, {a['unpacked_bytes'] / 2**20:.1f} MiB unpacked")
    print(
        f"{manifest['total_bytes']:>12,d}  total ({manifest['total_bytes'] / 2**20:.1f} MiB, "
        f"limit {LIMIT_BYTES / 2**20:.0f} MiB) for Python {manifest['python']}"
    )


# ---------------------------------------------------------------------------------------------------- use
@dataclass
class BundleEnv:
    """An unpacked bundle on the GPU machine and the virtual environment that sees it."""

    root: Path  # where the archives were unpacked
    bundle: Path  # the bundle folder itself (detector/, frames/)
    python: Path  # the environment's interpreter
    numpy1: bool = True  # numpy 1.26 first on the path (False: the machine's numpy 2; no served path)
    venv: bool = True  # False: no virtual environment could be made; packages through PYTHONPATH
    libpython: str | None = None
    notes: list[str] = field(default_factory=list)

    triton_home = property(lambda self: self.root / "triton" / "pytriton" / "tritonserver")
    detector_dir = property(lambda self: self.bundle / "detector")
    frames_dir = property(lambda self: self.bundle / "frames")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}))

    @classmethod
    def load(cls, path: Path) -> BundleEnv:
        d = json.loads(Path(path).read_text())
        return cls(**{**d, "root": Path(d["root"]), "bundle": Path(d["bundle"]), "python": Path(d["python"])})


def find_libpython(version: str | None = None) -> str | None:
    """Where the dynamic loader finds libpythonX.Y.so.1.0 for a stub (this Python's LIBDIR first), or None."""
    name = f"libpython{version or sysconfig.get_python_version()}.so.1.0"
    for candidate in (Path(sysconfig.get_config_var("LIBDIR") or "/nonexistent") / name, name):
        try:
            ctypes.CDLL(str(candidate))
            return str(candidate)
        except OSError:
            continue
    return None


def unpack(bundle: Path, dest: Path) -> None:
    """Unpack the archives into `dest` (skipped when the same bundle is already there)."""
    manifest = (bundle / "bundle.json").read_text()
    if (dest / "bundle.json").is_file() and (dest / "bundle.json").read_text() == manifest:
        return
    shutil.rmtree(dest, ignore_errors=True)
    for name, folder in (("triton.tar.xz", "triton"), ("site.tar.xz", "site")):
        with tarfile.open(bundle / name) as tar:
            tar.extractall(dest / folder, filter="fully_trusted" if hasattr(tarfile, "data_filter") else None)
    (dest / "bundle.json").write_text(manifest)


# The GPU machine's transformers and peft fail to import under the bundle's numpy 1.26 ("Could not import module
# 'PreTrainedModel'" / "'AutoModel'"), and diffusers imports both when installed (diffusers.loaders, on importing
# AutoencoderKL). The project needs neither (only transformers.audio_utils, which imports): a None entry in
# sys.modules hides peft (importlib.util.find_spec answers None), and diffusers is told transformers is absent.
HIDDEN_PACKAGES = ("peft", "scipy")
DIFFUSERS_WITHOUT_TRANSFORMERS = "import diffusers.utils.import_utils as u; u._transformers_available = False"


def pth_lines(site: Path, host_sites: list[str], repo: Path, numpy1: bool) -> str:
    """The environment's .pth: import lines run at start-up, other lines are appended to sys.path. The project's
    folders come before the machine's site-packages, so an installed copy of the project (an editable install's
    path hooks, say) never shadows the checkout; HIDDEN_PACKAGES are hidden, and from diffusers transformers."""
    project = [str((repo / d).resolve()) for d in PACKAGE_DIRS]
    host = "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in host_sites)  # one line: exec()'d
    hide = f"import sys; [sys.modules.setdefault(m, None) for m in {HIDDEN_PACKAGES!r}]"
    if numpy1:  # ahead of the machine's numpy 2 (stub and benchmark alike: one environment, one numpy)
        lines = [f"{hide}; sys.path.insert(0, {str(site)!r})", *project, host]
    else:
        lines = [hide, *project, host, str(site)]
    return "\n".join([*lines, DIFFUSERS_WITHOUT_TRANSFORMERS]) + "\n"


def make_env(dest: Path, repo: Path, numpy1: bool) -> Path:
    """A virtual environment in dest/venv seeing the bundle, this Python's packages and the project."""
    venv = dest / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    host_sites = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    Path(purelib, "latentsync-gpu-bundle.pth").write_text(pth_lines(dest / "site", host_sites, repo, numpy1))
    return python


def check_imports(python: Path) -> tuple[bool, str]:
    """Whether the environment imports what the benchmark and the served models need; its numpy or the error."""
    code = (
        "import numpy, torch, cv2, diffusers, tritonclient.grpc, ai_edge_litert.interpreter, "
        "latentsync_core.loaders, latentsync_serving.lipsync_service, latentsync_export.export; "
        "print(f'numpy {numpy.__version__}, torch {torch.__version__}, opencv {cv2.__version__}')"
    )
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    return r.returncode == 0, (r.stdout.strip() if r.returncode == 0 else r.stderr.strip()[-1500:])


def prepare(bundle: Path, dest: Path, repo: Path = REPO) -> BundleEnv:
    """Unpack `bundle` into `dest` and make the environment the benchmark re-executes itself in."""
    bundle, dest = Path(bundle).resolve(), Path(dest).resolve()
    manifest = json.loads((bundle / "bundle.json").read_text())
    here = sysconfig.get_python_version()
    if manifest["python"] != here:
        raise RuntimeError(
            f"the bundle was built for Python {manifest['python']}, this is Python {here} "
            f"(make gpu-bundle GPU_PYTHON={here})"
        )
    unpack(bundle, dest)
    env = BundleEnv(dest, bundle, Path(sys.executable), libpython=find_libpython(here))
    try:
        env.python = make_env(dest, repo, numpy1=True)
    except (OSError, subprocess.CalledProcessError) as e:  # (a) and (c) still run, with PYTHONPATH
        env.venv = False
        env.notes.append(f"no virtual environment ({e}): packages through PYTHONPATH, no served path")
        return env
    ok, detail = check_imports(env.python)
    if not ok:  # numpy 1.26 does not suit this machine's packages: measure what runs without the served path
        env.notes.append(
            f"imports fail with the bundle's numpy 1.26 ({' / '.join(detail.splitlines()[-3:])}); using the "
            "machine's numpy: the Triton stub would read tensors wrongly, so no served path"
        )
        env.numpy1 = False
        env.python = make_env(dest, repo, numpy1=False)
        ok, detail = check_imports(env.python)
        if not ok:
            raise RuntimeError(f"the bundle's environment does not import: {detail}")
    env.notes.append(f"environment: {detail}")
    if env.libpython is None:
        env.notes.append(f"libpython{here}.so.1.0 not found (the Triton stub needs it): no served path")
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="latentsync-gpu-bundle", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / ".gpu-bundle")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    p.add_argument("--face-video", type=Path, help="a video of a real face (default: ../shared/media/demo1)")
    p.add_argument(
        "--cache", type=Path, help="wheels and archives kept between builds (default: build/gpu-bundle-cache)"
    )
    a = p.parse_args(argv)
    try:
        manifest = build(a.out, a.python, a.face_video, a.cache)
    except (ValueError, FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"latentsync-gpu-bundle: error: {e}", file=sys.stderr)
        return 1
    print_manifest(manifest)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
