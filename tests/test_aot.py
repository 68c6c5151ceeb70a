"""Every Triton kernel compiles for sm_90 with no GPU (bench/aot_compile.py), and no seed argument is ever
specialised into a constant by Triton's JIT.

The compiles run in a subprocess: this test session runs Triton under TRITON_INTERPRET=1 (tests/conftest.py),
where kernels are interpreter wrappers that cannot be compiled.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "bench" / "aot_compile.py"
SEED_PARAM = re.compile(r"^(s[01]|seed\w*)$")  # the 32-bit words of a seed, as the kernels name them


def _require_triton() -> None:
    if importlib.util.find_spec("triton") is None:
        pytest.fail("triton is not installed: the pinned package set (requirements-test.txt) has it; "
                    "the sm_90 compile checks need its compiler and ptxas", pytrace=False)


def _python(code_or_args, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    args = code_or_args if isinstance(code_or_args, list) else ["-c", textwrap.dedent(code_or_args)]
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _kernel_names():
    """Every @triton.jit function of kernels/*.py that is launched (named ``*_kernel``), as module.name."""
    names = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for name in re.findall(r"^@triton\.jit[^\n]*\ndef (\w+_kernel)\(", path.read_text(), re.MULTILINE):
            names.add(f"{path.stem}.{name}")
    return names


def test_every_kernel_compiles_for_sm90(tmp_path):
    """One variant of every kernel (seeds of 1 where a kernel takes one), compiled for sm_90."""
    _require_triton()
    out = tmp_path / "aot.md"
    proc = _python([str(TOOL), "--smoke", "--quiet", "--out", str(out)])
    assert proc.returncode == 0, f"sm_90 compile failed:\n{proc.stdout}\n{proc.stderr[-6000:]}"
    report = out.read_text()
    compiled = set(re.findall(r"^\| (\w+\.\w+) \|", report, re.MULTILINE)) - {"kernel"}
    missing = _kernel_names() - compiled
    assert not missing, f"kernels with no variant in bench/aot_compile.py's smoke(): {sorted(missing)}"


def test_seed_words_are_never_specialised(tmp_path):
    """A seed word equal to 1 must stay a runtime argument: the JIT turns integer arguments equal to 1 into
    constants, and ``s0.to(tl.uint32)`` on a constant does not compile (quantize with seed=1 failed so).

    Checks every kernel's seed parameters are in ``do_not_specialize``, then takes the signature Triton's JIT
    binder gives the quantize kernels for seeds whose words are 1 and compiles it for sm_90."""
    _require_triton()
    code = f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "bench")!r})
        import aot_compile as aot
        import importlib, pkgutil
        from triton.runtime.jit import JITFunction
        import pytrain.kernels

        specialised = []
        for mod in pkgutil.iter_modules(pytrain.kernels.__path__):
            module = importlib.import_module("pytrain.kernels." + mod.name)
            for name, fn in vars(module).items():
                # launched kernels (helpers called from a kernel take their arguments' types from it)
                if isinstance(fn, JITFunction) and fn.__module__ == module.__name__ and name.endswith("_kernel"):
                    for p in fn.params:
                        if re_match(p.name) and not p.is_constexpr and not p.do_not_specialize:
                            specialised.append(f"{{mod.name}}.{{name}}({{p.name}})")
        launches = []
        for seed in (1, 2**32 + 1, 2**32):
            for case, run in (aot.quantize("fp32", "int8", 128, True, seed), aot.quantize("bf16", "int8", 16384, True, seed)):
                with aot.recording(launches, case):
                    run()
        signatures, errors = [], []
        for launch in launches:
            sig, constexprs, attrs, options = aot.jit_specialization(launch.fn, launch.args, launch.kwargs)
            seeds = {{k: v for k, v in sig.items() if re_match(k)}}
            signatures.append([launch.case, launch.fn.__name__, seeds])
            try:
                aot.compile_for_target(launch.fn, sig, constexprs, attrs, options.__dict__)
            except Exception as e:
                errors.append(f"{{launch.fn.__name__}} ({{launch.case}}): {{aot._error_text(e).splitlines()[-1]}}")
        print(json.dumps(dict(specialised=specialised, signatures=signatures, errors=errors)))
    """
    code = "import re\nre_match = re.compile(" + repr(SEED_PARAM.pattern) + ").match\n" + textwrap.dedent(code)
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-6000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not found["specialised"], f"seed parameters missing from do_not_specialize: {found['specialised']}"
    kernels = {name for _, name, _ in found["signatures"]}
    assert kernels == {"_fused_kernel", "_absmax_kernel", "_cast_kernel"}, kernels
    for case, name, seeds in found["signatures"]:
        if name != "_absmax_kernel":
            assert set(seeds) == {"s0", "s1"} and "constexpr" not in seeds.values(), (case, name, seeds)
    assert not found["errors"], "\n".join(found["errors"])
