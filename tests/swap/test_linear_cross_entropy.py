"""pytrain.swap on Hugging Face causal LMs: training losses from labels go through the fused linear
cross-entropy (no logits built), equal to the stock loss and gradients; inference, evaluation and unswap are
unchanged."""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import pytrain  # noqa: E402
from pytrain.swap import ROUTED  # noqa: E402
from pytrain.testing.swap_models import (assert_identical, assert_swap_matches, outputs_and_grads,  # noqa: E402
                                         tiny_gemma2, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2)

BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "mistral": tiny_mistral, "qwen2": tiny_qwen2,
            "gemma2": tiny_gemma2}
LOSS_PATH = "(loss)"


def _batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    return ids, labels


def _loss(**kw):
    ids, labels = _batch()
    return lambda model: model(ids, labels=labels, **kw).loss


@pytest.mark.parametrize("name", list(BUILDERS))
def test_swapped_training_loss_and_grads_match_stock(name):
    model = BUILDERS[name]().train()
    ours = copy.deepcopy(model)
    report = pytrain.swap(ours)
    assert [e.now for e in report.entries if e.found.startswith("transformers loss")] == \
        ["loss from labels by pytrain.ops.linear_cross_entropy (no logits in training)"]
    assert_swap_matches(model, ours, _loss())
    ids, labels = _batch()
    assert ours(ids, labels=labels).logits is None  # never built
    assert report.calls[(LOSS_PATH, ROUTED)] >= 1
    pytrain.unswap(ours)
    assert ours(ids, labels=labels).logits is not None
    assert_identical(outputs_and_grads(ours, _loss()), outputs_and_grads(model, _loss()))


def test_num_items_in_batch_matches_stock():
    model = tiny_llama().train()
    ours = copy.deepcopy(model)
    pytrain.swap(ours)
    assert_swap_matches(model, ours, _loss(num_items_in_batch=torch.tensor(37)))


def test_inference_and_evaluation_keep_the_logits():
    model = tiny_llama()
    ours = copy.deepcopy(model)
    report = pytrain.swap(ours)
    ids, labels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits)
        model.eval()
        ours.eval()
        stock, swapped = model(ids, labels=labels), ours(ids, labels=labels)
    torch.testing.assert_close(swapped.logits, stock.logits)
    torch.testing.assert_close(swapped.loss, stock.loss)
    assert report.declined_calls[(LOSS_PATH, "evaluation (logits kept for metrics)")] == 1
    assert (LOSS_PATH, ROUTED) not in report.calls


def test_a_copy_of_the_swapped_model_trains_its_own_parameters():
    """copy.deepcopy of a swapped model (EMA weights, a compiled twin) computes with the copy's parameters."""
    model = tiny_llama().train()
    ours = copy.deepcopy(model)
    pytrain.swap(ours)
    twin, halved = copy.deepcopy(ours), copy.deepcopy(model)
    with torch.no_grad():
        for p in [*twin.parameters(), *halved.parameters()]:
            p.mul_(0.5)
    _loss()(twin).backward()
    assert all(p.grad is None for p in ours.parameters())
    assert all(p.grad is not None for p in twin.parameters())
    assert_swap_matches(halved, twin, _loss())
