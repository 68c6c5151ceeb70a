"""Soft loading of the compiled extension ``pytrain._C`` and of the Triton kernels.

A missing or broken extension never breaks ``import pytrain``: the reason is
kept, logged once as a warning, reported by ``pytrain.info()``, and the
reference and Triton implementations keep working.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Optional

import torch

log = logging.getLogger("pytrain")


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import pytrain._C (registering its CPU/CUDA kernels); returns (module, None) or (None, reason)."""
    try:
        return importlib.import_module("pytrain._C"), None
    except Exception as exc:  # any load failure (missing .so, ABI mismatch) must not break import
        reason = f"pytrain._C could not be loaded ({type(exc).__name__}: {exc}); build it with " \
                 f"`pip install --no-build-isolation -e .`"
        log.warning("%s. Using the Triton and reference implementations.", reason)
        return None, reason


def cpu_unavailable() -> Optional[str]:
    return load_extension()[1]


def cuda_unavailable() -> Optional[str]:
    ext, reason = load_extension()
    if ext is None:
        return reason
    if not ext.built_with_cuda():
        return "pytrain._C was built without CUDA kernels (no nvcc, or PYTRAIN_SKIP_CUDA_BUILD=1)"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def triton_unavailable() -> Optional[str]:
    why = triton_import_error()
    if why:
        return why
    if not torch.cuda.is_available() and not triton_interpreted():
        return "Triton needs a CUDA device, or TRITON_INTERPRET=1 to run on the CPU"
    return None


def triton_devices() -> tuple:
    return ("cuda", "cpu") if triton_interpreted() else ("cuda",)
