"""The CPU multi-tensor kernels give the same bits whatever the OpenMP team size: each case runs in fresh
processes with OMP_NUM_THREADS=1 and 2 and the SHA-256 of all outputs must
agree.  Why they do (csrc/cpu/multi_tensor.h): chunk boundaries are fixed (64K elements, whole int8 blocks),
each chunk is reduced alone in a fixed order, and the per-chunk partials of a tensor (or of the whole list,
for global_norm) are added in chunk order by one thread; the team size only decides which thread runs
which chunks."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import pytrain.ops as ops
from pytrain.ops.multi_tensor import may_overlap
from pytrain.testing.multi_tensor import DETERMINISM_CASES, backend_device, digests_with_threads


def test_cpu_kernels_bit_identical_across_omp_team_sizes():
    for op, _ in DETERMINISM_CASES.values():
        backend_device(op, "cpu")
    cases = list(DETERMINISM_CASES)
    runs = {threads: digests_with_threads(cases, threads) for threads in (1, 2)}
    differ = [c for c in cases if runs[2][c] != runs[1][c]]
    assert not differ, f"OMP_NUM_THREADS=2 changes the bits of {differ} (against 1)"



# one call of each step op: (public op's keyword arguments, the registered op's positional scalars after the lists)
STEPS = {
    "adamw_step": (dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=1),
                   (1e-3, 0.9, 0.999, 1e-8, 0.01, "steps", False, False, 1.0)),
    "lars_step": (dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8,
                       nesterov=False, trust_clip=False, adapt=True, init_buffers=False),
                  (0.1, 0.9, 0.0, 1e-4, 1e-3, 1e-8, False, False, True, False)),
    "lamb_step": (dict(lr=1e-3, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.01, bias_correction1=0.1,
                       bias_correction2=0.001),
                  (1e-3, 0.9, 0.999, 0.1, 1e-6, 0.01, 0.1, 0.001, 1.0, True, False)),
}
N_STATES = {"adamw_step": 2, "lars_step": 1, "lamb_step": 2}


def _lists(op, reshape_state: bool):
    params = [torch.randn(5, 7), torch.randn(3, 4)]
    states = [[torch.zeros_like(p) for p in params] for _ in range(N_STATES[op])]
    if reshape_state:  # the param's element count, another shape
        states[0][1] = states[0][1].reshape(-1)
    return [params, [torch.randn_like(p) for p in params], *states]


def _registered_args(op, lists, mode):
    extra = [[], [], [], []] if op == "adamw_step" else []  # amsgrad, master, int8 scale lists
    steps = [mode.from_tensor(torch.tensor(1.0)) for _ in lists[0]]  # adamw_step's per-param step counts
    return (*lists, *extra, *[steps if s == "steps" else s for s in STEPS[op][1]])


@pytest.mark.parametrize("op", list(STEPS))
def test_eager_and_fake_refuse_a_state_of_another_shape_alike(op):
    """A state with its param's element count but another shape: the public op (eager) and the op's fake
    (what torch.compile and opcheck trace) raise the same error, from one check (``multi_tensor.check_shapes``)."""
    lists = _lists(op, reshape_state=True)
    with pytest.raises(ValueError) as eager:
        if op == "adamw_step":
            ops.adamw_step(*lists, [], [], [], [], **STEPS[op][0])
        else:
            getattr(ops, op)(*lists, **STEPS[op][0])
    with FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in ts] for ts in lists]
        with pytest.raises(ValueError) as traced:
            getattr(torch.ops.pytrain, op)(*_registered_args(op, fake, mode))
    assert str(traced.value) == str(eager.value)
    assert "[1] has shape (12,), params[1] (3, 4)" in str(eager.value)


@pytest.mark.parametrize("op", list(STEPS))
def test_fake_accepts_states_shaped_like_params(op):
    with FakeTensorMode() as mode:
        fake = [[mode.from_tensor(t) for t in ts] for ts in _lists(op, reshape_state=False)]
        assert getattr(torch.ops.pytrain, op)(*_registered_args(op, fake, mode)) is None


def test_may_overlap():
    base = torch.zeros(4, 6)
    assert may_overlap(base[:1].expand(4, 6))  # stride 0
    assert may_overlap(torch.zeros(6).as_strided((3, 3), (1, 1)))  # sliding windows share elements
    assert not may_overlap(base)
    assert not may_overlap(base.t())  # transposed: dense
    assert not may_overlap(base[:, ::2])  # a slice: gaps, no sharing
    assert not may_overlap(torch.zeros(2, 3, 4, 5).to(memory_format=torch.channels_last))
    assert not may_overlap(torch.zeros(0, 6)[:, :1].expand(0, 6))  # no elements
