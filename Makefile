# Entry points for a fresh machine: `make setup`, then `make test` / `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
GOLDEN  ?= ../shared/golden

WEIGHTS ?=

.PHONY: setup lock test test-fast lint format parity demo demo-deps gpu-bundle clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU install from the package registries (torch 2.13.0 CPU is on disk for pip). Every part of the project is
# its own package (README "Layout"); all are installed editable, with the pip Triton server and the test tools,
# at the versions in constraints.txt (the lock: a new release elsewhere cannot break a fresh clone).
PIP_LOCKED := $(BIN)/pip install -q -c constraints.txt
setup: $(BIN)/python
	$(PIP_LOCKED) -e ./contract -e . -e './serving[triton]' -e ./export -e ./client -e './load[locust]' \
		-r tests/requirements.txt
	# --no-deps: only files are used: mediapipe's face detector weights (.tflite, see face/detectors) and the
	# sample photos of insightface (the demo portrait; test_pose)
	$(PIP_LOCKED) --no-deps mediapipe==0.10.21 insightface==2.1
	# The optional face enhancer's loader (face/enhance.py), --no-deps too: spandrel declares torchvision, and
	# PyPI's torchvision does not import beside the CPU torch (and then breaks diffusers' imports).
	# spandrel-extra-arches brings CodeFormer, whose licence allows non-commercial use only.
	$(PIP_LOCKED) --no-deps spandrel==0.4.2 spandrel-extra-arches==0.2.0 einops==0.8.2
	@echo "setup done: $(VENV)"

# Rewrite the lock from this environment: after adding or raising a requirement, run `make setup` with the new
# requirement (pip reports the clash with the old lock: drop that line first), then `make lock`, then `make test`.
# Local version tags (torch's +cpu) are dropped, so the image's CUDA build of the same version matches too.
lock:
	@{ sed -n '1,/^$$/p' constraints.txt; \
	   $(BIN)/pip freeze --exclude-editable | grep '==' | sed -E 's/\+[[:alnum:].]+$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

# The whole suite: golden parity, numerics, real Triton servers on loopback, the client, ops files, benchmarks.
test: lint
	$(BIN)/pytest -q --durations=20  # the slowest tests, for CI's time budget

# The inner loop: everything that starts no Triton server and is not slow (a few minutes on 2 cores).
test-fast:
	$(BIN)/pytest -q -m "not server and not slow"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The demo's inputs: speech from espeak-ng (Debian) and a sample portrait shipped in the insightface wheel
# (only its image files are used, so --no-deps).
demo-deps:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; }
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('insightface') is None)" \
		|| $(PIP_LOCKED) --no-deps insightface==2.1

# Build a repository (tiny random weights unless WEIGHTS=DIR), serve it with Triton, sync a portrait to speech.
demo: demo-deps
	$(BIN)/latentsync-demo $(if $(WEIGHTS),--weights $(WEIGHTS)) --out out/demo.mp4

parity:
	$(BIN)/latentsync-parity $(GOLDEN)

# What a lent GPU machine lacks for latentsync-gpu-bench (Triton server, packages, detector weights, face frames),
# in the ignored folder .gpu-bundle/ (<= 60 MiB; it travels as a carried path). docs/PERFORMANCE.md, "The prepared
# GPU run", has the command that runs it there.
GPU_PYTHON ?= 3.12
gpu-bundle:
	$(BIN)/python -m latentsync_load.gpu_bundle --python $(GPU_PYTHON) --out .gpu-bundle

clean:
	rm -rf $(VENV) build .gpu-bundle *.egg-info */*.egg-info
