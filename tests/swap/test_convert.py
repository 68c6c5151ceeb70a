"""pytrain.optim.from_torch: a torch AdamW / Adam mid-training becomes FusedAdamW, and the next steps agree."""
import copy

import pytest
import torch

from pytrain.optim import FusedAdamW, from_torch
from pytrain.testing.tolerances import assert_close


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 37), torch.nn.Tanh(), torch.nn.Linear(37, 5))
    inputs = [torch.randn(7, 13) for _ in range(8)]
    return model, inputs


def _train(model, opt, inputs, schedulers=()):
    for x in inputs:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        for s in schedulers:
            s.step()


def _groups(model):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-2, "weight_decay": 0.0}]


@pytest.mark.parametrize("cls, kwargs", [
    (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    (torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, betas=(0.8, 0.99))),
    (torch.optim.AdamW, dict(lr=1e-2, maximize=True, fused=True)),
    (torch.optim.Adam, dict(lr=1e-2)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
])
def test_next_steps_match_torch(cls, kwargs):
    model, inputs = _model_and_grads()
    opt = cls(_groups(model), **kwargs)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=3),
                                                        torch.optim.lr_scheduler.StepLR(opt, 2, 0.7)], milestones=[3])
    _train(model, opt, inputs[:4], [sched])
    ref_model, ref_opt, ref_sched = copy.deepcopy((model, opt, sched))
    fused = from_torch(opt, schedulers=[sched])
    assert isinstance(fused, FusedAdamW) and sched.optimizer is fused and sched._schedulers[1].optimizer is fused
    _train(model, fused, inputs[4:], [sched])
    _train(ref_model, ref_opt, inputs[4:], [ref_sched])
    assert [g["lr"] for g in fused.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    for ours, theirs in zip(model.parameters(), ref_model.parameters()):
        assert_close(ours, theirs, msg="param after 4 more steps")
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_close(fused.state[p]["exp_avg_sq"], ref_opt.state[q]["exp_avg_sq"], msg="exp_avg_sq")
        assert int(fused.state[p]["step"]) == int(ref_opt.state[q]["step"]) == 8


def test_fresh_optimizer_and_extra_options():
    model, inputs = _model_and_grads()
    fused = from_torch(torch.optim.AdamW(model.parameters(), lr=1e-3), max_grad_norm=1.0)
    assert fused.max_grad_norm == 1.0 and not fused.state
    _train(model, fused, inputs[:1])
    assert len(fused.state) == 4


def test_refusals():
    model, _ = _model_and_grads()
    with pytest.raises(ValueError, match="L2 regularisation"):
        from_torch(torch.optim.Adam(model.parameters(), weight_decay=0.1))
    with pytest.raises(TypeError, match="expected torch.optim.AdamW"):
        from_torch(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="state format"):
        from_torch(torch.optim.AdamW(model.parameters()), state_dtype="int8")
    opt, other = torch.optim.AdamW(model.parameters()), torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="not bound to the given optimizer"):
        from_torch(opt, schedulers=[torch.optim.lr_scheduler.StepLR(other, 1)])
