#!/usr/bin/env python
"""Registers, stack, shared / local / constant memory (and, compiling, spills) of every CUDA kernel for sm_90.

    python bench/cuda_resources.py [--out FILE] [--arch 90]                 # read the built extension (seconds)
    python bench/cuda_resources.py --compile [--out FILE] [--arch 90] [--only NAME]   # recompile (minutes)

Default: reads the sm_90 cubins of the built extension (pytrain/_C*.so, or --extension PATH) with
``cuobjdump --dump-resource-usage`` (cuobjdump from PATH, $CUDA_HOME/bin or Triton's nvidia backend, which
ships one) and writes one row per kernel (registers, stack frame, static shared, local and kernel-parameter
constant memory, demangled names) to bench/results/cuda-sm90-resources.md; exits 1 if it finds no kernel.
CI runs it after building the extension.  cuobjdump does not report spills (only the stack frame, which
holds them: a kernel with a 0-byte stack does not spill).

``--compile``: compiles each csrc/cuda/*.cu (a glob: files come and go) to an object with the flags setup.py
builds the extension with, plus ``-Xptxas -v``, and writes the per-kernel ptxas numbers, spill stores and
loads included, to bench/results/cuda-sm90-ptxas.md.  One file at a time (these compiles are heavy: ~265 s).

The flags come from their one home, setup.py: its ``nvcc = [...]`` list and the extra nvcc flags of its
CUDAExtension (``"nvcc": nvcc + [...]``, where -DPYTRAIN_WITH_CUDA is), and its include dirs (csrc/ and
``_torch_cuda_library_includes()``, the headers of torch's nvidia wheels), read from its source (setup.py
runs setup() when imported).  What torch's BuildExtension adds for a CUDAExtension is added here as
torch.utils.cpp_extension does: COMMON_NVCC_FLAGS, -fPIC, torch's include paths, Python's include dir,
-DTORCH_EXTENSION_NAME / -DTORCH_API_INCLUDE_EXTENSION_H and the C++ standard.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "cuda-sm90-resources.md"
DEFAULT_COMPILE_OUT = ROOT / "bench" / "results" / "cuda-sm90-ptxas.md"


# ---------------------------------------------------------------------------------- flags of setup.py
def _setup_ast() -> ast.Module:
    return ast.parse((ROOT / "setup.py").read_text(), filename="setup.py")


def setup_nvcc_flags(tree: ast.Module) -> List[str]:
    """setup.py's nvcc flags: the ``nvcc = [...]`` list plus what its ``"nvcc": nvcc + [...]`` adds."""
    base, extra = None, None
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.List)
                and any(isinstance(t, ast.Name) and t.id == "nvcc" for t in node.targets)):
            base = ast.literal_eval(node.value)
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if (isinstance(key, ast.Constant) and key.value == "nvcc" and isinstance(value, ast.BinOp)
                        and isinstance(value.left, ast.Name) and value.left.id == "nvcc"):
                    extra = ast.literal_eval(value.right)
    if base is None or extra is None:
        raise SystemExit("cuda_resources: setup.py no longer has `nvcc = [...]` and `\"nvcc\": nvcc + [...]`; "
                         "update setup_nvcc_flags() in bench/cuda_resources.py")
    return base + extra


def setup_function(tree: ast.Module, name: str):
    """Function ``name`` of setup.py, from its source (it may use glob, os, re, shutil, subprocess)."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            namespace = {"glob": glob, "os": os, "re": re, "shutil": shutil, "subprocess": subprocess}
            exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), namespace)
            return namespace[name]
    raise SystemExit(f"cuda_resources: setup.py has no {name}(); update bench/cuda_resources.py")


def setup_include_dirs(tree: ast.Module) -> List[str]:
    """setup.py's include dirs: csrc/ and ``_torch_cuda_library_includes()``."""
    return [str(ROOT / "csrc")] + setup_function(tree, "_torch_cuda_library_includes")()


def nvcc_command(arch: str) -> List[str]:
    """nvcc and every flag but the source and output, as setup.py's build passes them (one .cu at a time)."""
    tree = _setup_ast()
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        root = setup_function(tree, "_nvcc_toolkit_root")()  # as setup.py: before torch reads CUDA_HOME
        if root:
            os.environ["CUDA_HOME"] = root
    from torch.utils.cpp_extension import CUDA_HOME, COMMON_NVCC_FLAGS, include_paths

    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    if not nvcc or not os.path.exists(nvcc):
        raise SystemExit("cuda_resources: nvcc not found (put the CUDA toolkit's bin on PATH or set CUDA_HOME)")
    includes = setup_include_dirs(tree) + include_paths(device_type="cuda") + [sysconfig.get_paths()["include"]]
    return ([nvcc, "-c", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
            + [f"-I{d}" for d in includes] + COMMON_NVCC_FLAGS + ["--compiler-options", "-fPIC"]
            + setup_nvcc_flags(tree) + [f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"])


# ---------------------------------------------------------------------------------------- ptxas output
FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(.*)")


def parse_ptxas(log: str) -> List[Dict[str, object]]:
    kernels, current = [], None
    for line in log.splitlines():
        if m := FUNC.search(line):
            current = {"symbol": m.group(1), "regs": None, "stack": None, "spill_stores": None, "spill_loads": None,
                       "smem": 0, "barriers": 0}
            kernels.append(current)
        elif current is not None and (m := PROPS.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := USED.search(line)):
            current["regs"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", m.group(2)):
                current["smem"] = int(s.group(1))
            if b := re.search(r"used (\d+) barriers", m.group(2)):
                current["barriers"] = int(b.group(1))
    return kernels


def demangle(symbols: List[str]) -> List[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not symbols:
        return symbols
    out = subprocess.run([tool], input="\n".join(symbols), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(symbols) else symbols


def short_name(demangled: str) -> str:
    """Kernel name and template arguments without the parameter list (long: multi-tensor functors)."""
    demangled = demangled.replace("(anonymous namespace)", "{anon}")
    depth, cut = 0, len(demangled)
    for i, c in enumerate(demangled):
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0:
            cut = i
            break
    name = demangled[:cut].replace("void ", "", 1)
    return name if len(name) <= 160 else name[:157] + "..."


# ------------------------------------------------------------------------------- the built extension
ARCH = re.compile(r"^arch = (sm_\w+)")
IDENT = re.compile(r"^identifier = (.*)")
FUNCTION = re.compile(r"^\s*Function (\S+):")
USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+) CONSTANT\[0\]:(\d+)")


def find_cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    try:
        import triton
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in candidates:
        if c and os.path.exists(c):
            return c
    raise SystemExit("cuda_resources: cuobjdump not found (PATH, $CUDA_HOME/bin, triton/backends/nvidia/bin)")


def parse_resource_usage(text: str, arch: str) -> List[Dict[str, object]]:
    """Kernels of ``cuobjdump --dump-resource-usage`` output compiled for sm_<arch>: symbol, source file
    (from csrc/ on), regs, stack, smem, local, const0 (bytes)."""
    kernels, current_arch, source, symbol = [], None, "?", None
    for line in text.splitlines():
        if m := ARCH.match(line):
            current_arch = m.group(1)
        elif m := IDENT.match(line):
            path = m.group(1).strip()
            source = path[path.rfind("csrc/"):] if "csrc/" in path else path
        elif m := FUNCTION.match(line):
            symbol = m.group(1)
        elif symbol is not None and (m := USAGE.search(line)):
            if current_arch == f"sm_{arch}":
                regs, stack, smem, local, const0 = map(int, m.groups())
                kernels.append({"symbol": symbol, "file": source, "regs": regs, "stack": stack, "smem": smem,
                                "local": local, "const0": const0})
            symbol = None
    return kernels


def default_extension() -> Path:
    found = sorted((ROOT / "pytrain").glob("_C*.so"))
    if not found:
        raise SystemExit("cuda_resources: no pytrain/_C*.so: build the extension first (or pass --extension)")
    return found[0]


def extension_report(extension: Path, arch: str, out: Path) -> int:
    tool = find_cuobjdump()
    proc = subprocess.run([tool, "--dump-resource-usage", str(extension)], capture_output=True, text=True)
    kernels = parse_resource_usage(proc.stdout, arch) if proc.returncode == 0 else []
    if not kernels:
        print(f"cuda_resources: no sm_{arch} kernel in {extension} (cuobjdump exit {proc.returncode}: "
              f"{proc.stderr.strip()[-500:]}); was it built with its CUDA kernels?", file=sys.stderr)
        return 1
    names = demangle([k["symbol"] for k in kernels])
    rows = sorted(zip((k["file"] for k in kernels), map(short_name, names), kernels), key=lambda r: (r[0], r[1]))
    version = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:]
    with_stack = [r for r in rows if r[2]["stack"] > 0]
    lines = [
        f"# CUDA kernels of the built extension: resources for sm_{arch}",
        "",
        f"`python bench/cuda_resources.py`: `cuobjdump --dump-resource-usage {extension.name}` "
        f"({' '.join(version)}): {len(rows)} kernels.  Per kernel: registers per thread, stack frame, static "
        "shared memory (dynamic shared memory, set at launch, is not counted), local memory and the "
        "kernel-parameter constant bank (CONSTANT[0]), in bytes.  Spills live in the stack frame: a kernel "
        "with a 0-byte stack does not spill; `--compile` gives ptxas's spill bytes.",
        "",
        f"**Kernels with a stack frame: {len(with_stack)}.**",
        "",
        "| file | kernel | regs | stack B | smem B | local B | const0 B |",
        "|---|---|---|---|---|---|---|",
    ]
    for file, name, k in rows:
        lines.append(f"| {file} | `{name}` | {k['regs']} | {k['stack']} | {k['smem']} | {k['local']} | {k['const0']} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} sm_{arch} kernels in {extension.name}, {len(with_stack)} with a stack frame; report: {out}")
    return 0


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report (default {DEFAULT_OUT.relative_to(ROOT)}; --compile: "
                             f"{DEFAULT_COMPILE_OUT.relative_to(ROOT)})")
    parser.add_argument("--arch", default="90", help="compute capability (default 90)")
    parser.add_argument("--compile", action="store_true", help="recompile csrc/cuda/*.cu with ptxas -v (spills)")
    parser.add_argument("--extension", type=Path, default=None, help="the built extension (default pytrain/_C*.so)")
    parser.add_argument("--only", default="", help="--compile: only the .cu files whose name contains this text")
    args = parser.parse_args(argv)
    if not args.compile:
        return extension_report(args.extension or default_extension(), args.arch, args.out or DEFAULT_OUT)
    args.out = args.out or DEFAULT_COMPILE_OUT
    cmd = nvcc_command(args.arch)
    sources = [p for p in sorted((ROOT / "csrc" / "cuda").glob("*.cu")) if args.only in p.name]
    rows, failures, start = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pytrain-nvcc-") as tmp:
        for src in sources:
            t0 = time.perf_counter()
            proc = subprocess.run(cmd + [str(src), "-o", os.path.join(tmp, src.stem + ".o")], cwd=ROOT,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0:
                failures.append((src.name, proc.stderr[-3000:]))
                print(f"{src.name}: FAILED ({seconds:.0f} s)\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            kernels = parse_ptxas(proc.stderr + proc.stdout)
            for k, name in zip(kernels, demangle([k["symbol"] for k in kernels])):
                rows.append((src.relative_to(ROOT).as_posix(), short_name(name), k))
            print(f"{src.name}: {len(kernels)} kernels, {seconds:.0f} s", flush=True)
    total = time.perf_counter() - start
    nvcc_version = subprocess.run([cmd[0], "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    spilling = [r for r in rows if (r[2]["spill_stores"] or 0) > 0]
    shown = [c for c in cmd if not c.startswith("-I")]
    lines = [
        f"# CUDA kernels of csrc/cuda/*.cu: resources for sm_{args.arch}",
        "",
        f"`python bench/cuda_resources.py`: {len(sources)} files, {len(rows)} kernels, {total:.0f} s, "
        f"with {nvcc_version}. Flags (setup.py's, with torch's BuildExtension additions; include dirs left out):",
        "",
        "```", " ".join(shown[1:]), "```",
        "",
        "Per kernel (ptxas -v): registers per thread, stack frame, spill stores / loads in bytes, static shared "
        "memory in bytes (dynamic shared memory, set at launch, is not counted), barriers.",
        "",
        f"**Compile failures: {len(failures)}.** **Kernels that spill: {len(spilling)}.**",
        "",
    ]
    for name, err in failures:
        lines += [f"- {name} failed: `{err.strip().splitlines()[-1] if err.strip() else '?'}`"]
    for file, name, k in spilling:
        lines += [f"- spills: {file} `{name}`: {k['regs']} registers, {k['spill_stores']} B spill stores, "
                  f"{k['spill_loads']} B spill loads"]
    if failures or spilling:
        lines.append("")
    lines += ["| file | kernel | regs | stack B | spill st/ld B | smem B | barriers |", "|---|---|---|---|---|---|---|"]
    for file, name, k in rows:
        lines.append(f"| {file} | `{name}` | {k['regs']} | {k['stack']} | {k['spill_stores']}/{k['spill_loads']} | "
                     f"{k['smem']} | {k['barriers']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{len(rows)} kernels in {len(sources)} files, {len(failures)} failed, {len(spilling)} spill; "
          f"{total:.0f} s; report: {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
