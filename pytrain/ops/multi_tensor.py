"""What the multi-tensor ops (adamw_step, lars_step, lamb_step, global_norm) share on the Python side:
the checks of their tensor lists, the arithmetic dtype of their references and backend selection.

Twin of ``kernels/multi_tensor.py`` (Triton address tables) and ``csrc/cpu/multi_tensor.h`` /
``csrc/cuda/multi_tensor.cuh`` (the C++ engines).  Every tensor list holds one tensor per param, on the
params' device.

Memory layouts.  The backends step contiguous tensors; the public ops take any strided layout, as
torch.optim does, and hand the backends contiguous tensors (``StorageOrder``):
  * a param that is dense and non-overlapping with permuted strides (channels_last, a transposed weight) is
    stepped in its storage order: every tensor of its index is viewed through the same permutation of
    dims, ``t.permute(perm)``, which is contiguous without a copy when ``t`` shares the param's layout (the
    fused optimizers create states with ``memory_format=torch.preserve_format``, and autograd gives such a
    param grads of its layout).  Elementwise steps do not depend on the order of elements and norms
    only up to summation order, so this is the step of the logical tensor; int8 state blocks are runs of
    256 elements in that storage order.
  * any other layout (a sliced weight, a grad or state in another layout) is stepped through a contiguous
    copy of the permuted view, written back afterwards if the op writes that list.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .registry import Implementation, registry


def compute_dtype(t: Tensor) -> torch.dtype:
    """References compute in float32 for float32 / bfloat16 / float16 tensors, in float64 for float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def check_tensor_list(op: str, name: str, tensors: object) -> None:
    """``tensors`` is a list (or tuple) of tensors: TypeError naming the list, or the index of an item that is
    not a tensor (None, a str), before anything reads a tensor attribute."""
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name}[{i}] must be a tensor, got {type(t).__name__}")


def check_shapes(op: str, params: Sequence[Tensor], lists: Dict[str, List[Tensor]]) -> None:
    """The shape contract of an op's lists: each non-empty list holds one tensor per param, shaped like it
    (not merely of its element count).  The one check of eager (``StorageOrder``) and fake (``fake_step``)."""
    for name, tensors in lists.items():
        if not tensors:
            continue
        if len(tensors) != len(params):
            raise ValueError(f"{op}: {name} has {len(tensors)} tensors, expected {len(params)} (one per param)")
        for i, (p, t) in enumerate(zip(params, tensors)):
            if t.shape != p.shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {tuple(t.shape)}, params[{i}] {tuple(p.shape)}")


def fake_step(op: str, params: List[Tensor], **lists: List[Tensor]) -> None:
    """Fake of an in-place step: states the shape contract (``check_shapes``) for ``torch.compile`` and
    ``opcheck``; nothing is returned."""
    check_shapes(op, params, lists)


def trust_ratio_or_one(ratio: Tensor, w_norm: Tensor, d_norm: Tensor) -> Tensor:
    """LARS / LAMB trust ratio, 1 where either norm is 0."""
    ok = (w_norm > 0) & (d_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


def check_params(op: str, params: List[Tensor], grads: Optional[List[Tensor]], name: str = "params") -> None:
    """Params and grads: lists of tensors, same count, one device, one real floating dtype, dense (strided)
    grads of the params' shapes.  ``grads=None``: one list alone (global_norm's ``tensors``), called ``name``."""
    check_tensor_list(op, name, params)
    if grads is not None:
        check_tensor_list(op, "grads", grads)
        if len(params) != len(grads):
            raise ValueError(f"{op}: {len(params)} {name} but {len(grads)} grads")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    for i, p in enumerate(params):
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"{op}: {name}[{i}] has dtype {p.dtype}; only real floating-point {name} are supported")
        if p.device != device:
            raise RuntimeError(f"{op}: {name}[{i}] is on {p.device}, but {name}[0] is on {device}; put one device "
                               f"per param group (or let the optimizer group them)")
        if p.dtype != dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {p.dtype}, expected {dtype} (the dtype of {name}[0])")
        if grads is None:
            continue
        g = grads[i]
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{op}: grads[{i}] is sparse ({g.layout}); fused optimizers need dense gradients")
        if g.device != device:
            raise RuntimeError(f"{op}: grads[{i}] is on {g.device}, but params[{i}] is on {device}")
        if g.dtype != dtype:
            raise TypeError(f"{op}: grads[{i}] has dtype {g.dtype}, expected {dtype} (the dtype of params[{i}])")
    if grads is not None:
        check_shapes(op, params, {"grads": grads})


def check_states(op: str, params: List[Tensor], name: str, states: List[Tensor], dtype: Optional[torch.dtype],
                 may_be_empty: bool = True) -> None:
    check_tensor_list(op, name, states)
    if may_be_empty and not states:
        return
    if len(states) != len(params):
        raise ValueError(f"{op}: {name} has {len(states)} tensors, expected {len(params)} (one per param)")
    for i, (p, s) in enumerate(zip(params, states)):
        if s.device != p.device or s.layout != torch.strided:
            raise ValueError(f"{op}: {name}[{i}] must be a dense tensor on {p.device} (got {s.layout} on {s.device})")
        if dtype is not None and s.dtype != dtype:
            raise TypeError(f"{op}: {name}[{i}] has dtype {s.dtype}, expected {dtype}")


def storage_perm(t: Tensor) -> Optional[Tuple[int, ...]]:
    """The permutation of dims with ``t.permute(perm)`` contiguous (``t``'s elements in storage order), if
    ``t`` is dense and non-overlapping; None otherwise (a slice, an expanded or overlapping view)."""
    perm = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d))))
    return perm if t.permute(perm).is_contiguous() else None


def may_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory: False when, with the dims of more than one element
    sorted by stride, each stride exceeds the farthest offset the smaller-stride dims reach (then every index
    has its own offset); True for a stride-0 (expanded) dim and for the rare interleaved layouts this
    sufficient test cannot prove disjoint."""
    if t.numel() == 0:
        return False
    reach = 0  # the largest offset reachable through the dims seen so far
    for stride, size in sorted((t.stride(d), t.size(d)) for d in range(t.dim()) if t.size(d) > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


class StorageOrder:
    """Contiguous stand-ins for an op's tensor lists, in each param's storage order (module docstring).

    ``op``: the op's name for errors; ``lists``: name -> list of tensors (one per param, shaped like it; empty lists pass through);
    ``written``: the names of the lists the op writes (none of whose elements may share memory).  Checks the
    shape contract (``check_shapes``) first.  ``lists`` of the instance holds the stand-ins;
    ``write_back()`` copies the stand-ins that are copies into the caller's tensors.
    """

    def __init__(self, op: str, params: Sequence[Tensor], lists: Dict[str, List[Tensor]], written: Sequence[str]):
        check_shapes(op, params, lists)
        for name in written:
            for i, t in enumerate(lists.get(name, ())):
                if may_overlap(t):
                    raise ValueError(f"{op}: {name}[{i}] has elements that share memory (strides {t.stride()}, "
                                     f"e.g. an expanded view), so it cannot be updated in place; pass a tensor "
                                     f"of its own (.clone())")
        self.lists: Dict[str, List[Tensor]] = {name: list(ts) for name, ts in lists.items()}
        self._copies: List[Tuple[Tensor, Tensor]] = []
        for i, p in enumerate(params):
            if all(ts[i].is_contiguous() for ts in lists.values() if ts):
                continue
            perm = storage_perm(p) or tuple(range(p.dim()))
            for name, ts in lists.items():
                if not ts:
                    continue
                view = ts[i].permute(perm)
                if view.is_contiguous():
                    self.lists[name][i] = view
                else:
                    self.lists[name][i] = view.contiguous()
                    if name in written:
                        self._copies.append((view, self.lists[name][i]))

    def write_back(self) -> None:
        for target, stand_in in self._copies:
            target.copy_(stand_in)


def select(op: str, params: List[Tensor], impl: Optional[str]) -> Implementation:
    """The backend of ``op`` for the device and dtype of ``params`` (``impl`` forces one)."""
    return registry(op).select(params[0].device, params[0].dtype, impl)
