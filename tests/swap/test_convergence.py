"""A tiny LLaMA trained 100 steps with stock PyTorch (SDPA + AdamW) and with pytrain.swap + FusedAdamW from the
same seed in fp32: the loss curves agree within 1% at every 10th step.  Twice: the loss from the logits, and the
loss the model computes from ``labels`` (swapped: the fused linear cross-entropy, no logits built)."""
import pytest
import torch

pytest.importorskip("transformers")

import pytrain  # noqa: E402
from pytrain.testing.swap_models import llama_batch, tiny_llama  # noqa: E402

STEPS, VOCAB = 100, 64


def _losses(use_pytrain: bool, labels_to_model: bool):
    model = tiny_llama(hidden=32, heads=2, kv_heads=1, vocab=VOCAB, intermediate=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    if use_pytrain:
        report = pytrain.swap(model, optimizer=opt)
        opt = report.optimizer
    losses = []
    for step in range(STEPS):
        ids, labels = llama_batch(VOCAB, batch=4, length=32, seed=step)
        if labels_to_model:  # llama_batch's labels are already the next tokens: no shift inside the model
            loss = model(ids, labels=labels, shift_labels=labels.contiguous()).loss  # HF views it
        else:
            logits = model(ids).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if use_pytrain:
        calls_per_step = 2 + labels_to_model  # attention in each of 2 layers (+ the loss)
        assert not report.declined_calls and sum(report.calls.values()) == STEPS * calls_per_step
    return losses


@pytest.mark.parametrize("labels_to_model", [False, True], ids=["loss-from-logits", "loss-from-labels"])
def test_tiny_llama_loss_curves_agree(labels_to_model):
    stock, ours = _losses(False, labels_to_model), _losses(True, labels_to_model)
    assert stock[-1] < 0.7 * stock[0]  # it learns
    for step in range(0, STEPS, 10):
        assert abs(ours[step] - stock[step]) <= 0.01 * stock[step], f"step {step}: {ours[step]} vs {stock[step]}"
