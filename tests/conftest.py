"""Shared pytest fixtures: the reference data folder, a real talking-face clip and real Triton servers.

Tests that start a Triton server carry the `server` marker (set here from the fixtures they use), so
`make test-fast` (-m "not server and not slow") skips them; `make test` runs everything.
"""

import os
from pathlib import Path

# MKL picks its kernels per CPU (AVX-512 on recent Xeons, AVX2 elsewhere), and their last-bit rounding differs in
# the small LAPACK calls of alignment (the similarity fit's SVD, the paste's affine inverse). The golden data came
# from MKL's CPU-independent path; pinning it here (before torch loads MKL; Triton servers the tests start inherit
# it) keeps the bit-exact comparisons valid on any CPU. Production leaves MKL free to pick its fastest kernels.
os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import av
import numpy as np
import pytest
from helpers import start_ready

from latentsync_contract import WINDOW
from latentsync_core.audio import load_audio
from latentsync_serving.serve import TritonServer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only reference folder (golden data, media, small models): ../shared, or env LATENTSYNC_SHARED."""
    path = Path(os.environ.get("LATENTSYNC_SHARED", REPO.parent / "shared"))
    if not path.is_dir():
        pytest.fail(f"shared reference folder not found at {path} (set LATENTSYNC_SHARED)")
    return path


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory):
    """Factory: `triton_server(repo, timeout=..., **TritonServer kwargs)` starts a real server and waits until
    it is ready (its log goes to pytest's temp folder unless log_path is given); every server it started is
    stopped at the end of the test module (or earlier by `.stop()`), so idle servers of finished modules
    neither hold memory (several GB each with the tiny repository) nor take CPU from later timings."""
    started = []

    def start(model_repository, timeout: float = 180.0, **kwargs) -> TritonServer:
        kwargs.setdefault("log_path", tmp_path_factory.mktemp("triton") / "tritonserver.log")

        def new_server() -> TritonServer:
            started.append(TritonServer(model_repository, **kwargs))
            return started[-1]

        return start_ready(new_server, timeout)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def clip(shared_dir):
    """Half-size frames of a real clip and its 16 kHz speech (a few frames more than any test sends)."""
    frames = []
    with av.open(str(shared_dir / "media" / "demo1_video.mp4")) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=frame.width // 2, height=frame.height // 2))
            if len(frames) == WINDOW + 8:
                break
    return np.stack(frames), load_audio(shared_dir / "media" / "demo1_audio.wav")


def pytest_collection_modifyitems(items):
    """Every test that (indirectly) uses the triton_server fixture starts a real server: mark it `server`."""
    for item in items:
        if "triton_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.server)
