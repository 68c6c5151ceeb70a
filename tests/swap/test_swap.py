"""pytrain.swap / unswap on plain torch and timm models: same outputs and gradients, explicit declines,
bit-identical restore, torch.compile, and the report."""
import copy

import pytest
import torch
from torch import nn

import pytrain
from pytrain.nn import MultiheadAttention
from pytrain.swap import ROUTED, SwapReport
from pytrain.testing.tolerances import ATTENTION_ATOL
from pytrain.testing.swap_models import (assert_identical, assert_swap_matches, outputs_and_grads, tiny_encoder,
                                         tiny_vit)

L = 24


def _encoder_forward(mask=None, is_causal=False):
    x = torch.randn(2, L, 64, generator=torch.Generator().manual_seed(3))
    return lambda model: model(x.to(next(model.parameters()).dtype), mask=mask, is_causal=is_causal)


def _swapped(model):
    ours = copy.deepcopy(model)
    return ours, pytrain.swap(ours)


@pytest.mark.parametrize("causal", [False, True])
def test_transformer_encoder_matches_and_unswaps(causal):
    model = tiny_encoder()
    mask = nn.Transformer.generate_square_subsequent_mask(L) if causal else None
    forward = _encoder_forward(mask, causal)
    ours, report = _swapped(model)
    assert all(isinstance(layer.self_attn, MultiheadAttention) for layer in ours.layers)
    assert_swap_matches(model, ours, forward)
    assert report.declined_calls == {} and report.calls[("layers.0.self_attn", ROUTED)] == 1
    pytrain.unswap(ours)
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in ours.layers)
    assert_identical(outputs_and_grads(ours, forward), outputs_and_grads(model, forward))


def test_swap_keeps_parameters_and_state_dict():
    model = tiny_encoder()
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    pytrain.swap(model)
    assert list(model.parameters()) == params  # the same objects: an optimizer built before still works
    assert model.state_dict().keys() == state.keys()
    pytrain.unswap(model)


def test_arbitrary_additive_mask_is_declined_and_reported():
    model = tiny_encoder()
    mask = torch.randn(L, L, generator=torch.Generator().manual_seed(5))  # an attention bias, not a pattern
    forward = _encoder_forward(mask)
    ours, report = _swapped(model)
    assert_identical(outputs_and_grads(ours, forward), outputs_and_grads(model, forward))  # PyTorch's path
    declined = report.declined_calls
    assert set(declined) == {(f"layers.{i}.self_attn", "arbitrary attn_mask (only no mask or the causal mask)")
                             for i in range(2)}
    assert "calls that went to PyTorch" in str(report) and "arbitrary attn_mask" in str(report)


def test_unsupported_module_is_kept_with_reason():
    model = nn.Sequential(nn.MultiheadAttention(32, 4), nn.MultiheadAttention(64, 4, add_bias_kv=True),
                          nn.MultiheadAttention(64, 4))
    report = pytrain.swap(model)
    assert [type(m) is nn.MultiheadAttention for m in model] == [True, True, False]
    assert [e.note for e in report.kept] == ["head dim 8 outside [16, 256]", "add_bias_kv / add_zero_attn"]
    assert [e.path for e in report.swapped] == ["2"]
    text = str(report)
    assert text.splitlines()[0].startswith("pytrain.swap: 1 swapped, 2 kept")
    assert "head dim 8 outside" in text and "pytrain.nn.MultiheadAttention" in text
    pytrain.unswap(model)
    assert all(type(m) is nn.MultiheadAttention for m in model)


def test_timm_vit_matches_through_sdpa_and_unswaps():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    def forward(m):
        return m(x.to(next(m.parameters()).dtype))

    ours, report = _swapped(model)
    assert [e.path for e in report.swapped] == ["blocks.0.attn", "blocks.1.attn"]
    assert_swap_matches(model, ours, forward)
    assert report.calls[("blocks.1.attn", ROUTED)] == 1 and not report.declined_calls
    pytrain.unswap(ours)
    assert "forward" not in ours.blocks[0].attn.__dict__
    assert_identical(outputs_and_grads(ours, forward), outputs_and_grads(model, forward))


def test_timm_attention_computed_by_hand_is_kept():
    model = tiny_vit()
    model.blocks[0].attn.fused_attn = False
    report = pytrain.swap(model)
    assert [e.path for e in report.kept] == ["blocks.0.attn"] and "fused_attn=False" in report.kept[0].note
    pytrain.unswap(model)


def test_swap_errors():
    model = tiny_encoder()
    with pytest.raises(ValueError, match="inplace=True"):
        pytrain.swap(model, inplace=False)
    pytrain.swap(model)
    with pytest.raises(RuntimeError, match="already swapped"):
        pytrain.swap(model)
    pytrain.unswap(model)
    with pytest.raises(RuntimeError, match="not swapped"):
        pytrain.unswap(model)
    for fn in (pytrain.swap, pytrain.unswap):
        for not_a_model in ("model", None, model.state_dict()):
            with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got (str|NoneType|OrderedDict)"):
                fn(not_a_model)


def test_swap_converts_the_optimizer():
    model = tiny_encoder()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    report = pytrain.swap(model, optimizer=opt)
    assert isinstance(report.optimizer, pytrain.optim.FusedAdamW)
    assert "(optimizer)" in str(report) and "FusedAdamW" in str(report)
    pytrain.unswap(model)


def test_empty_report_prints():
    text = str(SwapReport())
    assert text.startswith("pytrain.swap: 0 swapped, 0 kept; calls so far: 0 ran pytrain, 0 went to PyTorch")


def test_torch_compile_after_swap_runs_and_matches():
    model = tiny_encoder(layers=1)
    forward = _encoder_forward(is_causal=True, mask=nn.Transformer.generate_square_subsequent_mask(L))
    pytrain.swap(model)
    exact = outputs_and_grads(copy.deepcopy(model).double(), forward)
    eager = outputs_and_grads(model, forward)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(forward)(model)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(model, fullgraph=True)
    ours = {name.removeprefix("_orig_mod."): t for name, t in outputs_and_grads(compiled, forward).items()}
    # one graph: inductor fuses and orders sums its own way, so compiled and eager agree to rounding; both
    # are held to the float64 answer (as assert_swap_matches does)
    for name, e in exact.items():
        ours_err, eager_err = (ours[name] - e).abs().max().item(), (eager[name] - e).abs().max().item()
        assert ours_err <= 2 * eager_err + ATTENTION_ATOL[torch.float32], f"{name}: {ours_err:.3g} vs {eager_err:.3g}"
