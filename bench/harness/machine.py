"""The machine description printed above the table and written with every CSV row."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, List

import torch

import pytrain

BENCH_DIR = Path(__file__).resolve().parent.parent


def _run(cmd: List[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=BENCH_DIR).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: the /proc/cpuinfo flags that decide which CPU kernel paths run (AMX tiles, bf16 / fp16 dot products)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "amx_fp16")


def _cpu_flags() -> str:
    """The ISA_FLAGS this CPU has, plus the vendor family ("Intel ... AMX" or not), for the table header."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    have = [f for f in ISA_FLAGS if f in flags]
    return (" ".join(have) or "none of " + " ".join(ISA_FLAGS)) + ("; AMX" if "amx_bf16" in flags else "; no AMX")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_description(device: str, load_at_start: float) -> Dict[str, str]:
    commit = _run(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    if _run(["git", "status", "--porcelain", "--untracked-files=no"]):
        commit += "+dirty"
    gpu = ""
    if device == "cuda":
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()
        gpu = f"{torch.cuda.get_device_name()} (driver {driver[0] if driver else 'unknown'})"
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": commit,
        "gpu": gpu,
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": str(os.cpu_count()),
        "threads": str(torch.get_num_threads()),
        "load_at_start": f"{load_at_start:.2f}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": _version("triton"),
        "pytrain": pytrain.__version__,
    }
