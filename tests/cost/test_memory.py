"""Memory model vs the measured peak of a real training step on CPU, and the model's unit checks.

The measured model is a pre-LayerNorm GPT block stack in fp32 (attention written out: scores, softmax,
weighted values; GeLU MLP of width 4h; no dropout), trained with pytrain's FusedAdamW.  Peak tensor memory
is measured with ``PeakMemory`` (a dispatch mode counting live storages) over the second step, with
gradients kept allocated between steps (``zero_grad(set_to_none=False)``, as DDP's gradient buckets are).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pytrain.cost import (MemoryEstimate, PeakMemory, activation_memory, activation_peak, fsdp_unsharded,
                          memory_per_device, optimizer_state_bytes)
from pytrain.optim import FusedAdamW

SEQ, BATCH, HIDDEN, HEADS, LAYERS = 128, 4, 128, 4, 4
TOLERANCE = 0.20


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv, self.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // self.heads), dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, s, h))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Stack(nn.Module):
    def __init__(self, recompute):
        super().__init__()
        self.blocks = nn.ModuleList(Block(HIDDEN, HEADS) for _ in range(LAYERS))
        self.recompute = recompute

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        return x


def _measured_peak(recompute: bool, state_dtype) -> tuple:
    """(peak bytes over the second training step, parameter count)."""
    x = torch.randn(BATCH, SEQ, HIDDEN)
    with PeakMemory() as mem:
        model = Stack(recompute)
        opt = FusedAdamW(model.parameters(), lr=1e-3, state_dtype=state_dtype)
        for step in range(2):
            if step == 1:
                mem.peak = mem.current
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    return mem.peak, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("recompute, state_dtype, state_name", [
    (False, torch.float32, "fp32"), (False, "int8", "int8"), (True, torch.float32, "fp32")])
def test_peak_memory_matches_model(recompute, state_dtype, state_name):
    peak, n_params = _measured_peak(recompute, state_dtype)
    acts = dict(seq=SEQ, micro_batch=BATCH, hidden=HIDDEN, heads=HEADS, layers=LAYERS, bytes_per_element=4,
                dropout=False, recompute="full" if recompute else "none")
    predicted = memory_per_device(n_params, state_dtype=state_name, activations=acts).total
    assert abs(predicted / peak - 1) <= TOLERANCE, f"predicted {predicted / 2**20:.2f}, measured {peak / 2**20:.2f} MiB"


def test_peak_memory_counts_frees():
    with PeakMemory() as mem:
        a = torch.empty(1000)
        b = torch.empty(500)
        del a
        c = b.view(50, 10)  # a view: the same storage, counted once
        d = torch.empty(2000)
    assert mem.peak == 4 * 2500 and mem.current == 4 * 2500
    del b, c, d
    assert mem.current == 0


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"])
def test_optimizer_state_bytes_match_fused_adamw(state_dtype):
    model = nn.Sequential(nn.Linear(300, 257), nn.Linear(257, 3))
    opt = FusedAdamW(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    model(torch.randn(2, 300)).sum().backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    n = sum(p.numel() for p in model.parameters())
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", "int8": "int8"}[state_dtype]
    assert optimizer_state_bytes(n, "adamw", name) == pytest.approx(held, rel=0.01)


def test_korthikanti_formula():
    s, b, h, a = 2048, 1, 12288, 96  # GPT-3 175B layer (Korthikanti et al. 2022, Table 2 setting)
    assert activation_memory(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    assert activation_memory(s, b, h, a, recompute="selective") == 34 * s * b * h
    assert activation_memory(s, b, h, a, recompute="full", layers=96) == 96 * 2 * s * b * h
    assert activation_memory(s, b, h, a, flash=True) < activation_memory(s, b, h, a, recompute="selective") * 1.1
    t = 8  # their Eq. 2: tensor parallelism without sequence parallelism
    assert activation_memory(s, b, h, a, tp=t) == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    v = 51200  # output layer, Section 4.3: final norm and projection inputs, fp32 log-softmax of the logits
    assert activation_memory(s, b, h, a, vocab=v) - activation_memory(s, b, h, a) == 4 * s * b * h + 4 * s * b * v


def test_activation_peak_and_fsdp_buffers():
    s, b, h, a, e = 256, 4, 256, 4, 4
    esbh = e * s * b * h
    shape = dict(bytes_per_element=e, dropout=False, flash=True)
    layer = activation_memory(s, b, h, a, **shape)
    # the last layer's GeLU backward: the GeLU input and output gradients and the residual's, less the GeLU output
    assert activation_peak(s, b, h, a, 3, **shape) == 3 * layer + 5 * esbh
    assert activation_peak(s, b, h, a, 3, tp=2, **shape) == activation_memory(s, b, h, a, 3, tp=2, **shape) + 3 * esbh
    # the output layer's activations are freed by then; the forward's stored total is the floor
    assert activation_peak(s, b, h, a, 3, vocab=64, **shape) == 3 * layer + 5 * esbh
    assert activation_peak(s, b, h, a, 1, vocab=10**6, **shape) == activation_memory(s, b, h, a, 1, vocab=10**6,
                                                                                      **shape)
    full = activation_peak(s, b, h, a, 3, recompute="full", **shape)
    assert full == 3 * esbh + (layer - esbh) + 5 * esbh  # the recomputed layer, whose input is stored already
    assert memory_per_device(10, activations=dict(seq=s, micro_batch=b, hidden=h, heads=a, layers=3,
                                                  recompute="full", **shape)).activations == full
    assert fsdp_unsharded(10, 3) == 4 * (2 * 10 + 3) + 4 * 3
    assert fsdp_unsharded(10, 3, param_bytes=2, grad_bytes=4, prefetch=0) == 2 * 13 + 4 * 3


def test_model_state_bytes():
    n = 10**9
    assert memory_per_device(n).params + memory_per_device(n).grads + memory_per_device(n).optimizer == 16 * n
    mixed = memory_per_device(n, param_bytes=2, master_weights=True)  # ZeRO paper: 2 + 2 + 12 = 16 B/param
    assert mixed.params + mixed.grads + mixed.optimizer == 16 * n
    assert optimizer_state_bytes(n, "adamw", "int8") == pytest.approx(2 * n, rel=0.02)
    z = [memory_per_device(n, param_bytes=2, master_weights=True, zero_stage=k, dp=64) for k in range(4)]
    assert z[1].optimizer == z[0].optimizer / 64 and z[1].grads == z[0].grads
    assert z[2].grads == z[0].grads / 64 and z[2].params == z[0].params
    assert z[3].params == z[0].params / 64
    assert [m.total for m in z] == sorted((m.total for m in z), reverse=True)
    assert memory_per_device(n, ddp_buckets=True).grads == 2 * memory_per_device(n).grads  # .grad + DDP's buckets


@pytest.mark.parametrize("call, match", [
    (lambda: optimizer_state_bytes(10, "adagrad"), "unknown optimizer"),
    (lambda: optimizer_state_bytes(10, "adamw", "int4"), "unknown state_dtype"),
    (lambda: optimizer_state_bytes(-1), "n_params"),
    (lambda: activation_memory(0, 1, 64, 4), "seq"),
    (lambda: activation_memory(8, 1, 65, 4), "divisible"),
    (lambda: activation_memory(8, 1, 64, 4, recompute="some"), "recompute"),
    (lambda: memory_per_device(10, zero_stage=4), "zero_stage"),
    (lambda: memory_per_device(10, dp=0), "dp"),
    (lambda: activation_memory(8, 1, 64, 4, tp=3), "tp"),
    (lambda: activation_peak(8, 1, 64, 4, recompute="some"), "recompute"),
    (lambda: fsdp_unsharded(-1, 0), "block_params"),
    (lambda: fsdp_unsharded(1, 0, prefetch=-1), "prefetch"),
    (lambda: activation_memory(8, 1, 64, 4, vocab=-1), "vocab"),
    (lambda: memory_per_device(10, zero_stage=1, dp=2, ddp_buckets=True), "ddp_buckets"),
])
def test_memory_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_memory_estimate_repr_is_in_gib():
    assert repr(MemoryEstimate(2 * 2**30, 2**30, 3 * 2**29, 0.0)) == (
        "MemoryEstimate(4.50 GiB: params 2.00, grads 1.00, optimizer 1.50, activations 0.00 GiB)")
