"""FusedLAMB against timm's Lamb on the GPT-like param set (see conftest.py), and against FusedAdamW.

The "torch" column is timm's ``Lamb`` (pure PyTorch, its foreach path); the "fused_adamw" provider
runs FusedAdamW on the same params, so the notes give LAMB's time relative to a plain AdamW step.
Both use the defaults they share: lr 1e-3, weight decay 0.01, gradients clipped to global norm 1.0.
Targets: >= 5x faster than timm (ratio <= 0.2x) and <= 1.3x FusedAdamW's time.

Byte model per param: the clip factor needs the global gradient norm, and the trust ratio
|w| / |u| needs the norm of the whole update u before any param moves, so three sweeps:
  global norm       read g                                               =  4 B
  sweep 1 (moments) read p, g, m, v 16 + write m, v 8 (norms of w, u)   = 24 B
  sweep 2 (update)  read p, m, v 12 (recompute u) + write p 4            = 16 B   -> 44 B
The fused_adamw rows use AdamW's 28 B (bench_adamw.py).
"""
import pytest

from pytrain.optim import FusedAdamW, FusedLAMB

timm_optim = pytest.importorskip("timm.optim", reason="timm (bench extra) not installed")

PROVIDERS = ("torch", "pytrain", "fused_adamw")
HYPER = dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
BYTES_PER_PARAM = {"lamb_step": 44, "adamw_step": 28}
TARGET = "ratio <= 0.2x (>= 5x faster than timm); <= 1.3x fused_adamw"


def test_lamb(provider, impl, param_set, measure):
    params = param_set.fresh()
    op = "adamw_step" if provider == "fused_adamw" else "lamb_step"
    if provider == "torch":
        optimizer = timm_optim.Lamb(params, **HYPER)
    elif provider == "fused_adamw":
        optimizer = FusedAdamW(params)
    else:
        optimizer = FusedLAMB(params, **HYPER, impl=impl)
    measure(optimizer.step, case="lamb", provider=provider, bytes_moved=BYTES_PER_PARAM[op] * param_set.numel, op=op,
            optimizer=optimizer, impl=impl, baseline="timm.optim.Lamb", target=TARGET)
