"""Shared pytest fixtures: the reference data folder and real Triton servers."""
import os
from pathlib import Path

import pytest

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
    from latentsync_export.serve import TritonServer

    started = []

    def start(model_repository, timeout: float = 180.0, **kwargs) -> TritonServer:
        kwargs.setdefault("log_path", tmp_path_factory.mktemp("triton") / "tritonserver.log")
        server = TritonServer(model_repository, **kwargs)
        started.append(server)
        return server.start().wait_ready(timeout)

    yield start
    for server in started:
        server.stop()
