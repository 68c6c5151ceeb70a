"""FusedAdamW against torch.optim.AdamW(fused=True) on the same FSDP2-sharded (DTensor Shard(0)) params.

The GPT-like param set (GPT_SHAPES, see conftest.py) distributed with ``distribute_tensor(.., Shard(0))`` on a
1-rank gloo mesh in this process (the layout ``fully_shard`` gives each param; with one rank the local shard is
the whole tensor), so both providers run side by side in one process on the same values and the ratio measures
the per-step cost of stepping DTensors: pytrain's ``LocalView`` (local shards through its fused kernel, the
grad-norm reductions over the mesh) against torch's DTensor dispatch of its fused step.  Multi-rank scaling is
not measured here (one process).  Cases:
  fp32        FusedAdamW                         vs torch fused AdamW             (target <= 1.0x)
  clip        FusedAdamW(max_grad_norm=1.0)      vs clip_grad_norm_ + torch fused AdamW
  int8 state  FusedAdamW(state_dtype="int8")     vs torch fused AdamW (fp32 state) (target <= 0.8x)
Byte models as bench_adamw.py (per param: 28, 32, 16.0625 B).
"""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from pytrain.optim import FusedAdamW

HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
CASES = {  # name -> (bytes per param, FusedAdamW options, torch clip, target)
    "fp32": (28, {}, None, "<= 1.0x torch"),
    "clip": (32, dict(max_grad_norm=1.0), 1.0, "<= 1.0x torch"),
    "int8 state": (16 + 16 / 256, dict(state_dtype="int8"), None, "<= 0.8x torch"),
}


@pytest.fixture(scope="module")
def mesh(bench_device):
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo" if bench_device.type == "cpu" else "nccl", init_method=f"file://{store}",
                                rank=0, world_size=1)
    yield init_device_mesh(bench_device.type, (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES)
def test_sharded_adamw(case, provider, impl, param_set, measure, mesh):
    bytes_per_param, options, clip, target = CASES[case]
    params = []
    for p in param_set.fresh():
        q = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, (Shard(0),)))
        q.grad = distribute_tensor(p.grad, mesh, (Shard(0),))
        params.append(q)
    if provider == "torch":
        optimizer = torch.optim.AdamW(params, fused=True, **HYPER)
        baseline = "torch.optim.AdamW(fused=True) on DTensors"

        def step():
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
    else:
        optimizer = FusedAdamW(params, **HYPER, **options, impl=impl)
        step, baseline = optimizer.step, ""
    measure(step, case=f"fsdp2 adamw {case}", provider=provider, bytes_moved=bytes_per_param * param_set.numel,
            op="adamw_step", optimizer=None, impl=impl, baseline=baseline, target=target)
