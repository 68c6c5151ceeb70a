"""DTensor params for the fused optimizers: FSDP2 shards, tensor-parallel placements, 2-D meshes.

The fused ops have no DTensor sharding strategy, and need none: every update is elementwise on the
local shard (``DTensor.to_local()``), so a step runs the same kernels on the local tensors.  What is
not elementwise is reduced over the mesh here, with ``torch.distributed`` collectives:

  * the global gradient norm (``max_grad_norm``): sum over params of |g_p|^2, where a param sharded
    along mesh dims S contributes the all-reduce over S of its shards' squared norms, and a param
    replicated along a mesh dim counts once (no reduce along it).  The total (and whether it is
    finite) is then made identical on every rank (all-reduce max over the mesh), so the clip factor
    and the non-finite skip are decided the same everywhere;
  * whole-parameter norms (LARS / LAMB trust ratios): the squared norms of the local shards,
    all-reduced over the mesh dims the param is sharded along (``whole_norms``).

``LocalView`` is the bridge: inside ``with LocalView(opt)`` each param group lists the local shards
(their ``.grad`` the local grad, redistributed to the param's placements first if it came Partial),
and ``opt.state`` holds the local tensors of the states.  States created during the step are wrapped
back into DTensors with the param's mesh, placements, global shape and stride, so ``state_dict()``
holds DTensors that ``torch.distributed.checkpoint`` saves and loads, onto any number of ranks.
States that belong to the local shard only (int8 block scales: ``shard_local_states``) stay local
tensors; ``state_dict`` converts such states to a portable form (``FusedOptimizer._portable_state``).

Plain (non-DTensor) params may sit beside DTensor ones: they are whole on every rank (replicated).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Hashable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

try:  # public since torch 2.4
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = ()  # isinstance(x, ()) is always False
try:  # FSDP2 over a tensor-parallel Shard(0) dim places the param _StridedShard(0) on the data-parallel dim; in
    # torch 2.14 that placement is no Shard subclass and its is_shard() is False, yet each rank holds a part
    from torch.distributed.tensor.placement_types import _StridedShard
except ImportError:  # pragma: no cover - torch without distributed support
    _StridedShard = ()

#: a shard's place in its param: (mesh, mesh dims the param is sharded along); None: the local tensor is whole
Split = Optional[Tuple[Hashable, Tuple[int, ...]]]


def is_dtensor(t: object) -> bool:
    return isinstance(t, DTensor) if DTensor else False


def uses_dtensors(opt: torch.optim.Optimizer) -> bool:
    """Whether ``opt`` has DTensor params (inside a step's ``LocalView`` too, where its groups list local shards)."""
    return getattr(opt, "_local_view", None) is not None or any(is_dtensor(p) for group in opt.param_groups for p in group["params"])


def split_of(p: "DTensor") -> Split:
    """The mesh dims (of size > 1) ``p`` is sharded along, with its mesh; None when each rank holds all of it."""
    mesh = p.device_mesh
    dims = []
    for dim, placement in enumerate(p.placements):
        if placement.is_partial():
            raise ValueError(f"a param with a Partial placement ({p.placements}) cannot be stepped: "
                             "its value is a pending sum; redistribute it to Shard/Replicate first")
        if (placement.is_shard() or isinstance(placement, _StridedShard)) and mesh.size(dim) > 1:
            dims.append(dim)
    return (mesh, tuple(dims)) if dims else None


def _local_grad(p: "DTensor") -> Tensor:
    g = p.grad
    if not is_dtensor(g):
        raise TypeError(f"a DTensor param has a {type(g).__name__} grad; expected a DTensor grad "
                        "(as autograd gives a DTensor param)")
    if g.device_mesh != p.device_mesh:
        raise ValueError(f"a grad on mesh {g.device_mesh} for a param on mesh {p.device_mesh}")
    if tuple(g.placements) != tuple(p.placements):  # e.g. Partial: reduce it to the param's layout
        g = g.redistribute(p.device_mesh, p.placements)
    return g.to_local()


def _mesh_dims_reduce(t: Tensor, mesh, dims, op=dist.ReduceOp.SUM) -> Tensor:
    for dim in dims:
        dist.all_reduce(t, op=op, group=mesh.get_group(dim))
    return t


class LocalView:
    """``with LocalView(opt):`` the param groups list local shards and ``opt.state`` their local states
    (see the module docstring); everything is put back on exit.  Re-entering is a no-op."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt
        self.active = getattr(opt, "_local_view", None) is None and uses_dtensors(opt)
        self.splits: Dict[int, Split] = {}  # id(local tensor) -> its split
        self.mesh = None  # a mesh of the DTensor params: where the global decisions are agreed

    def split(self, local: Tensor) -> Split:
        return self.splits.get(id(local))

    def __enter__(self) -> "LocalView":
        if not self.active:
            return getattr(self.opt, "_local_view", None) or self
        opt = self.opt
        self.saved_state, self.saved_params, self.entries, self.plain = opt.state, [], [], []
        local_state: Dict[Tensor, dict] = defaultdict(dict)
        for group in opt.param_groups:
            self.saved_params.append(group["params"])
            locals_ = []
            for p in group["params"]:
                if not is_dtensor(p):
                    locals_.append(p)
                    self.plain.append(p)
                    if p in opt.state:
                        local_state[p] = opt.state[p]  # the same dict: changes stay
                    continue
                local = p.to_local()  # an alias of the shard: in-place updates write the param
                if p.grad is not None:
                    local.grad = _local_grad(p)
                self.splits[id(local)] = split_of(p)
                self.mesh = self.mesh or p.device_mesh
                aliases = {k: v.to_local() if is_dtensor(v) else v for k, v in opt.state.get(p, {}).items()}
                local_state[local] = dict(aliases)
                self.entries.append((p, local, aliases))
                locals_.append(local)
            group["params"] = locals_
        opt.state = local_state
        opt._local_view = self
        return self

    def __exit__(self, *exc) -> None:
        if not self.active:
            return
        opt, local_state = self.opt, self.opt.state
        for group, params in zip(opt.param_groups, self.saved_params):
            group["params"] = params
        opt.state, opt._local_view = self.saved_state, None
        for p in self.plain:
            if local_state.get(p):
                opt.state[p] = local_state[p]
        keep_local = getattr(opt, "shard_local_states", ())
        for p, local, aliases in self.entries:
            new = local_state.get(local)
            if not new:
                continue
            old = opt.state[p]
            for key in [k for k in old if k not in new]:  # dropped by the step (a format conversion)
                del old[key]
            for key, value in new.items():
                if key in aliases and value is aliases[key]:
                    continue  # stepped in place through the alias
                wrap = torch.is_tensor(value) and value.dim() > 0 and value.shape == local.shape \
                    and key not in keep_local
                old[key] = DTensor.from_local(value, p.device_mesh, p.placements, shape=p.shape,
                                              stride=p.stride()) if wrap else value

    # -------------------------------------------------------------------------------- reductions
    def whole_norms(self, params: List[Tensor], squares: Tensor) -> Tensor:
        """Norms of whole params from ``squares`` [len(params), k]: row i the squared norms of k tensors
        shaped like local shard ``params[i]``; rows of split params are all-reduced over their shard dims."""
        rows: Dict[Split, List[int]] = defaultdict(list)
        for i, p in enumerate(params):
            split = self.split(p)
            if split is not None:
                rows[split].append(i)
        for (mesh, dims), idx in rows.items():  # same order on every rank: the params' order
            index = torch.tensor(idx, device=squares.device)
            part = squares.index_select(0, index).contiguous()
            squares.index_copy_(0, index, _mesh_dims_reduce(part, mesh, dims))
        return squares.sqrt()

    def agree(self, total: float) -> float:
        """The same value on every rank of the mesh: the max over ranks, inf if it is not finite anywhere."""
        if self.mesh is None:
            return total
        flag = float(not math.isfinite(total))
        t = torch.tensor([0.0 if flag else total, flag], dtype=torch.float64,
                         device=torch.device(self.mesh.device_type))
        _mesh_dims_reduce(t, self.mesh, range(self.mesh.ndim), dist.ReduceOp.MAX)
        return float("inf") if t[1] > 0 else float(t[0])


def active_view(opt) -> Optional[LocalView]:
    """The view a step of ``opt`` runs in (None: no DTensor params, or not inside a step)."""
    return getattr(opt, "_local_view", None)


def split_params(opt, params: List[Tensor]) -> List[Tensor]:
    """Those of ``params`` (local tensors inside a step) that are shards of a larger param."""
    view = active_view(opt)
    return [p for p in params if view is not None and view.split(p) is not None]


def grad_norm(opt, local_norm) -> float:
    """Global L2 norm of the grads of ``opt``'s (possibly DTensor) params.  ``local_norm(grads)``: the norm of
    a list of same-device, same-dtype local tensors (one fused pass)."""
    with LocalView(opt) as view:
        buckets: Dict[Tuple, List[Tensor]] = defaultdict(list)
        for group in opt.param_groups:
            for p in opt._params_with_grads(group):
                buckets[(view.split(p), p.grad.device, p.grad.dtype)].append(p.grad)
        squares: Dict[Split, Tensor] = {}
        for (split, device, _), grads in buckets.items():
            sq = local_norm(grads).to(device=device, dtype=torch.float64) ** 2
            squares[split] = squares[split] + sq if split in squares else sq
        total = 0.0
        for split, sq in squares.items():
            if split is not None:
                sq = _mesh_dims_reduce(sq.reshape(1).clone(), *split)
            total += float(sq.sum())
        return view.agree(total ** 0.5)


def portable_state_dict(opt, state_dict: dict) -> dict:
    """``state_dict`` (torch's packing of ``opt.state``) with the states of DTensor params that hold
    shard-local tensors (int8 block scales) converted by ``opt._portable_state`` into states shaped like
    the param (DTensors), which a checkpoint can reshard; the optimizer's own state is not changed."""
    keep_local = getattr(opt, "shard_local_states", ())
    params = [p for group in opt.param_groups for p in group["params"]]
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    state = dict(state_dict["state"])
    for pid, p in zip(ids, params):
        if not is_dtensor(p) or pid not in state or not any(k in keep_local for k in state[pid]):
            continue
        local = p.to_local()
        converted = opt._portable_state(local, {k: v.to_local() if is_dtensor(v) else v
                                                for k, v in state[pid].items()})
        state[pid] = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                      if torch.is_tensor(v) and v.dim() > 0 and v.shape == local.shape else v
                      for k, v in converted.items()}
    return {**state_dict, "state": state}
