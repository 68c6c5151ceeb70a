"""Activation checkpointing of the GPT's blocks (``GPT(activation_checkpointing=True)``, ``pytrain train
--activation-checkpointing``): non-reentrant ``torch.utils.checkpoint`` recomputes each block's forward in
backward.  With attention dropout the recompute must draw the same dropout seed from torch's generator (the
checkpoint restores the RNG state it saw), so the loss and every gradient equal the run without checkpointing,
and the generator ends in the same state.  Each block must really be recomputed (its forward runs twice)."""
import pytest
import torch

from pytrain.testing.tolerances import assert_close
from pytrain.train import GPT, lm_loss

VOCAB, LAYERS, HIDDEN, HEADS, SEQ = 11, 2, 32, 2, 9  # head dim 16: flash attention's least


def loss_and_grads(checkpointing: bool, dropout: float):
    torch.manual_seed(0)
    model = GPT(VOCAB, LAYERS, HIDDEN, HEADS, SEQ, dropout=dropout, activation_checkpointing=checkpointing)
    tokens = torch.randint(0, VOCAB, (3, SEQ + 1), generator=torch.Generator().manual_seed(1))
    calls = []
    for block in model.blocks:
        block.qkv.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(2)  # the stream the dropout seeds come from
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()], torch.get_rng_state(), len(calls)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointed_blocks_give_the_same_gradients(dropout):
    loss, grads, rng, calls = loss_and_grads(False, dropout)
    loss_ck, grads_ck, rng_ck, calls_ck = loss_and_grads(True, dropout)
    assert (calls, calls_ck) == (LAYERS, 2 * LAYERS)  # checkpointing recomputed every block once
    assert_close(loss_ck, loss)
    for i, (got, want) in enumerate(zip(grads_ck, grads)):
        assert_close(got, want, msg=f"param {i}")
    assert torch.equal(rng_ck, rng)


def test_dropout_changes_the_gradients():
    """The dropout case above is not vacuous: the masks matter."""
    _, plain, _, _ = loss_and_grads(False, 0.0)
    _, dropped, _, _ = loss_and_grads(False, 0.3)
    assert not torch.allclose(plain[2], dropped[2])


def test_recompute_with_another_seed_would_differ():
    """Had the recompute drawn a fresh seed (no RNG restore), the gradients would differ: checked by disabling
    torch.utils.checkpoint's RNG preservation."""
    import pytrain.train as train

    original = train.checkpoint
    train.checkpoint = lambda fn, x, use_reentrant: original(fn, x, use_reentrant=use_reentrant,
                                                              preserve_rng_state=False)
    try:
        _, broken, _, _ = loss_and_grads(True, 0.3)
    finally:
        train.checkpoint = original
    _, grads, _, _ = loss_and_grads(False, 0.3)
    assert not all(torch.allclose(a, b) for a, b in zip(broken, grads))
