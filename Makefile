# The README's two commands: `make train` (main job) and `make test` (test suite).
# Both create .venv and build the extension on first use; `make install` rebuilds after C++/CUDA edits.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.pytrain-installed

CMAKE_BUILD := build/cmake

.PHONY: train test pytest ctest install bench info clean

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet ninja numpy pytest pytest-benchmark timm transformers
	touch $@

$(STAMP): $(VENV)/.deps-installed setup.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)
	$(PIP) install --quiet --no-build-isolation -e .
	touch $@

install: $(STAMP)

train: $(STAMP)
	$(PY) -m pytrain train

test: ctest pytest

pytest: $(STAMP)
	$(PY) -m pytest -q

# C++ unit tests of the CPU kernels' machinery, built against libtorch (CUDA sources are covered by setup.py).
ctest: $(STAMP)
	cmake -S . -B $(CMAKE_BUILD) -DPYTRAIN_CUDA=OFF -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

bench: $(STAMP)
	$(PY) -m pytrain bench

info: $(STAMP)
	$(PY) -m pytrain info

clean:
	rm -rf build *.egg-info pytrain/_C*.so $(STAMP)
