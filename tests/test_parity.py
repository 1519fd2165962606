"""`latentsync-parity` over the shared golden set: every case passes and the summary line is printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("LATENTSYNC_SHARED", REPO.parent / "shared")) / "golden"


@pytest.fixture(scope="module")
def parity_run():
    if not GOLDEN.is_dir():
        pytest.fail(f"golden data not found at {GOLDEN}")
    proc = subprocess.run(
        [sys.executable, "-m", "latentsync_core.parity", str(GOLDEN)], capture_output=True, text=True, timeout=1200
    )
    print(proc.stdout, proc.stderr)
    return proc


def test_all_cases_pass(parity_run):
    n_cases = len(list(GOLDEN.glob("*/case.json")))
    assert parity_run.returncode == 0, parity_run.stdout + parity_run.stderr
    assert parity_run.stdout.strip().splitlines()[-1] == f"{n_cases} passed, 0 failed"
    assert len(re.findall(r"^PASS ", parity_run.stdout, re.M)) == n_cases


def test_failure_exit_code(tmp_path):
    """A case that cannot be run (unknown kind) fails the command."""
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "case.json").write_text('{"kind": "nonexistent"}')
    proc = subprocess.run(
        [sys.executable, "-m", "latentsync_core.parity", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "FAIL odd [nonexistent]" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "0 passed, 1 failed"
