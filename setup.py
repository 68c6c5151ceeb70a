"""Build pytrain and its one compiled extension, ``pytrain._C``.

Install with ``pip install --no-build-isolation -e .`` after installing torch,
so the extension is built against the torch you run (never a second download).

Environment flags (all optional):
  PYTRAIN_SKIP_CUDA_BUILD=1   build only the C++ (CPU) part, even if nvcc exists.
  PYTRAIN_FORCE_CUDA_BUILD=1  fail instead of quietly skipping CUDA when it is unavailable.
  PYTRAIN_CUDA_ARCHS="90;100" compute capabilities to compile for (default "90").
  PYTRAIN_SKIP_EXTENSION=1    build no extension at all (pure Python: reference + Triton).
  MAX_JOBS=N                  parallel compile jobs (default: one per 3 GiB of free memory, at most nproc).
  CUDA_HOME                   toolkit root; by default found from the real location of `nvcc`.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvcc_toolkit_root() -> str | None:
    """The toolkit `nvcc` belongs to.  `nvcc` may be a wrapper script elsewhere on PATH
    (then realpath is not enough), so ask nvcc itself where it lives."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        found = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        found = None
    bin_dir = found.group(1) if found else os.path.dirname(os.path.realpath(nvcc))
    return os.path.dirname(os.path.realpath(bin_dir))


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    _root = _nvcc_toolkit_root()
    if _root:
        # torch.utils.cpp_extension reads CUDA_HOME at import time: set it first.
        os.environ["CUDA_HOME"] = _root

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


@dataclass
class BuildOptions:
    """What to build, decided once from the environment and the installed torch."""

    extension: bool
    cuda: bool
    cuda_archs: list[str]
    reason_no_cuda: str

    @classmethod
    def from_env(cls) -> "BuildOptions":
        archs = [a.strip() for a in os.environ.get("PYTRAIN_CUDA_ARCHS", "90").replace(",", ";").split(";") if a.strip()]
        reason = ""
        if _flag("PYTRAIN_SKIP_CUDA_BUILD"):
            reason = "PYTRAIN_SKIP_CUDA_BUILD is set"
        elif torch.version.cuda is None:
            reason = "this torch was built without CUDA"
        elif CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
            reason = "nvcc / CUDA_HOME not found"
        if reason and _flag("PYTRAIN_FORCE_CUDA_BUILD"):
            raise RuntimeError(f"PYTRAIN_FORCE_CUDA_BUILD is set but CUDA cannot be built: {reason}")
        return cls(extension=not _flag("PYTRAIN_SKIP_EXTENSION"), cuda=not reason, cuda_archs=archs, reason_no_cuda=reason)


def _torch_cuda_library_includes() -> list[str]:
    """Headers torch's CUDA headers include (cusparse.h, cublas_v2.h...) ship in torch's own
    nvidia wheels, not necessarily in the system toolkit."""
    try:
        import nvidia  # the namespace package of the nvidia-* wheels torch depends on
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        found += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    try:
        free_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gib = 6.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gib // 3))))


def _extensions(opts: BuildOptions):
    if not opts.extension:
        return []
    _default_max_jobs()
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not opts.cuda:
        print(f"pytrain: building the C++ (CPU) extension only: {opts.reason_no_cuda}", file=sys.stderr)
        return [CppExtension("pytrain._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    # torch turns TORCH_CUDA_ARCH_LIST into -gencode flags ("90" -> "9.0", "90a" -> "9.0a").
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" if a[-1].isdigit() else f"{a[:-2]}.{a[-2:]}"
                                                  for a in opts.cuda_archs)
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
            "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs += _torch_cuda_library_includes()
    return [CUDAExtension("pytrain._C", sources, include_dirs=include_dirs,
                          extra_compile_args={"cxx": cxx + ["-DPYTRAIN_WITH_CUDA"], "nvcc": nvcc + ["-DPYTRAIN_WITH_CUDA"]},
                          extra_link_args=["-fopenmp"])]


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Compiles into ``build/temp-<venv>`` of the checkout.  pip's editable installs would otherwise
    compile in a new temporary folder every time; here ninja finds the objects of the last build for
    this Python environment, so a rebuild after an edit, or a wheel built after an editable install,
    recompiles only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp-" + os.path.basename(sys.prefix))


setup(
    name="pytrain-kernels",  # the distribution (PyPI's `pytrain` is an unrelated project); the import name is `pytrain`
    version="0.1.0",
    description="Fast, exact training kernels for PyTorch on GPU and CPU",
    # kernels/ has no __init__.py on purpose: a regular package there would shadow Hugging Face's
    # top-level `kernels` in every process started in the checkout.  pytrain/kernels is a symlink to
    # it, so the Triton kernels are the namespace subpackage `pytrain.kernels` in the checkout, in an
    # editable install and in a wheel alike (`pytrain.kernels` is the only name they are imported by).
    packages=find_packages(include=["pytrain", "pytrain.*"]) + ["pytrain.kernels"],
    package_data={"pytrain.data": ["corpus.txt"], "pytrain.kernels": ["*.json"]},
    ext_modules=_extensions(BuildOptions.from_env()),
    cmdclass={"build_ext": BuildExt},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "tqdm"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "timm", "transformers", "optuna", "tensorboard", "matplotlib"],
        "bench": ["pytest-benchmark", "timm"],
        "tune": ["optuna>=4.0", "matplotlib>=3.8"],  # pytrain tune (its plots use matplotlib)
        "track": ["tensorboard>=2.14"],  # pytrain train --tensorboard (torch.utils.tensorboard)
        "plot": ["matplotlib>=3.8"],  # pytrain plot
    },
    entry_points={"console_scripts": ["pytrain=pytrain.cli:main"]},
)
