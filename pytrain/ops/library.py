"""Declares pytrain's ops once, in the ``pytrain`` torch.library namespace.

For an op ``name`` with schema ``S`` this defines up to three ops, all with schema ``S``:

* ``pytrain::name``: kernels registered from C++ (``TORCH_LIBRARY_IMPL(pytrain, CPU/CUDA, m)``
  in ``csrc/cpu/<op>.cpp`` and ``csrc/cuda/<op>.cu``), for the devices the op has kernels for;
* ``pytrain::name_triton``: the Triton launcher from ``kernels/<op>.py``;
* ``pytrain::name_reference``: the plain-PyTorch reference, kept beside the op in ``pytrain/ops/<op>.py``.

Each gets a fake (meta) implementation, so ``torch.compile`` and
``torch.library.opcheck`` see them, and each is entered in the op's registry.
A differentiable op gets its backward on every twin with ``register_autograd`` (the twin of the
backward op of the same backend), and an op that autocast should treat like a matmul (attention,
as SDPA) gets ``register_autocast_lower_precision`` on every twin: both live at the dispatcher, so
the raw ``torch.ops.pytrain`` op, the public function and ``torch.compile`` see the same behaviour.
Triton-backed ops are plain ``torch.library`` ops with an explicit fake rather
than ``triton_op`` (whose derived fake fails under ``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _extension
from .registry import FLOAT_DTYPES, Implementation, registry

LIB = torch.library.Library("pytrain", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
TWINS: Dict[str, Tuple[str, ...]] = {}  # op name -> the suffixes of its defined twins ("", "_triton", "_reference")
AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def _triton_declines(device: torch.device, dtype: torch.dtype) -> List[str]:
    if device.type == "cpu" and not _extension.triton_interpreted():
        return ["Triton runs CPU tensors only under TRITON_INTERPRET=1"]
    return []


def _kernel_unavailable(op: str, key: str, backend_unavailable: Callable[[], Optional[str]]):
    """Why the C++ kernel of ``pytrain::op`` for dispatch key ``key`` cannot run (or None)."""

    def unavailable() -> Optional[str]:
        why = backend_unavailable()
        if why:
            return why
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pytrain::{op}", key):
            return f"pytrain._C has no {key} kernel for pytrain::{op}"
        return None

    return unavailable


def _first_tensor(args) -> Optional[Tensor]:
    for a in args:
        if isinstance(a, Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor):
            return a[0]
    return None


def on_inputs_device(launch: Callable) -> Callable:
    """``launch`` run with the current CUDA device set to its first tensor's: Triton launches on the
    current device, which need not be the inputs' (a second GPU, a rank's device)."""

    @functools.wraps(launch)
    def guarded(*args):
        t = _first_tensor(args)
        if t is not None and t.is_cuda:
            with torch.cuda.device(t.device):
                return launch(*args)
        return launch(*args)

    return guarded


def define_op(
    name: str,
    schema: str,
    *,
    reference: Callable,
    fake: Callable,
    triton: Optional[Callable] = None,
    compiled: Sequence[str] = ("cpu", "cuda"),
    declines: Optional[Callable[..., List[str]]] = None,
) -> None:
    """Define ``pytrain::name`` (C++ kernels) and its Triton and reference twins.

    triton: the launcher: a function of the op's module that imports ``pytrain.kernels.<op>`` when
        first called (importing pytrain never imports triton).
    compiled: the devices ``pytrain._C`` has kernels of this op for.
    declines: extra checks of (device, dtype) shared by the compiled backends (reasons list).
    """
    reg = registry(name)
    TWINS[name] = ("", "_triton", "_reference") if triton is not None else ("", "_reference")
    LIB.define(name + schema)
    torch.library.register_fake(f"pytrain::{name}", fake, lib=LIB)
    op = getattr(torch.ops.pytrain, name)
    for device, backend_unavailable in (("cpu", _extension.cpu_unavailable), ("cuda", _extension.cuda_unavailable)):
        if device in compiled:
            reg.register(Implementation(device, op, (device,), declines=declines,
                                        unavailable=_kernel_unavailable(name, device.upper(), backend_unavailable)))

    if triton is not None:
        LIB.define(f"{name}_triton{schema}")
        LIB.impl(f"{name}_triton", on_inputs_device(triton), "CompositeExplicitAutograd")
        torch.library.register_fake(f"pytrain::{name}_triton", fake, lib=LIB)

        def triton_declines(device: torch.device, dtype: torch.dtype) -> List[str]:
            return _triton_declines(device, dtype) + (declines(device=device, dtype=dtype) if declines else [])

        reg.register(Implementation("triton", getattr(torch.ops.pytrain, f"{name}_triton"), ("cuda", "cpu"),
                                    unavailable=_extension.triton_unavailable, declines=triton_declines))

    LIB.define(f"{name}_reference{schema}")
    LIB.impl(f"{name}_reference", reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"pytrain::{name}_reference", fake, lib=LIB)
    reg.register(Implementation("reference", getattr(torch.ops.pytrain, f"{name}_reference"), ("cpu", "cuda"),
                                dtypes=FLOAT_DTYPES + (torch.float64,)))


def register_autograd(name: str, backward_of: Callable[[str], Callable], setup_context: Callable) -> None:
    """Autograd for every twin of ``pytrain::name`` (``torch.library.register_autograd``).

    backward_of(suffix): the backward of the twin ``name + suffix``, which calls the twin of the op's
    backward op with the same suffix (the CPU kernel's backward is the CPU kernel's, Triton's Triton's).
    setup_context(ctx, inputs, output): what the backward needs, as ``register_autograd`` defines it.
    """
    for suffix in TWINS[name]:
        torch.library.register_autograd(f"pytrain::{name}{suffix}", backward_of(suffix),
                                        setup_context=setup_context, lib=LIB)


def register_autocast_lower_precision(name: str) -> None:
    """Under ``torch.autocast``, every twin of ``pytrain::name`` runs as autocast's lower-precision ops
    (``scaled_dot_product_attention``, matmul) do: floating tensors on the autocast device other than
    float64 are cast to the autocast dtype of that device *at call time*, then the op runs with autocast
    off.  ``torch.library.register_autocast`` (torch >= 2.6) casts to one dtype fixed at registration and
    casts float64 too, so SDPA's behaviour is written here with the same two registrations it makes: a
    Python kernel at the op's ``Autocast<Device>`` key (eager) and a ``py_impl`` there (tracing)."""
    for suffix in TWINS[name]:
        op = getattr(torch.ops.pytrain, name + suffix).default
        for device_type, key_name in AUTOCAST_KEYS.items():
            key = getattr(torch._C.DispatchKey, key_name)
            run = _lower_precision_kernel(op, device_type, key)
            op.py_impl(key)(run)
            LIB.impl(name + suffix, functools.partial(_drop_keyset, run), key_name, with_keyset=True)


def _drop_keyset(run: Callable, _keyset, *args):
    return run(*args)


def _lower_precision_kernel(op, device_type: str, key) -> Callable:
    def cast(x):
        if isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64 \
                and x.device.type == device_type:
            return x.to(torch.get_autocast_dtype(device_type))
        return x

    def run(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(cast(a) for a in args))

    return run
