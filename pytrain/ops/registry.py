"""Implementation registry: which backend serves an op for a given input, and why not.

Every op has up to four implementations, tried in a per-device order:

    device  automatic order
    cuda    cuda (C++/CUDA extension) -> triton -> reference
    cpu     cpu  (C++/OpenMP/SIMD)    -> reference -> triton (TRITON_INTERPRET=1 only)

``PYTRAIN_IMPL`` forces a choice: ``PYTRAIN_IMPL=triton`` for every op, or
``PYTRAIN_IMPL=adamw_step=triton,lamb_step=reference`` per op; the ``impl=``
argument of the public functions does the same for one call.  The variable is
read once, at import; ``set_impl(spec)`` changes the choice later (and the
variable, for child processes).  An automatic choice falls back quietly; a
forced one that cannot serve the input raises an error listing every reason.

The choice depends on (op, device type, dtype, forced implementation) only, so it is made once per
such key and cached (``OpRegistry.select``).  Under ``torch.compile`` the lookup is
``chosen_name``, marked ``torch.compiler.assume_constant_result``: dynamo calls it while tracing
and puts the backend's name in the graph as a constant, so nothing of the selection (extension
loading, availability checks) is traced, and a compiled call runs the chosen ``torch.ops.pytrain``
op directly.  Dynamo guards on the tensors' device and dtype and on the forced choice
(``forced_impl`` reads a module-level dict that ``set_impl`` replaces), so a change of any of them
recompiles.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

PRIORITY = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference", "triton"),
}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Implementation:
    """One backend of one op.

    fn: the callable (a registered ``torch.ops.pytrain`` op).
    devices / dtypes: what it accepts.  unavailable: returns why it cannot run
    in this process at all (missing extension, no GPU...), or None.
    declines: optional extra check of the device and dtype (keywords ``device``, ``dtype``), returning reasons.
    """

    name: str
    fn: Callable
    devices: Sequence[str]
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
    unavailable: Callable[[], Optional[str]] = lambda: None
    declines: Optional[Callable[..., List[str]]] = None

    def reasons(self, device: torch.device, dtype: torch.dtype) -> List[str]:
        why = self.unavailable()
        if why:
            return [why]
        out = []
        if device.type not in self.devices:
            out.append(f"device {device.type} not supported (supports {', '.join(self.devices)})")
        if dtype not in self.dtypes:
            out.append(f"dtype {dtype} not supported (supports {', '.join(str(d) for d in self.dtypes)})")
        if not out and self.declines is not None:
            out += self.declines(device=device, dtype=dtype)
        return out


class NoImplementationError(RuntimeError):
    """No implementation of an op can serve the given input; the message lists every reason."""


@dataclass
class OpRegistry:
    op: str
    impls: Dict[str, Implementation] = field(default_factory=dict)
    _chosen: Dict[Tuple[str, torch.dtype, Optional[str]], str] = field(default_factory=dict, repr=False)

    def register(self, impl: Implementation) -> None:
        self.impls[impl.name] = impl
        self._chosen.clear()

    def select(self, device: torch.device, dtype: torch.dtype, impl: Optional[str] = None) -> Implementation:
        """The implementation for tensors of ``device`` / ``dtype`` (``impl`` forces one); cached per key."""
        return self.impls[chosen_name(self.op, torch.device(device).type, dtype, impl or forced_impl(self.op))]

    def choose(self, device_type: str, dtype: torch.dtype, forced: Optional[str]) -> str:
        """The name of the implementation for this key, computed once; raises ``NoImplementationError``
        (every reason) when none can serve (errors are not cached: a later call says it again)."""
        key = (device_type, dtype, forced)
        if key not in self._chosen:
            self._chosen[key] = self._choose(torch.device(device_type), dtype, forced)
        return self._chosen[key]

    def _choose(self, device: torch.device, dtype: torch.dtype, forced: Optional[str]) -> str:
        if forced is not None:
            chosen = self.impls.get(forced)
            if chosen is None:
                raise NoImplementationError(f"pytrain.{self.op}: unknown implementation {forced!r} "
                                            f"(known: {', '.join(self.impls)})")
            reasons = chosen.reasons(device, dtype)
            if reasons:
                raise NoImplementationError(f"pytrain.{self.op}: implementation {forced!r} cannot serve "
                                            f"{device.type}/{dtype}: " + "; ".join(reasons))
            return forced
        tried = []
        for name in PRIORITY.get(device.type, ("reference",)):
            candidate = self.impls.get(name)
            if candidate is None:
                continue
            reasons = candidate.reasons(device, dtype)
            if not reasons:
                return name
            tried.append(f"{name}: " + "; ".join(reasons))
        raise NoImplementationError(f"pytrain.{self.op}: no implementation for {device.type}/{dtype}: " + " | ".join(tried))

    def availability(self) -> Dict[str, Optional[str]]:
        """Implementation name -> None if it can run in this process, else the reason it cannot."""
        return {name: impl.unavailable() for name, impl in self.impls.items()}


@torch.compiler.assume_constant_result
def chosen_name(op: str, device_type: str, dtype: torch.dtype, forced: Optional[str]) -> str:
    """``REGISTRIES[op].choose(...)``: a constant to ``torch.compile`` (called at trace time, never traced)."""
    return REGISTRIES[op].choose(device_type, dtype, forced)


REGISTRIES: Dict[str, OpRegistry] = {}


def registry(op: str) -> OpRegistry:
    if op not in REGISTRIES:
        REGISTRIES[op] = OpRegistry(op)
    return REGISTRIES[op]


def _parse_impl(spec: Optional[str]) -> Dict[str, str]:
    """``"triton"`` -> {"*": "triton"}; ``"adamw_step=triton,lamb_step=reference"`` -> per op."""
    spec = (spec or "").strip()
    if not spec:
        return {}
    if "=" not in spec:
        return {"*": spec}
    forced = {}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        if not value.strip():
            raise ValueError(f"PYTRAIN_IMPL: {item!r} is not op=implementation (in {spec!r})")
        forced[name.strip()] = value.strip()
    return forced


_FORCED: Dict[str, str] = _parse_impl(os.environ.get("PYTRAIN_IMPL"))


def set_impl(spec: Optional[str]) -> None:
    """Force implementations from now on, as ``PYTRAIN_IMPL`` would (None or "" for automatic).

    Also sets the variable, so processes started later (spawned ranks) make the same choice.
    """
    global _FORCED
    _FORCED = _parse_impl(spec)
    if spec:
        os.environ["PYTRAIN_IMPL"] = spec
    else:
        os.environ.pop("PYTRAIN_IMPL", None)


def forced_impl(op: str) -> Optional[str]:
    """The implementation ``PYTRAIN_IMPL`` / ``set_impl`` forces for ``op``, if any."""
    return _FORCED.get(op, _FORCED.get("*"))
