"""FusedAdamW against torch.optim.AdamW(fused=True) on the GPT-like param set (GPT_SHAPES: 70.8M fp32
params in 50 tensors on the CPU, scaled 2x on CUDA; see conftest.py).

Both providers run in the same process on the same params and gradients; each case starts from
fresh copies.  Cases (torch is always its fused fp32 AdamW, the fastest step torch offers):
  fp32        FusedAdamW                         vs torch fused AdamW
  clip        FusedAdamW(max_grad_norm=1.0)      vs clip_grad_norm_(1.0) + torch fused AdamW
  bf16 state  FusedAdamW(state_dtype=bfloat16)   vs torch fused AdamW (fp32 state)
  int8 state  FusedAdamW(state_dtype="int8")     vs torch fused AdamW (fp32 state)

Byte model: the fewest bytes pytrain's step must move per param, times N params (GB/s and the
fraction of the copy ceiling are computed from it):
  fp32        read p 4 + read g 4 + read m,v 8 + write p 4 + write m,v 8             = 28 B
  clip        fp32 + one read of g for the global norm before the step              = 32 B
              (torch moves 40 B: norm read 4 + clip_grad_norm_ rewrites g 8 + step 28)
  bf16 state  read p, g 8 + read/write bf16 m,v 4 + 4 + write p 4                   = 20 B
  int8 state  read p, g 8 + read/write int8 m + uint8 v codes 2 + 2 + write p 4
              + two fp32 scales per 256-param block, read and written 2*2*4/256     = 16.0625 B
State bytes are reported too: torch's fp32 moments take 8 B/param; int8 targets <= 0.3x of that.
"""
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

from pytrain.optim import FusedAdamW

PROVIDERS = ("torch", "pytrain")
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


@dataclass(frozen=True)
class Case:
    bytes_per_param: float
    options: dict = field(default_factory=dict)  # FusedAdamW's extra arguments
    clip: Optional[float] = None  # torch side: clip_grad_norm_ to this before its step
    target: str = ""


CASES = {
    "fp32": Case(28),
    "clip": Case(32, dict(max_grad_norm=1.0), clip=1.0),
    "bf16 state": Case(20, dict(state_dtype=torch.bfloat16)),
    "int8 state": Case(16 + 16 / 256, dict(state_dtype="int8"), target="state <= 0.3x of torch fp32"),
}


@pytest.mark.parametrize("case", CASES)
def test_adamw(case, provider, impl, param_set, measure):
    spec = CASES[case]
    params = param_set.fresh()
    if provider == "torch":
        optimizer = torch.optim.AdamW(params, fused=True, **HYPER)
        if spec.clip is None:
            step, baseline = optimizer.step, "torch.optim.AdamW(fused=True)"
        else:
            def step():
                torch.nn.utils.clip_grad_norm_(params, spec.clip)
                optimizer.step()
            baseline = "clip_grad_norm_ + torch.optim.AdamW(fused=True)"
    else:
        optimizer = FusedAdamW(params, **HYPER, **spec.options, impl=impl)
        step, baseline = optimizer.step, ""
    measure(step, case=f"adamw {case}", provider=provider, bytes_moved=spec.bytes_per_param * param_set.numel,
            op="adamw_step", optimizer=optimizer, impl=impl, baseline=baseline, target=spec.target)
