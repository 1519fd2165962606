# Entry points for a fresh machine: `make setup`, then `make test` / `make demo`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
GOLDEN  ?= ../shared/golden

.PHONY: setup test parity demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# CPU install from the package registries (torch 2.13.0 CPU is on disk for pip).
setup: $(BIN)/python
	$(BIN)/pip install -q -e '.[server,test]' -e ./client
	$(BIN)/pip install -q --no-deps mediapipe==0.10.21   # real face detector weights (.tflite), see face/detectors
	@echo "setup done: $(VENV)"

test:
	$(BIN)/pytest -q

parity:
	$(BIN)/latentsync-parity $(GOLDEN)

clean:
	rm -rf $(VENV) build *.egg-info
