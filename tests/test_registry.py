"""Backend selection: automatic fallback, forced choices with reasons, soft loading of the extension."""
import os
import subprocess
import sys

import pytest
import torch

import pytrain
from pytrain import ops
from pytrain.info import format_info
from pytrain.ops.registry import NoImplementationError


def _adamw_args(n=5):
    p, g = [torch.randn(n)], [torch.randn(n)]
    return (p, g, [torch.zeros(n)], [torch.zeros(n)], [], [], [], [])


HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)


def test_automatic_choice_prefers_compiled_cpu_kernel():
    chosen = ops.registry("adamw_step").select(torch.device("cpu"), torch.float32)
    expected = "cpu" if ops.registry("adamw_step").availability()["cpu"] is None else "reference"
    assert chosen.name == expected


def test_forced_implementation_that_cannot_serve_lists_reasons():
    with pytest.raises(NoImplementationError, match="'cuda' cannot serve cpu"):
        ops.adamw_step(*_adamw_args(), **HYPER, impl="cuda")


def test_unknown_implementation_is_named():
    with pytest.raises(NoImplementationError, match="unknown implementation 'fastest'"):
        ops.adamw_step(*_adamw_args(), **HYPER, impl="fastest")


@pytest.fixture
def forced():
    """ops.set_impl for one test; the choice at import comes back afterwards."""
    before = os.environ.get("PYTRAIN_IMPL")
    yield ops.set_impl
    ops.set_impl(before)


def test_set_impl_forces_per_op(forced):
    forced("lamb_step=cpu,adamw_step=reference")
    assert ops.registry("adamw_step").select(torch.device("cpu"), torch.float32).name == "reference"
    assert os.environ["PYTRAIN_IMPL"] == "lamb_step=cpu,adamw_step=reference"  # spawned ranks choose the same
    forced("cuda")
    with pytest.raises(NoImplementationError, match="no CUDA device|cannot serve"):
        ops.registry("global_norm").select(torch.device("cpu"), torch.float32)
    forced(None)
    assert "PYTRAIN_IMPL" not in os.environ
    assert ops.registry("global_norm").select(torch.device("cpu"), torch.float32).name in ("cpu", "reference")
    with pytest.raises(ValueError, match="not op=implementation"):
        forced("adamw_step=reference,lamb_step")


def test_env_var_is_read_at_import():
    code = ("import torch, pytrain\n"
            "print(pytrain.ops.registry('adamw_step').select(torch.device('cpu'), torch.float32).name)\n")
    env = {**os.environ, "PYTRAIN_IMPL": "adamw_step=reference"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "reference"


def test_float64_only_served_by_reference():
    reg = ops.registry("adamw_step")
    assert reg.select(torch.device("cpu"), torch.float64).name == "reference"
    with pytest.raises(NoImplementationError, match="dtype torch.float64 not supported"):
        reg.select(torch.device("cpu"), torch.float64, impl="triton" if reg.availability()["cpu"] else "cpu")


def test_built_extension_serves_every_op_on_cpu():
    """When pytrain._C is built (always in CI), each op must have its CPU kernel: no silent fallback."""
    if pytrain._extension.load_extension()[0] is None:
        pytest.skip(f"extension not built: {pytrain.info()['extension']}")
    for name, reg in ops.REGISTRIES.items():
        assert reg.availability()["cpu"] is None, name


def test_built_cuda_extension_has_a_kernel_for_every_cuda_backend():
    """When pytrain._C is built with its CUDA kernels (nvcc, no GPU needed), every op that lists a "cuda" backend
    (the fused linear losses among them) has a kernel at the CUDA dispatch key: no silent fallback to Triton."""
    ext = pytrain._extension.load_extension()[0]
    if ext is None or not ext.built_with_cuda():
        pytest.skip(f"pytrain._C is not built with its CUDA kernels: {pytrain.info()['extension']}")
    with_cuda = [name for name, reg in ops.REGISTRIES.items() if "cuda" in reg.impls]
    assert {"adamw_step", "linear_cross_entropy", "linear_distillation_loss"} <= set(with_cuda)
    for name in with_cuda:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pytrain::{name}", "CUDA"), name


def test_info_reports_every_op_and_backend():
    data = pytrain.info()
    assert {"adamw_step", "lars_step", "lamb_step", "global_norm"} <= set(data["ops"])
    for name, impls in data["ops"].items():
        # attention has no CUDA C++ kernel: on GPUs its Triton kernels serve, and no "cuda" backend is listed
        no_cuda = name.startswith("attention")
        expected = {"cpu", "triton", "reference"} | (set() if no_cuda else {"cuda"})
        assert set(impls) == expected, name
        assert impls["reference"] == "available"
    assert data["torch"] == torch.__version__


def test_info_names_the_cpu_simd_clone():
    """The target_clones clone info names agrees with the CPU's features (x86-64-v4 needs AVX-512, v3 AVX2 + FMA)."""
    data = pytrain.info()
    if not data["extension"].startswith("loaded"):
        pytest.skip(f"extension not built: {data['extension']}")
    caps, clone = data["cpu_capabilities"], data["cpu_simd_clone"]
    if caps["avx512f"] and caps["avx512bw"]:
        assert clone == "x86-64-v4 (AVX-512)"
    elif caps["avx2"] and caps["fma"]:
        assert clone == "x86-64-v3 (AVX2 + FMA)"
    else:
        assert clone.startswith("default")
    assert f"cpu_simd_clone     {clone}" in format_info(data)


def test_import_without_extension_falls_back_to_reference():
    """A missing pytrain._C only costs the compiled backends: import works and says why."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'pytrain._C': raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, pytrain\n"
        "from pytrain.optim import FusedAdamW\n"
        "p = torch.nn.Parameter(torch.ones(3)); p.grad = torch.ones(3)\n"
        "FusedAdamW([p], lr=0.1).step()\n"
        "assert p.data[0] < 1, p\n"
        "print(pytrain.info()['extension'])\n"
        "print(pytrain.info()['ops']['adamw_step']['cpu'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTRAIN_IMPL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "blocked for the test" in out.stdout


def test_triton_launchers_are_guarded_by_their_inputs_device():
    """Triton launches on the current CUDA device: the op sets it from its first tensor (or tensor list)."""
    from pytrain.ops.library import _first_tensor, on_inputs_device

    a, b = torch.zeros(2), torch.ones(3)
    assert _first_tensor((1.0, [a, b], b)) is a and _first_tensor((0.5, b)) is b and _first_tensor((1, [])) is None
    seen = []
    guarded = on_inputs_device(lambda *args: seen.append(args) or "done")
    assert guarded([a], 0.1) == "done" and seen == [([a], 0.1)]  # CPU tensors: no device change, same call
