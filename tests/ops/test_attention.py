"""flash_attention on every backend against a float64 reference.

The rule (FlashAttention's tests): a backend's error against the float64 reference is at
most twice PyTorch's own ``scaled_dot_product_attention`` error in the same dtype (given the
same mask), plus an absolute per-dtype slack; outputs and the gradients of q, k and v.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import pytrain
from pytrain.ops import flash_attention
from pytrain.ops.attention import _window_sides
from pytrain.ops import attention as attention_op
from pytrain.testing.attention import check_any_finite_scores
from pytrain.testing.backends import impl_or_skip
from pytrain.testing.tolerances import ATTENTION_ATOL

# (batch, heads, kv_heads, seqlen_q, seqlen_k, headdim)
CPU_SHAPES = [
    (1, 2, 2, 1, 1, 64),
    (2, 4, 2, 17, 17, 40),
    (1, 4, 1, 77, 77, 80),
    (1, 2, 2, 1000, 1000, 64),
    (1, 1, 1, 1023, 1023, 32),
    (1, 2, 1, 77, 1023, 128),
    (1, 2, 2, 100, 50, 96),
    (1, 1, 1, 65, 65, 256),
    (2, 2, 2, 33, 33, 16),
]
# The Triton interpreter is slow: small shapes, fp32/fp16 (its bf16 is not faithful).
TRITON_SHAPES = [(1, 2, 2, 1, 1, 64), (2, 4, 2, 17, 17, 40), (1, 2, 1, 33, 70, 80), (1, 2, 2, 50, 20, 32)]
WINDOWS = [(16, 0), (8, 8), (None, 5)]


def _inputs(shape, dtype, seed=0):
    b, h, hkv, lq, lk, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    grad = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v)], grad


def _run(fn, qkv, grad):
    leaves = [t.detach().clone().requires_grad_() for t in qkv]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _sdpa_with_mask(causal, window):
    """PyTorch's SDPA in the test dtype, with the same mask as an explicit boolean attn_mask."""
    left, right = _window_sides(window)

    def fn(q, k, v):
        group = q.shape[1] // k.shape[1]
        mask = attention_op.allowed_mask(q.shape[2], k.shape[2], causal, left, right)
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                             attn_mask=mask)
        return torch.where(mask.any(-1)[:, None], out, 0.0)  # SDPA leaves rows with no key NaN

    return fn


def check_against_reference(impl, shape, dtype, causal, window=None):
    qkv, grad = _inputs(shape, dtype)
    exact = _run(lambda q, k, v: flash_attention(q, k, v, causal=causal, window=window, impl="reference"),
                 [t.double() for t in qkv], grad)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, causal=causal, window=window, impl=impl), qkv, grad)
    torch_same_dtype = _run(_sdpa_with_mask(causal, window), qkv, grad)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, torch_same_dtype, exact):
        assert a.dtype == dtype and a.shape == e.shape, name
        ours_err = (a.double() - e).abs().max().item()
        torch_err = (t.double() - e).abs().max().item()
        assert ours_err <= 2 * torch_err + ATTENTION_ATOL[dtype], \
            f"{name}: error {ours_err:.3g} vs torch's {torch_err:.3g} (dtype {dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_cpu_matches_reference(shape, causal, dtype):
    impl_or_skip("attention_fwd", "cpu")
    check_against_reference("cpu", shape, dtype, causal)


@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [CPU_SHAPES[2], CPU_SHAPES[5], CPU_SHAPES[6]], ids=str)
def test_cpu_sliding_window(shape, causal, window):
    impl_or_skip("attention_fwd", "cpu")
    check_against_reference("cpu", shape, torch.float32, causal, window)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_matches_reference(shape, causal, dtype):
    impl_or_skip("attention_fwd", "triton")
    check_against_reference("triton", shape, dtype, causal)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_window_small(impl, window):
    impl_or_skip("attention_fwd", impl)
    check_against_reference(impl, TRITON_SHAPES[2], torch.float32, True, window)
    check_against_reference(impl, TRITON_SHAPES[3], torch.float32, False, window)


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_dropout_matches_reference_mask(impl):
    """Every backend draws the same stateless dropout mask from the seed, forward and backward."""
    impl_or_skip("attention_fwd", impl)
    qkv, grad = _inputs((1, 2, 1, 33, 40, 32), torch.float32)
    kwargs = dict(causal=True, dropout_p=0.3, seed=1234)
    exact = _run(lambda q, k, v: flash_attention(q, k, v, impl="reference", **kwargs), [t.double() for t in qkv],
                 grad)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, impl=impl, **kwargs), qkv, grad)
    for a, e in zip(ours, exact):
        torch.testing.assert_close(a.double(), e, atol=1e-5, rtol=1e-5)
    no_drop = _run(lambda q, k, v: flash_attention(q, k, v, impl=impl, causal=True), qkv, grad)
    assert not torch.allclose(ours[0], no_drop[0])


def test_dropout_keeps_the_expected_fraction():
    keep = attention_op.dropout_keep(99, torch.arange(16).view(16, 1, 1), torch.arange(64).view(1, 64, 1),
                                      torch.arange(64).view(1, 1, 64), 0.25)
    assert abs(keep.double().mean().item() - 0.75) < 0.01


def test_matches_sdpa_causal_and_gqa_default_scale():
    qkv, _ = _inputs((2, 4, 2, 50, 50, 64), torch.float32)
    q, k, v = qkv
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(flash_attention(q, k, v, causal=True), expected, atol=1e-5, rtol=1e-5)


def test_lse_is_logsumexp_of_scores():
    qkv, _ = _inputs((1, 2, 2, 20, 30, 32), torch.float32)
    q, k, v = qkv
    _, lse = flash_attention(q, k, v, return_lse=True, scale=0.3)
    torch.testing.assert_close(lse, torch.logsumexp(0.3 * q @ k.transpose(-1, -2), dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["cpu", "triton", "reference"])
def test_rows_without_keys_give_zero_and_finite_grads(impl):
    impl_or_skip("attention_fwd", impl)
    qkv, grad = _inputs((1, 1, 1, 6, 3, 32), torch.float32)
    out, dq, dk, dv = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, impl=impl), qkv, grad)
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 32)) and torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_cpu_is_deterministic():
    impl_or_skip("attention_fwd", "cpu")
    qkv, grad = _inputs((2, 4, 2, 300, 300, 64), torch.float32)
    first = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="cpu"), qkv, grad)
    second = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="cpu"), qkv, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_nan_propagates(impl):
    impl_or_skip("attention_fwd", impl)
    (q, k, v), _ = _inputs((1, 1, 1, 8, 8, 16), torch.float32)
    q[0, 0, 3, 0] = math.nan
    out = flash_attention(q, k, v, impl=impl)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isfinite(out[0, 0, :3]).all()


def test_non_contiguous_inputs_are_handled():
    qkv, _ = _inputs((2, 3, 3, 17, 17, 32), torch.float32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv)  # (B, L, H, D) storage
    assert not q.is_contiguous()
    torch.testing.assert_close(flash_attention(q, k, v), flash_attention(*qkv))


def test_empty_inputs():
    q = torch.randn(2, 4, 0, 32, requires_grad=True)
    out = flash_attention(q, torch.randn(2, 4, 5, 32), torch.randn(2, 4, 5, 32))
    assert out.shape == (2, 4, 0, 32)
    out, lse = flash_attention(torch.randn(1, 2, 3, 32), torch.randn(1, 2, 0, 32), torch.randn(1, 2, 0, 32),
                               return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 3, 32)) and torch.isinf(lse).all()


@pytest.mark.parametrize("q_shape,k_shape,message", [
    ((2, 4, 8, 32), (3, 4, 8, 32), "batch sizes differ"),
    ((2, 4, 8, 32), (2, 3, 8, 32), "multiple of k/v heads"),
    ((2, 4, 8, 32), (2, 4, 8, 64), "head dims differ"),
    ((2, 4, 8, 8), (2, 4, 8, 8), r"head dim 8 outside \[16, 256\]"),
    ((2, 4, 8, 512), (2, 4, 8, 512), r"head dim 512 outside \[16, 256\]"),
    ((4, 8, 32), (4, 8, 32), "must be 4-D"),
])
def test_bad_shapes_are_rejected(q_shape, k_shape, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape))


def test_bad_arguments_are_rejected():
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q, q.half(), q)
    with pytest.raises(TypeError, match="not supported"):
        flash_attention(q.int(), q.int(), q.int())
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, q, q, window=(-3, 2))
    with pytest.raises(ValueError, match="window"):
        flash_attention(q, q, q, window=(1, 2, 3))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, q, q, dropout_p=1.0)
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, q, q[:, :, :4])
    with pytest.raises(RuntimeError, match="one device"):
        flash_attention(q, q.to("meta"), q)


@pytest.mark.parametrize("impl", ["cpu", "triton"])
@pytest.mark.parametrize("case", ["scale3e9-causal", "scale-3e9-window", "inputs1e15-cross-causal"])
def test_any_finite_scores(impl, case):
    """Scores far past exp's range (the CPU kernel gave NaN / garbage from a score range of ~5e9): stable forward
    and backward, against the float64 reference, rows with no key included (Lq > Lk causal)."""
    impl_or_skip("attention_fwd", impl)
    shape, kwargs, magnitude = {
        "scale3e9-causal": ((1, 2, 1, 70, 70, 32), dict(scale=3e9, causal=True), 1.0),
        "scale-3e9-window": ((1, 2, 2, 50, 70, 40), dict(scale=-3e9, window=(5, 3)), 1.0),
        "inputs1e15-cross-causal": ((2, 2, 2, 45, 33, 64), dict(causal=True), 1e15),
    }[case]
    (q, k, v), grad = _inputs(shape, torch.float32)
    check_any_finite_scores(impl, q * magnitude, k * magnitude, v, grad.float(), **kwargs)


def test_launch_grid_fits_cuda_limits_for_many_heads():
    """batch * heads = 70,000 (> 65,535, CUDA's limit on grid axes 1 and 2) with every kernel's tile: the grid of
    every attention launch is 1-D, within axis 0's 2^31 - 1 programs (batch * heads once sat on axis 1)."""
    attention_kernels = pytest.importorskip("pytrain.kernels.attention")
    blocks = {attention_kernels.PREPROCESS_BLOCK_M}
    for tiles in attention_kernels._CONFIGS["tiles"].values():
        for by_dtype in tiles.values():
            blocks |= {size for bm, bn, _, _ in by_dtype.values() for size in (bm, bn)}
    for block in sorted(blocks):
        for rows in (1, 4096, 2**16):
            grid = attention_kernels.launch_grid(rows, block, 70_000)
            assert len(grid) == 1 and grid[0] == -(-rows // block) * 70_000 <= 2**31 - 1, (rows, block, grid)
    with pytest.raises(RuntimeError, match="over CUDA's grid limit"):
        attention_kernels.launch_grid(2**31, 16, 70_000)


# ------------------------------------------------------------------------ CPU ISA paths (cpu/attention_isa.h)
def _cpu_path_or_skip(path, monkeypatch):
    """Force the CPU attention path of bf16 inputs (PYTRAIN_CPU_ATTENTION_PATH), or skip where this CPU lacks it."""
    impl_or_skip("attention_fwd", "cpu")
    from pytrain import _extension

    ext, _ = _extension.load_extension()
    caps = ext.cpu_capabilities()
    needs = {"amx": ("amx_bf16", "AMX-BF16 (through oneDNN)"), "avx512_bf16": ("avx512bf16", "AVX512_BF16")}
    if path in needs and not caps[needs[path][0]]:
        pytest.skip(f"the {path} attention path needs {needs[path][1]}, which this CPU lacks")
    monkeypatch.setenv("PYTRAIN_CPU_ATTENTION_PATH", path)
    assert ext.cpu_attention_paths()["bfloat16"] == path
    assert ext.cpu_attention_paths()["float32"] == "fp32"


CPU_PATHS = ["amx", "avx512_bf16", "fp32"]


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [CPU_SHAPES[1], CPU_SHAPES[5], CPU_SHAPES[6], CPU_SHAPES[8]], ids=str)
def test_cpu_bf16_path_matches_reference(shape, causal, path, monkeypatch):
    _cpu_path_or_skip(path, monkeypatch)
    check_against_reference("cpu", shape, torch.bfloat16, causal)


@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_bf16_path_window_and_dropout(path, monkeypatch):
    """Masked tiles and dropout on each path: within twice the error of the reference run in bf16 itself."""
    _cpu_path_or_skip(path, monkeypatch)
    check_against_reference("cpu", CPU_SHAPES[2], torch.bfloat16, True, WINDOWS[1])
    qkv, grad = _inputs((1, 2, 1, 70, 90, 32), torch.bfloat16)
    kwargs = dict(causal=True, dropout_p=0.3, seed=1234)
    exact = _run(lambda q, k, v: flash_attention(q, k, v, impl="reference", **kwargs), [t.double() for t in qkv],
                 grad)
    in_dtype = _run(lambda q, k, v: flash_attention(q, k, v, impl="reference", **kwargs), qkv, grad)
    ours = _run(lambda q, k, v: flash_attention(q, k, v, impl="cpu", **kwargs), qkv, grad)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, in_dtype, exact):
        ours_err, ref_err = (a.double() - e).abs().max().item(), (t.double() - e).abs().max().item()
        assert ours_err <= 2 * ref_err + ATTENTION_ATOL[torch.bfloat16], f"{name}: {ours_err:.3g} vs {ref_err:.3g}"


def test_cpu_bf16_paths_are_deterministic(monkeypatch):
    _cpu_path_or_skip("amx", monkeypatch)
    qkv, grad = _inputs((2, 4, 2, 130, 130, 64), torch.bfloat16)
    first = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="cpu"), qkv, grad)
    second = _run(lambda q, k, v: flash_attention(q, k, v, causal=True, impl="cpu"), qkv, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_cpu_path_bad_value_is_rejected(monkeypatch):
    impl_or_skip("attention_fwd", "cpu")
    monkeypatch.setenv("PYTRAIN_CPU_ATTENTION_PATH", "sse9")
    (q, k, v), _ = _inputs((1, 1, 1, 4, 4, 16), torch.bfloat16)
    with pytest.raises(RuntimeError, match="PYTRAIN_CPU_ATTENTION_PATH must be one of"):
        flash_attention(q, k, v, impl="cpu")


# The fp32 path's vector width (PYTRAIN_CPU_FP32_LANES, cpu/attention_isa.h): 16 lanes run on any x86-64 CPU
# (slowly without AVX-512), so both widths are compared on every machine.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    dict(shape=CPU_SHAPES[1], kwargs=dict(causal=True)),
    dict(shape=CPU_SHAPES[2], kwargs=dict(causal=True, window=WINDOWS[1])),
    dict(shape=CPU_SHAPES[6], kwargs=dict(causal=False, dropout_p=0.3, seed=7)),
    dict(shape=(1, 2, 1, 130, 70, 72), kwargs=dict(causal=False, window=WINDOWS[2])),
], ids=["causal", "window", "dropout", "odd-window"])
def test_cpu_fp32_lanes_are_bit_identical(case, dtype, monkeypatch):
    """16 and 8 lanes change which registers hold the sums, never their order: out, dq, dk, dv bit for bit."""
    impl_or_skip("attention_fwd", "cpu")
    from pytrain import _extension

    ext, _ = _extension.load_extension()
    qkv, grad = _inputs(case["shape"], dtype, seed=3)
    results = {}
    for lanes in ("16", "8"):
        monkeypatch.setenv("PYTRAIN_CPU_FP32_LANES", lanes)
        assert ext.cpu_fp32_lanes() == int(lanes)
        results[lanes] = _run(lambda q, k, v: flash_attention(q, k, v, impl="cpu", **case["kwargs"]), qkv, grad)
    for name, wide, narrow in zip(("out", "dq", "dk", "dv"), results["16"], results["8"]):
        assert torch.equal(wide, narrow), f"{name}: 16 and 8 lanes differ by {(wide - narrow).abs().max().item():.3g}"


def test_cpu_fp32_lanes_default_and_bad_value(monkeypatch):
    impl_or_skip("attention_fwd", "cpu")
    from pytrain import _extension

    ext, _ = _extension.load_extension()
    monkeypatch.delenv("PYTRAIN_CPU_FP32_LANES", raising=False)
    lanes = 16 if ext.cpu_capabilities()["avx512f"] else 8
    assert ext.cpu_fp32_lanes() == lanes
    assert pytrain.info()["cpu_fp32_vectors"] == f"{lanes} lanes ({'zmm' if lanes == 16 else 'ymm'})"
    monkeypatch.setenv("PYTRAIN_CPU_FP32_LANES", "4")
    (q, k, v), _ = _inputs((1, 1, 1, 4, 4, 16), torch.float32)
    with pytest.raises(RuntimeError, match="PYTRAIN_CPU_FP32_LANES must be one of auto, 16, 8; got '4'"):
        flash_attention(q, k, v, impl="cpu")
