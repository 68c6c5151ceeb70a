"""The trainers' shared checkpoint state (pytrain.trainers.state), in one process: RNG streams survive a
weights_only checkpoint, payload tags are checked, a failed restore leaves everything as it was."""
import math
import random

import numpy as np
import pytest
import torch

from pytrain.trainers import state as st
from pytrain.trainers.checkpoint import CheckpointError, atomic_save, checkpoint_name, load_checkpoint


def _draws():
    return torch.rand(3), random.random(), np.random.rand(2)


def test_rng_streams_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    atomic_save({"rng": st.rng_state()}, tmp_path / "rng.pt")
    want = _draws()
    _draws()  # move every stream on
    st.set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])  # torch.load(weights_only=True)
    got = _draws()
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])


def test_local_state_holds_the_hook_state_when_there_is_one():
    class Hook:
        def state_dict(self):
            return {"iter": 3}
    assert st.local_state()["hook"] is None
    assert st.local_state(Hook())["hook"] == {"iter": 3} and "torch" in st.local_state()["rng"]


def test_check_format():
    st.check_format({"format": "x/1"}, "x/1", "f.pt", "X")
    st.check_format({}, "x/1", "f.pt", "X", untagged_ok=True)
    for state in ({"format": "y/1"}, {}):
        with pytest.raises(CheckpointError, match=r"f.pt: not a X checkpoint \(format .*, expected 'x/1'\)"):
            st.check_format(state, "x/1", "f.pt", "X")


def test_resume_path(tmp_path):
    assert st.resume_path(True, tmp_path) is None
    for step in (4, 8):
        atomic_save({"step": step}, tmp_path / checkpoint_name(step))
    assert st.resume_path(True, tmp_path) == tmp_path / checkpoint_name(8)
    assert st.resume_path(str(tmp_path / "other.pt"), tmp_path) == tmp_path / "other.pt"


def test_restore_all_or_nothing_puts_the_previous_state_back():
    net = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def apply(state):
        net.weight.data.copy_(state["weight"])  # the first part loads...
        net.load_state_dict(state)  # ...then the rest does not fit

    bad = {"weight": torch.zeros(2, 3), "bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match=r"(?s)ckpt.pt: could not be loaded .*nothing was changed"):
        st.restore_all_or_nothing(net.state_dict, apply, bad, "ckpt.pt")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    good = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    st.restore_all_or_nothing(net.state_dict, apply, good, "ckpt.pt")
    assert torch.equal(net.weight, torch.ones(2, 3))


def test_resume_path_needs_an_existing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint directory {tmp_path / 'missing'} does not exist"):
        st.resume_path(True, tmp_path / "missing")


def _stepped(optimizer_cls, net, **kwargs):
    opt = optimizer_cls(net.parameters(), lr=1e-2, **kwargs)
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("kwargs", [{}, {"state_dtype": torch.bfloat16}, {"state_dtype": "int8"}])
def test_check_optimizer_accepts_real_states(kwargs):
    """Every FusedAdamW state layout (fp32, bf16, int8 codes + per-block scales) passes, also into a fresh
    optimizer with another state dtype (load_state_dict converts)."""
    from pytrain.optim import FusedAdamW
    net = torch.nn.Sequential(torch.nn.Linear(300, 7), torch.nn.Linear(7, 1))
    saved = _stepped(FusedAdamW, net, **kwargs)
    for target in ({}, kwargs):
        st.check_optimizer(saved.state_dict(), st.optimizer_class(saved), FusedAdamW(net.parameters(), **target),
                           "f.pt")


def test_check_optimizer_rejects_what_does_not_fit():
    from pytrain.optim import FusedAdamW
    net = torch.nn.Linear(3, 2)
    saved = _stepped(FusedAdamW, net).state_dict()
    fresh = FusedAdamW(net.parameters())
    with pytest.raises(CheckpointError, match="holds the state of a torch.optim.sgd.SGD optimizer"):
        st.check_optimizer(saved, "torch.optim.sgd.SGD", fresh, "f.pt")
    bad = {**saved, "state": {**saved["state"], 1: {**saved["state"][1], "exp_avg": torch.zeros(3)}}}
    with pytest.raises(CheckpointError, match=r"optimizer state 'exp_avg' of parameter 1 has shape \(3,\), the "
                                              r"parameter has \(2,\)"):
        st.check_optimizer(bad, st.optimizer_class(fresh), fresh, "f.pt")
    bad = {**saved, "state": {**saved["state"], 0: {**saved["state"][0], "exp_avg_sq": torch.full((2, 3), -math.inf)}}}
    with pytest.raises(CheckpointError, match=r"optimizer state 0.exp_avg_sq has 6 non-finite"):
        st.check_optimizer(bad, st.optimizer_class(fresh), fresh, "f.pt")
    assert not fresh.state  # checks only: nothing loaded


def test_check_counters():
    st.check_counters({"step": 0}, "f.pt", {"step": (0, math.inf)})
    for value in (-5, 1.5, True, None):
        with pytest.raises(CheckpointError, match=rf"f.pt: step={value!r} is not an int in \[0, inf\)"):
            st.check_counters({"step": value}, "f.pt", {"step": (0, math.inf)})
