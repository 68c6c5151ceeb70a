# The README's two commands: `make train` (main job) and `make test` (test suite).
# Both create .venv with the pinned package set (requirements-test.txt) and build the extension on
# first use; `make install` rebuilds after C++/CUDA edits (only what changed is recompiled).
# `make test-latest` runs the same tests against the newest releases, in a copy under build/latest;
# `make test-device-versions` against the GPU device image's versions (requirements-device.txt), in build/device-versions.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PINS   := requirements-test.txt
# What the venv gets: the pinned set, or (test-latest) the newest releases of what the tests import.
DEPS   ?= -r $(PINS)
NEWEST := --upgrade pip setuptools torch torchvision triton numpy transformers timm pytest pytest-benchmark ninja \
          optuna tensorboard matplotlib
STAMP  := $(VENV)/.pytrain-installed
LATEST := build/latest
DEVICE_PINS     := requirements-device.txt
DEVICE_VERSIONS := build/device-versions

CMAKE_BUILD := build/cmake

.PHONY: train test pytest ctest install bench info clean test-latest test-device-versions pin

$(VENV)/.deps-installed: $(PINS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet $$(grep '^pip==' $(PINS))
	$(PIP) install --quiet $(DEPS)
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

# C++ unit tests of the kernels' header-level machinery, against libtorch. They need no kernel library,
# so none is built here (setup.py built the extension already).
ctest: $(STAMP)
	cmake -S . -B $(CMAKE_BUILD) -DPYTRAIN_KERNELS=OFF -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The test suite against the newest releases (opt-in: drift seen on purpose), in a copy of the tracked
# files so the checkout's .venv and extension stay as they are.  `make pin` then records that set.
test-latest:
	rm -rf $(LATEST) && mkdir -p $(LATEST)
	git ls-files -z | xargs -0 cp -P --parents -t $(LATEST)
	$(MAKE) -C $(LATEST) test PYTHON=$(PYTHON) DEPS="$(NEWEST)"
	$(LATEST)/$(PY) -m pip list --format=freeze | grep -E '^(torch|torchvision|triton|numpy|transformers|timm|kernels)=='

# The test suite against the GPU device image's versions (torch 2.11 / Triton 3.6 / transformers 5.17, the oldest
# torch pytrain supports), opt-in and not in CI, in a copy like test-latest: its own .venv from requirements-device.txt.
test-device-versions:
	rm -rf $(DEVICE_VERSIONS) && mkdir -p $(DEVICE_VERSIONS)
	git ls-files -z | xargs -0 cp -P --parents -t $(DEVICE_VERSIONS)
	$(MAKE) -C $(DEVICE_VERSIONS) test PYTHON=$(PYTHON) PINS=$(DEVICE_PINS)
	$(DEVICE_VERSIONS)/$(PY) -m pip list --format=freeze | grep -E '^(torch|torchvision|triton|numpy|transformers|timm|kernels)=='

pin:
	test -x $(LATEST)/$(PY) || { echo "run make test-latest first"; exit 1; }
	{ grep '^#' $(PINS); $(LATEST)/$(PIP) freeze --all --exclude pytrain-kernels; } > $(PINS).new && mv $(PINS).new $(PINS)

bench: $(STAMP)
	$(PY) -m pytrain bench

info: $(STAMP)
	$(PY) -m pytrain info

clean:
	rm -rf build *.egg-info pytrain/_C*.so $(STAMP)
