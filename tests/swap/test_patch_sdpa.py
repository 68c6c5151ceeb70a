"""pytrain.patch_sdpa: F.scaled_dot_product_attention routed to flash attention where it computes the same
thing, every other call passed to PyTorch unchanged and counted with its reason."""
import pytest
import torch
import torch.nn.functional as F

import pytrain
from pytrain.ops import flash_attention
from pytrain.swap import ROUTED, sdpa_patched
from pytrain.testing.tolerances import ATTENTION_ATOL

ORIGINAL = F.scaled_dot_product_attention


def _qkv(heads=4, kv_heads=4, lq=19, lk=19, d=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, h, n, d, generator=gen, dtype=dtype).requires_grad_()
            for h, n in ((heads, lq), (kv_heads, lk), (kv_heads, lk))]


def _out_and_grads(fn, qkv):
    out = fn(*qkv)
    out.backward(torch.ones_like(out))
    grads = [t.grad.clone() for t in qkv]
    for t in qkv:
        t.grad = None
    return [out.detach()] + grads


def test_context_routes_supported_calls_to_flash_attention():
    qkv = _qkv(heads=4, kv_heads=2)
    expected = _out_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=True), qkv)
    torch_result = _out_and_grads(lambda q, k, v: ORIGINAL(q, k, v, is_causal=True, enable_gqa=True), qkv)
    with pytrain.patch_sdpa() as report:
        assert sdpa_patched()
        got = _out_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                              enable_gqa=True), qkv)
    assert not sdpa_patched() and F.scaled_dot_product_attention is ORIGINAL
    for g, e, t in zip(got, expected, torch_result):
        assert torch.equal(g, e)  # it ran the kernel...
        torch.testing.assert_close(g, t, atol=ATTENTION_ATOL[torch.float32], rtol=1e-4)  # ...which agrees with SDPA
    assert report.calls == {("sdpa", ROUTED): 1}


@pytest.mark.parametrize("case, reason", [
    ("mask", "attn_mask given"),
    ("causal_lq_ne_lk", "is_causal with seqlen_q != seqlen_k"),
    ("head_dim_8", "head dim 8 outside"),
    ("3d", "3-D inputs"),
    ("float64", "float64"),
])
def test_unsupported_calls_go_to_pytorch_unchanged(case, reason):
    kwargs = {}
    qkv = _qkv(lk=23 if case == "causal_lq_ne_lk" else 19, d=8 if case == "head_dim_8" else 16,
               dtype=torch.float64 if case == "float64" else torch.float32)
    if case == "mask":
        kwargs["attn_mask"] = torch.randn(19, 19, generator=torch.Generator().manual_seed(1))  # additive bias
    if case == "causal_lq_ne_lk":
        kwargs["is_causal"] = True
    if case == "3d":
        qkv = [t.detach()[0].requires_grad_() for t in qkv]
    expected = _out_and_grads(lambda q, k, v: ORIGINAL(q, k, v, **kwargs), qkv)
    with pytrain.patch_sdpa() as report:
        got = _out_and_grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs), qkv)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    (where, why), = report.declined_calls
    assert where == "sdpa" and why.startswith(reason) and report.calls[(where, why)] == 1
    assert why in str(report)


@pytest.mark.parametrize("case", ["routed", "masked", "3d"])
def test_key_and_value_of_different_lengths_are_refused(case):
    """PyTorch's CPU SDPA accepts k of 23 positions with v of 19 and returns garbage; every patched call refuses,
    whichever way it would have gone (flash attention, or PyTorch for a mask or 3-D inputs)."""
    q, k, _ = _qkv(lk=23)
    v = _qkv()[2]
    kwargs = {"attn_mask": torch.zeros(19, 23)} if case == "masked" else {}
    if case == "3d":
        q, k, v = q[0], k[0], v[0]
    with pytrain.patch_sdpa() as report:
        with pytest.raises(ValueError, match=rf"key and value must have the same sequence length .*got key "
                                             rf"\({', '.join(map(str, k.shape))}\) and value "):
            F.scaled_dot_product_attention(q, k, v, **kwargs)
        F.scaled_dot_product_attention(q, k, k, **kwargs)  # lq 19 != lk 23 with k and v alike is fine
    assert sum(report.calls.values()) == 1


def test_nesting_counts_in_the_innermost_and_restores_on_error():
    q, k, v = _qkv()
    with pytrain.patch_sdpa() as outer:
        with pytest.raises(ZeroDivisionError):
            with pytrain.patch_sdpa(where="inner") as inner:
                F.scaled_dot_product_attention(q, k, v)
                1 / 0
        assert sdpa_patched()
        F.scaled_dot_product_attention(q, k, v)
    assert not sdpa_patched()
    assert inner.calls == {("inner", ROUTED): 1} and outer.calls == {("sdpa", ROUTED): 1}


def test_global_switch():
    q, k, v = _qkv()
    handle = pytrain.patch_sdpa()
    try:
        assert sdpa_patched()
        F.scaled_dot_product_attention(q, k, v)
        assert handle.report.calls == {("sdpa", ROUTED): 1}
    finally:
        pytrain.patch_sdpa(False)
    assert F.scaled_dot_product_attention is ORIGINAL


def test_autocast_bf16_inputs_are_cast_like_a_matmul():
    q, k, v = (t.detach() for t in _qkv())
    with torch.autocast("cpu", dtype=torch.bfloat16), pytrain.patch_sdpa() as report:
        out = F.scaled_dot_product_attention(q, k.bfloat16(), v.bfloat16(), is_causal=True)
    assert out.dtype == torch.bfloat16 and report.calls == {("sdpa", ROUTED): 1}
    exact = flash_attention(q.double(), k.double(), v.double(), causal=True, impl="reference")
    assert (out.double() - exact).abs().max() < 3e-2
