"""pytrain.nn.MultiheadAttention as a drop-in for torch.nn.MultiheadAttention, and the FlashAttention module."""
import re
import warnings

import pytest
import torch

import pytrain
from pytrain.nn import FlashAttention, MultiheadAttention


def _pair(batch_first=True, **kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(64, 4, batch_first=batch_first, **kwargs)
    ours = MultiheadAttention(64, 4, batch_first=batch_first, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _outputs_and_grads(module, x, **kwargs):
    module.zero_grad()
    out, weights = module(x, x, x, **kwargs)
    out.square().sum().backward()
    return out.detach(), weights, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "is_causal", "causal_attn_mask"])
def test_matches_torch_outputs_and_param_grads(batch_first, mask):
    ours, theirs = _pair(batch_first)
    x = torch.randn(3, 37, 64) if batch_first else torch.randn(37, 3, 64)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(37)
    kwargs = {"none": {}, "is_causal": dict(attn_mask=causal, is_causal=True),
              "causal_attn_mask": dict(attn_mask=causal)}[mask]
    ours_out, ours_w, ours_g = _outputs_and_grads(ours, x, need_weights=False, **kwargs)
    theirs_out, _, theirs_g = _outputs_and_grads(theirs, x, need_weights=False, **kwargs)
    assert ours_w is None
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=1e-4)
    for name in theirs_g:
        torch.testing.assert_close(ours_g[name], theirs_g[name], atol=1e-4, rtol=1e-4, msg=name)
    assert ours.decline_reason(x, None, False, kwargs.get("attn_mask"), kwargs.get("is_causal", False)) is None


def test_separate_kdim_vdim_and_unbatched():
    ours, theirs = _pair(kdim=32, vdim=48)
    q, k, v = torch.randn(2, 9, 64), torch.randn(2, 11, 32), torch.randn(2, 11, 48)
    torch.testing.assert_close(ours(q, k, v, need_weights=False)[0], theirs(q, k, v, need_weights=False)[0],
                               atol=1e-5, rtol=1e-4)
    ours, theirs = _pair()
    x = torch.randn(9, 64)
    torch.testing.assert_close(ours(x, x, x, need_weights=False)[0], theirs(x, x, x, need_weights=False)[0],
                               atol=1e-5, rtol=1e-4)


def test_need_weights_falls_back_with_a_warning():
    ours, theirs = _pair()
    x = torch.randn(2, 5, 64)
    MultiheadAttention._warned_need_weights = False
    with pytest.warns(UserWarning, match="need_weights=True falls back"):
        out, weights = ours(x, x, x)
    expected_out, expected_weights = theirs(x, x, x)
    assert torch.equal(out, expected_out) and torch.equal(weights, expected_weights)


def test_arbitrary_mask_is_declined_and_passed_to_torch():
    ours, theirs = _pair()
    x = torch.randn(2, 6, 64)
    mask = torch.randn(6, 6)
    assert "arbitrary attn_mask" in ours.decline_reason(x, None, False, mask, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ours(x, x, x, attn_mask=mask, need_weights=False)[0],
                           theirs(x, x, x, attn_mask=mask, need_weights=False)[0])


@pytest.mark.parametrize("case", ["square_mask_cross", "is_causal_no_mask", "is_causal_cross"])
def test_masks_follow_torch_for_cross_attention(case):
    """torch raises for an (L, L) mask when S != L and for is_causal without a mask; with is_causal and S != L it
    applies its own (top-left) causal mask: the same calls give the same errors and results here."""
    ours, theirs = _pair()
    q, kv = torch.randn(2, 5, 64), torch.randn(2, 7, 64)
    square = torch.nn.Transformer.generate_square_subsequent_mask(5)
    kwargs = {"square_mask_cross": dict(attn_mask=square), "is_causal_no_mask": dict(is_causal=True),
              "is_causal_cross": dict(attn_mask=square, is_causal=True)}[case]
    if case == "is_causal_no_mask":
        kv = q
    try:
        expected = theirs(q, kv, kv, need_weights=False, **kwargs)[0]
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match=re.escape(str(error))):
            ours(q, kv, kv, need_weights=False, **kwargs)
        assert case != "is_causal_cross"
    else:
        assert case == "is_causal_cross"
        torch.testing.assert_close(ours(q, kv, kv, need_weights=False, **kwargs)[0], expected)


def test_inside_transformer_encoder_layer():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    ours = MultiheadAttention(64, 4, batch_first=True)
    ours.load_state_dict(layer.self_attn.state_dict())
    x = torch.randn(2, 13, 64)
    expected = layer(x)
    layer.self_attn = ours
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)


def test_flash_attention_module_dropout_only_in_training():
    module = FlashAttention(causal=True, dropout=0.5)
    q = torch.randn(1, 2, 16, 32)
    expected = pytrain.ops.flash_attention(q, q, q, causal=True)
    assert torch.equal(module.eval()(q, q, q), expected)
    assert not torch.allclose(module.train()(q, q, q), expected)
    assert "causal=True" in repr(module)
