# Entry points for a fresh machine: `make setup`, then `make test` / `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
GOLDEN  ?= ../shared/golden

WEIGHTS ?=

.PHONY: setup test parity demo demo-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU install from the package registries (torch 2.13.0 CPU is on disk for pip).
# The optional face enhancer's loader (face/enhance.py) goes in with --no-deps: spandrel declares torchvision,
# and PyPI's torchvision does not import beside the CPU torch (and then breaks diffusers' imports).
# spandrel-extra-arches brings CodeFormer, whose licence allows non-commercial use only.
setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[server,test]' -e ./client
	$(BIN)/pip install -q --no-deps mediapipe==0.10.21   # real face detector weights (.tflite), see face/detectors
	$(BIN)/pip install -q --no-deps spandrel==0.4.2 spandrel-extra-arches==0.2.0 einops==0.8.2
	@echo "setup done: $(VENV)"

test:
	$(BIN)/pytest -q

# The demo's inputs: speech from espeak-ng (Debian) and a sample portrait shipped in the insightface wheel
# (only its image files are used, so --no-deps).
demo-deps:
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null; }
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('insightface') is None)" \
		|| $(BIN)/pip install -q --no-deps insightface==2.1

# Build a repository (tiny random weights unless WEIGHTS=DIR), serve it with Triton, sync a portrait to speech.
demo: demo-deps
	$(BIN)/python -m latentsync_export.demo $(if $(WEIGHTS),--weights $(WEIGHTS)) --out out/demo.mp4

parity:
	$(BIN)/latentsync-parity $(GOLDEN)

clean:
	rm -rf $(VENV) build *.egg-info
