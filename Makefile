# The README's two commands: `make train` (main job) and `make test` (test suite).
# Both create .venv and build the extension on first use; `make install` rebuilds after C++/CUDA edits.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.pytrain-installed

.PHONY: train test install bench info clean

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet ninja numpy pytest pytest-benchmark timm
	touch $@

$(STAMP): $(VENV)/.deps-installed setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)
	$(PIP) install --quiet --no-build-isolation -e .
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) -m pytrain train

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pytrain bench

info: $(STAMP)
	$(PY) -m pytrain info

clean:
	rm -rf build *.egg-info pytrain/_C*.so $(STAMP)
