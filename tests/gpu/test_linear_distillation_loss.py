"""GPU: ``linear_distillation_loss``'s "cuda" (C++) and "triton" backends: loss and student gradients on CUDA tensors
against float64.

The rule of tests/ops/test_linear_distillation_loss.py (``pytrain.testing.linear_losses``): the normwise error
of the loss and of the student's hidden and weight gradients is at most twice PyTorch's own error in the same
dtype (both logit matrices by ``F.linear`` in that dtype, the divergence in float32) plus
``LINEAR_DISTILLATION_LOSS_RTOL[dtype]``.  Covered: float32 / bfloat16 / float16; every kind (forward KL with
temperature, reverse KL, JSD with hard labels mixed in), no targets, per-token losses; a student of H 1024 and a
teacher of H 2048 at N 4096 and V 32003, and small odd sizes with chunks that do not divide N; and outputs and
buffers allocated holding garbage (poisoned)."""
import pytest
import torch

from pytrain.testing import gpu
from pytrain.testing.backends import backend_op, impl_or_skip
from pytrain.testing.linear_losses import IGNORE, check_distillation, distillation_inputs

pytestmark = pytest.mark.gpu

OP = "linear_distillation_loss"
IMPLS = ["cuda", "triton"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name -> (n, student hidden, teacher hidden, vocab, chunk_size); None: the op's default chunk
SIZES = {"n4096-s1024-t2048-v32003": (4096, 1024, 2048, 32003, None),
         "n37-s12-t20-v1031-chunk8": (37, 12, 20, 1031, 8)}
OPTIONS = {"kl_t2": {"temperature": 2.0}, "reverse_kl": {"kind": "reverse_kl", "temperature": 1.5},
           "jsd_hard": {"kind": "jsd", "beta": 0.7, "hard_label_weight": 0.3, "temperature": 2.0},
           "no_target": {"kind": "reverse_kl", "target": None},
           "none": {"kind": "kl", "reduction": "none", "hard_label_weight": 0.2, "temperature": 2.0}}


# every kind in every dtype at the large size; the no-target and per-token variants at the small one
CASES = [(dtype, "n4096-s1024-t2048-v32003", option) for dtype in DTYPES for option in ("kl_t2", "jsd_hard")] + \
    [("float32", "n4096-s1024-t2048-v32003", "reverse_kl")] + \
    [(dtype, "n37-s12-t20-v1031-chunk8", option) for dtype in ("float32", "float16")
     for option in ("no_target", "none")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, size, option", CASES, ids=["-".join(case) for case in CASES])
def test_matches_float64(impl, dtype, size, option):
    impl_or_skip(OP, impl, gpu.DEVICE)
    n, student, teacher, vocab, chunk = SIZES[size]
    check_distillation(impl, DTYPES[dtype], n=n, student=student, teacher=teacher, vocab=vocab,
                       chunk_size=chunk, options=OPTIONS[option], device=gpu.DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("byte", gpu.POISON_BYTES)
def test_poisoned_allocations(impl, byte):
    """Every output element and accumulator is written (or zeroed) by the kernels: garbage in freshly allocated
    memory cannot reach the results."""
    impl_or_skip(OP, impl, gpu.DEVICE)
    with gpu.poisoned(byte, modules=("linear_distillation_loss", "linear_chunks")):
        check_distillation(impl, torch.bfloat16, n=1000, student=256, teacher=512, vocab=16001, chunk_size=300,
                           options={"kind": "jsd", "hard_label_weight": 0.5}, device=gpu.DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_gives_nan_for_out_of_range_target(impl):
    """The kernels themselves (reached without the public function's host check; checking inside would cost a
    device sync): a target outside [0, V) gives its token a NaN loss and gradient row, and no other token's."""
    impl_or_skip(OP, impl, gpu.DEVICE)
    hs, ws, ht, wt, t = distillation_inputs(torch.float32, 9, 12, 20, 7, device=gpu.DEVICE)
    t[2] = 7
    losses, gh, _ = backend_op(OP, impl)(hs, ws, ht, wt, t, torch.ones(9, device=gpu.DEVICE), "kl", 1.0, 0.5, 0.0, IGNORE, 4)
    assert losses[2].isnan() and not losses[[0, 1, 4, 5]].isnan().any() and gh[2].isnan().all()
    assert losses[3] == 0 and losses[8] == 0  # ignored


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    impl_or_skip(OP, impl, gpu.DEVICE)
    hs, ws, ht, wt, t = distillation_inputs(torch.float32, 9, 12, 20, 13, device=gpu.DEVICE)
    op = backend_op(OP, impl).default
    torch.library.opcheck(op, (hs, ws, ht, wt, t, torch.rand(9, device=gpu.DEVICE), "jsd", 2.0, 0.3, 0.25, IGNORE, 4))
    torch.library.opcheck(op, (hs, ws, ht, wt, None, None, "reverse_kl", 1.0, 0.5, 0.0, IGNORE, 4))
