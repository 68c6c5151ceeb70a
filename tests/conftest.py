"""Test setup.

Without a CUDA device, Triton runs on the CPU through its interpreter (TRITON_INTERPRET=1, set here unless the
variable is already set) and the ``gpu`` tests skip with the reason.  With a CUDA device the interpreter stays
off, so Triton compiles for real and never sees a CUDA tensor through the interpreter; the tests that run Triton
on CPU tensors skip there (``pytrain.testing.backends.impl_or_skip``), and the ``gpu`` tests run.
"""
import os

import torch  # importing torch (and pytrain) does not import triton

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any triton import

import pytest  # noqa: E402

import pytrain  # noqa: E402,F401
from pytrain._extension import triton_interpreted  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped when none is present)")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device available")
    elif triton_interpreted():
        skip = pytest.mark.skip(reason="TRITON_INTERPRET=1 is set: the gpu tests run compiled Triton only")
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
