"""The container image's install steps work: docker/Dockerfile's RUN lines that install the project, run in a
fresh virtual environment (no Docker engine here), end with `latentsync_export.check_install`, which imports
what every model.py imports and builds the default face detector from its installed weights. A package the image
forgets (as it once forgot the face detector) fails here instead of at the first model load in production."""

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def install_commands(dockerfile: Path) -> list[str]:
    """The final stage's RUN commands that run python3 (pip installs and checks), joined across line breaks."""
    text = dockerfile.read_text().replace("\\\n", " ")
    final_stage = re.split(r"^FROM ", text, flags=re.M)[-1]
    runs = re.findall(r"^RUN (.+)$", final_stage, flags=re.M)
    return [run for run in runs if "python3" in run]


def test_the_install_steps_are_found():
    commands = install_commands(DOCKERFILE)
    assert commands and "pip install" in commands[0] and "latentsync_export.check_install" in commands[-1]


@pytest.mark.slow
def test_dockerfile_install_steps_in_a_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "VIRTUAL_ENV": str(env_dir),
    }
    env.pop("PYTHONPATH", None)
    for command in install_commands(DOCKERFILE):
        # WORKDIR is the repository root laid out as the COPY lines lay it out; python3 is the venv's
        r = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command.replace("python3 ", f"{bin_dir / 'python'} ")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert r.returncode == 0, f"$ {command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "every model's dependencies import" in r.stdout
    # the packages came from this build, not from the test's own environment
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import latentsync_serving; print(latentsync_serving.__file__)"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert str(env_dir) in where.stdout, where.stdout + where.stderr
    assert sys.prefix not in where.stdout
