"""One rank of the sharded-optimizer tests: ``python sharded_worker.py RANK WORLD STORE_FILE OUT_FILE SCENARIO...``.

Each scenario steps pytrain's fused optimizers on DTensor params and, on every rank, the same optimizer on
plain full tensors with the same (full) gradients, and returns both final params (gathered) for the test to
compare.  Gradients are drawn from a generator seeded by the step, the same on every rank, then sharded like
the params.  gloo, CPU, one thread per rank; a hung collective raises after TIMEOUT.

Layouts (``LAYOUTS``): ``fsdp`` (Shard(0) on a 1-D mesh, as FSDP2 shards, uneven shards included), ``tp``
(Shard(0) / Shard(1) / Replicate mixed on a 1-D mesh, as tensor parallelism places Linear weights and
biases), ``2d`` (a 2 x 2 mesh: DP x TP placements, both dims sharded, nested Shard(0)).  Besides those,
``fsdp_model`` wraps an MLP with ``fully_shard`` and trains it; ``dcp_save`` / ``dcp_load`` save a run with
``torch.distributed.checkpoint`` on one world size and resume it on another.
"""
from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from pytrain.optim import FusedAdamW, FusedLAMB, FusedLARS

TIMEOUT = datetime.timedelta(seconds=90)
STEPS = 20
SHAPES = [(13, 7), (8, 6), (5,), (16,), (3, 4, 5)]
LAYOUTS = {  # name -> (mesh shape as a function of the world size, placements per param)
    "fsdp": (lambda w: (w,), [(Shard(0),)] * len(SHAPES)),
    "tp": (lambda w: (w,), [(Shard(0),), (Shard(1),), (Replicate(),), (Shard(0),), (Shard(1),)]),
    "2d": (lambda w: (2, w // 2), [(Shard(0), Shard(1)), (Replicate(), Shard(0)), (Shard(0), Replicate()),
                                   (Shard(0), Shard(0)), (Replicate(), Shard(2))]),
}
#: name -> (optimizer factory, param dtype)
OPTIMIZERS: Dict[str, tuple] = {
    "adamw_clip": (lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1, max_grad_norm=1.0), torch.float32),
    "adamw_bf16_masters": (lambda ps: FusedAdamW(ps, lr=1e-2, max_grad_norm=1.0, master_weights=True),
                           torch.bfloat16),
    "lars": (lambda ps: FusedLARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-2, trust_coefficient=0.01),
             torch.float32),
    "larc_nesterov": (lambda ps: FusedLARS(ps, lr=0.5, momentum=0.9, weight_decay=1e-2, nesterov=True,
                                           trust_clip=True), torch.float32),
    "lamb_clip": (lambda ps: FusedLAMB(ps, lr=1e-2, weight_decay=0.01, max_grad_norm=1.0), torch.float32),
}
NAN_STEP = 5  # the skip scenario puts a NaN into rank 1's shard of one grad at this step


def full_grads(step: int, dtype) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def full_params(dtype) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]


def make_mesh(layout: str, world: int):
    shape, placements = LAYOUTS[layout]
    mesh_shape = shape(world)
    names = ("dp", "tp")[-len(mesh_shape):] if len(mesh_shape) == 2 else ("world",)
    return init_device_mesh("cpu", mesh_shape, mesh_dim_names=names), placements


def run_pair(layout: str, opt_name: str, world: int, nan: bool = False) -> dict:
    """STEPS of the optimizer on DTensor params and on plain full params; both results gathered."""
    factory, dtype = OPTIMIZERS[opt_name]
    mesh, placements = make_mesh(layout, world)
    ref = [torch.nn.Parameter(p) for p in full_params(dtype)]
    sharded = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, pl)) for p, pl in zip(full_params(dtype),
                                                                                            placements)]
    opt_ref, opt = factory(ref), factory(sharded)
    skipped = []
    for step in range(STEPS):
        grads = full_grads(step, dtype)
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        for p, g, pl in zip(sharded, grads, placements):
            p.grad = distribute_tensor(g, mesh, pl)
        if nan and step == NAN_STEP:
            ref[0].grad[0, 0] = float("nan")  # rank 1 holds no row 0 in the Shard(0) layouts: only it
            if dist.get_rank() == 1:         # sees a NaN in the sharded run, yet every rank must skip
                sharded[0].grad.to_local().view(-1)[0] = float("nan")
        opt_ref.step()
        opt.step()
        skipped.append((opt.last_step_skipped, opt_ref.last_step_skipped))
    masters = [opt.state[p]["master_param"].full_tensor() for p in sharded if "master_param" in opt.state[p]]
    return {"sharded": [p.full_tensor() for p in sharded], "ref": [p.detach() for p in ref], "skipped": skipped,
            "masters": masters, "ref_masters": [opt_ref.state[p]["master_param"] for p in ref
                                                if "master_param" in opt_ref.state[p]],
            "grad_norm": (opt.last_grad_norm, opt_ref.last_grad_norm)}


def run_int8_per_shard(layout: str, world: int) -> dict:
    """int8 states are per local shard: the sharded run equals FusedAdamW on the local shards as plain tensors."""
    mesh, placements = make_mesh(layout, world)
    sharded = [torch.nn.Parameter(distribute_tensor(p, mesh, pl)) for p, pl in zip(full_params(torch.float32),
                                                                                 placements)]
    local = [torch.nn.Parameter(p.to_local().clone()) for p in sharded]
    opt, opt_local = (FusedAdamW(ps, lr=1e-2, state_dtype="int8") for ps in (sharded, local))
    for step in range(STEPS):
        for p, q, g, pl in zip(sharded, local, full_grads(step, torch.float32), placements):
            p.grad = distribute_tensor(g, mesh, pl)
            q.grad = p.grad.to_local().clone()
        opt.step()
        opt_local.step()
    return {"sharded": [p.to_local().clone() for p in sharded], "ref": [q.detach() for q in local],
            "codes": [opt.state[p]["exp_avg"].to_local().clone() for p in sharded],
            "ref_codes": [opt_local.state[q]["exp_avg"] for q in local]}


def scenario_layouts(world: int) -> dict:
    layouts = ["fsdp", "tp"] + (["2d"] if world == 4 else [])
    out = {(layout, name): run_pair(layout, name, world) for layout in layouts for name in OPTIMIZERS}
    out.update({(layout, "adamw_clip_nan"): run_pair(layout, "adamw_clip", world, nan=True) for layout in layouts})
    out.update({(layout, "int8_per_shard"): run_int8_per_shard(layout, world) for layout in layouts})
    return out


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b = torch.nn.Linear(10, 13), torch.nn.Linear(13, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def scenario_fsdp_model(world: int) -> dict:
    """FSDP2 (fully_shard per layer and at the root) on an MLP whose 13 rows shard unevenly; every rank feeds the
    same batch, so FSDP's averaged grads equal the single-process ones."""
    out = {}
    for name in ("adamw_clip", "lamb_clip"):
        factory = OPTIMIZERS[name][0]
        ref, model = MLP(), MLP()
        for layer in (model.a, model.b):
            fully_shard(layer)
        fully_shard(model)
        opt_ref, opt = factory(list(ref.parameters())), factory(list(model.parameters()))
        for step in range(STEPS):
            x = torch.randn(8, 10, generator=torch.Generator().manual_seed(step))
            for m, o in ((ref, opt_ref), (model, opt)):
                o.zero_grad()
                m(x).square().mean().backward()
                o.step()
        out[name] = {"sharded": [p.full_tensor() for p in model.parameters()],
                     "ref": [p.detach() for p in ref.parameters()]}
    return out


class Holder(torch.nn.Module):
    """The params of a layout as a module (the state-dict API of torch.distributed.checkpoint wants one)."""

    def __init__(self, mesh, placements):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(distribute_tensor(p, mesh, pl))
                                          for p, pl in zip(full_params(torch.float32), placements)])


DCP_SAVE_AT = 10
DCP_OPTIMIZERS = ("adamw_clip", "lamb_clip", "lars")


def _dcp_run(world: int, ckpt: Path, save: bool) -> dict:
    """Steps 0..STEPS on the fsdp layout; ``save``: also checkpoints after DCP_SAVE_AT steps; else resumes there."""
    out = {}
    for name in DCP_OPTIMIZERS + ("adamw_int8",):
        factory = (lambda ps: FusedAdamW(ps, lr=1e-2, state_dtype="int8")) if name == "adamw_int8" \
            else OPTIMIZERS[name][0]
        mesh, placements = make_mesh("fsdp", world)
        model = Holder(mesh, placements)
        opt = factory(list(model.parameters()))
        path = str(ckpt / name)
        start = 0
        if not save:
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            start = DCP_SAVE_AT
        for step in range(start, STEPS):
            if save and step == DCP_SAVE_AT:
                dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                         checkpoint_id=path)
            for p, g, pl in zip(model.parameters(), full_grads(step, torch.float32), placements):
                p.grad = distribute_tensor(g, mesh, pl)
            opt.step()
        out[name] = [p.full_tensor() for p in model.parameters()]
    return out


SCENARIOS: Dict[str, Callable[..., dict]] = {
    "layouts": scenario_layouts,
    "fsdp_model": scenario_fsdp_model,
    "dcp_save": lambda world, workdir: _dcp_run(world, workdir, save=True),
    "dcp_load": lambda world, workdir: _dcp_run(world, workdir, save=False),
}


def main(rank: int, world: int, store: str, out_file: str, names: List[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    workdir = Path(out_file).parent
    results = {name: SCENARIOS[name](world, workdir) if name.startswith("dcp") else SCENARIOS[name](world)
               for name in names}
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
