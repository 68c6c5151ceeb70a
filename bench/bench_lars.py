"""FusedLARS against timm's Lars on the GPT-like param set (see conftest.py), and against FusedAdamW.

The "torch" column is timm's ``Lars`` (pure PyTorch, its foreach path); the "fused_adamw" provider
runs FusedAdamW on the same params, so the notes give LARS's time relative to a plain AdamW step.
LARS here: momentum 0.9, weight decay 1e-4 (so trust ratios are on), timm's trust coefficient.
Targets: >= 5x faster than timm (ratio <= 0.2x) and <= 1.3x FusedAdamW's time.

Byte model per param: the per-tensor norms |w| and |g| must be known before any update, so the
step takes two sweeps over memory:
  sweep 1 (norms)   read p 4 + read g 4                                  =  8 B
  sweep 2 (update)  read p, g, momentum 12 + write p, momentum 8        = 20 B   -> 28 B
The fused_adamw rows use AdamW's 28 B (bench_adamw.py).
"""
import pytest

from pytrain.optim import FusedAdamW, FusedLARS

timm_optim = pytest.importorskip("timm.optim", reason="timm (bench extra) not installed")

PROVIDERS = ("torch", "pytrain", "fused_adamw")
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=1e-4)
BYTES_PER_PARAM = {"lars_step": 28, "adamw_step": 28}
TARGET = "ratio <= 0.2x (>= 5x faster than timm); <= 1.3x fused_adamw"


def test_lars(provider, impl, param_set, measure):
    params = param_set.fresh()
    op = "adamw_step" if provider == "fused_adamw" else "lars_step"
    if provider == "torch":
        optimizer = timm_optim.Lars(params, **HYPER)
    elif provider == "fused_adamw":
        optimizer = FusedAdamW(params)
    else:
        optimizer = FusedLARS(params, **HYPER, impl=impl)
    measure(optimizer.step, case="lars", provider=provider, bytes_moved=BYTES_PER_PARAM[op] * param_set.numel, op=op,
            optimizer=optimizer, impl=impl, baseline="timm.optim.Lars", target=TARGET)
