"""Hugging Face transformers models with attn_implementation="pytrain" (registered by
pytrain.integrations.transformers): tiny GPT-2, LLaMA (GQA) and Mistral (sliding window) from configs."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import pytrain  # noqa: E402
from pytrain.integrations import transformers as integration  # noqa: E402
from pytrain.swap import ROUTED  # noqa: E402
from pytrain.testing.swap_models import (assert_identical, assert_swap_matches, outputs_and_grads,  # noqa: E402
                                         tiny_gpt2, tiny_llama, tiny_mistral)

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "mistral": tiny_mistral}
LENGTH = 20  # longer than Mistral's window of 8: flash attention applies the window


def _forward(attention_mask=None):
    ids = torch.randint(0, 128, (2, LENGTH), generator=torch.Generator().manual_seed(2))
    return lambda model: model(ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("name", list(BUILDERS))
def test_swap_matches_and_unswaps(name):
    model = BUILDERS[name]()
    ours = copy.deepcopy(model)
    report = pytrain.swap(ours)
    assert [(e.path, e.now) for e in report.entries] == [
        ("", 'attn_implementation="pytrain"'),
        ("", "loss from labels by pytrain.ops.linear_cross_entropy (no logits in training)")]
    assert ours.config._attn_implementation == "pytrain"
    assert_swap_matches(model, ours, _forward())
    assert not report.declined_calls and report.calls[("model.layers.1.self_attn" if name != "gpt2"
                                                        else "transformer.h.1.attn", ROUTED)] == 1
    pytrain.unswap(ours)
    assert ours.config._attn_implementation == "sdpa"
    assert_identical(outputs_and_grads(ours, _forward()), outputs_and_grads(model, _forward()))


def test_from_config_with_pytrain_attention():
    from transformers import AutoModelForCausalLM
    reference = tiny_llama()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(reference.config), attn_implementation="pytrain")
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "pytrain" and reference.config._attn_implementation == "sdpa"
    assert_swap_matches(reference, model, _forward())


def test_padding_mask_is_declined_and_reported():
    model = tiny_llama()
    padding = torch.ones(2, LENGTH, dtype=torch.long)
    padding[0, :5] = 0  # left padding
    ours = copy.deepcopy(model)
    report = pytrain.swap(ours)
    assert_identical(outputs_and_grads(ours, _forward(padding)), outputs_and_grads(model, _forward(padding)))
    assert set(report.declined_calls) == {(f"model.layers.{i}.self_attn", "attention mask with padding or a custom "
                                           "pattern (not plain causal / sliding window)") for i in range(2)}
    all_ones = torch.ones(2, LENGTH, dtype=torch.long)  # no padding: the mask builder returns None
    ours(torch.zeros(2, LENGTH, dtype=torch.long), attention_mask=all_ones)
    assert report.calls[("model.layers.0.self_attn", ROUTED)] == 1


def test_output_attentions_is_declined():
    model = tiny_llama()
    pytrain.swap(model)
    query = key = value = torch.randn(1, 4, 8, 16)
    module = model.model.layers[0].self_attn
    assert integration.decline_reason(module, query, key, value, None, True, None, {"output_attentions": True}) \
        == "output_attentions is not supported"
    assert integration.decline_reason(module, query, key, value, None, True, None, {}) is None


def test_mask_pattern_recognition():
    lq = lk = 6
    causal = torch.ones(lq, lk, dtype=torch.bool).tril()[None, None]
    assert integration._mask_is_pattern(causal.expand(2, 1, lq, lk).clone(), True, None)
    window = causal & ~torch.ones(lq, lk, dtype=torch.bool).tril(-3)
    assert integration._mask_is_pattern(window.clone(), True, 3) and not integration._mask_is_pattern(window, True, 4)
    padded = causal.expand(2, 1, lq, lk).clone()
    padded[0, 0, :, 0] = False
    assert not integration._mask_is_pattern(padded, True, None)
    assert not integration._mask_is_pattern(causal.float(), True, None)


def test_sliding_window_needs_no_mask(monkeypatch):
    """A whole sequence longer than the window: ``pytrain_mask`` builds no mask (the layers apply their window),
    so nothing is checked, torch.compile has no data-dependent branch, and every call runs flash attention."""
    seen = []
    monkeypatch.setattr(integration, "_mask_is_pattern", lambda *args: seen.append(args))
    model = tiny_mistral(sliding_window=8)
    report = pytrain.swap(model)
    _forward()(model)
    assert seen == [] and not report.declined_calls
    assert sum(n for (_, outcome), n in report.calls.items() if outcome == "pytrain") > 0, str(report)


def test_declined_call_without_mask_keeps_the_window():
    """The skipped window mask comes back for SDPA when a call is declined (here: head dim 8, out of range)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 8, generator=gen) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = integration.pytrain_attention_forward(module, q, k, v, None, sliding_window=4)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril() & ~torch.ones(10, 10, dtype=torch.bool).tril(-4)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    torch.testing.assert_close(out, want.transpose(1, 2))
