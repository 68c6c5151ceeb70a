"""GPU: ``linear_cross_entropy``'s "cuda" (C++) and "triton" backends: loss and gradients on CUDA tensors against the
float64 reference.

The rule of tests/ops/test_linear_cross_entropy.py (``pytrain.testing.linear_losses``): the normwise error of
the loss and of the hidden, weight and bias gradients is at most twice PyTorch's own error in the same dtype
(``F.linear`` in that dtype, the loss in float32) plus ``LINEAR_CROSS_ENTROPY_RTOL[dtype]``.  Covered: float32 /
bfloat16 / float16; the issue's size (N 4096, H 2048) with odd vocabularies (32003, and GPT-2's 50257 at
H 512); label smoothing + z-loss + softcap, per-token losses, Hugging Face's ``num_items_in_batch``; chunks that
do not divide N; and outputs and buffers allocated holding garbage (poisoned)."""
import pytest
import torch

from pytrain.testing import gpu
from pytrain.testing.backends import backend_op, impl_or_skip
from pytrain.testing.linear_losses import IGNORE, check_cross_entropy, cross_entropy_inputs

pytestmark = pytest.mark.gpu

OP = "linear_cross_entropy"
IMPLS = ["cuda", "triton"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# name -> (n, hidden, vocab, chunk_size); None: the op's default chunk
SIZES = {"n4096-h2048-v32003": (4096, 2048, 32003, None), "n1000-h512-v50257-chunk300": (1000, 512, 50257, 300),
         "n37-h64-v1003-chunk8": (37, 64, 1003, 8)}
OPTIONS = {"plain": {}, "all": {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
           "none": {"reduction": "none"}, "num_items": {"num_items_in_batch": 3000}}
# every dtype at the size; every option in float32 / bfloat16 at the smaller ones (the suite's time is
# mostly Triton compiling each variant); each case on every backend
CASES = [(dtype, "n4096-h2048-v32003", option) for dtype in DTYPES for option in ("plain", "all")] + \
    [(dtype, size, option) for dtype in ("float32", "bfloat16") for size in list(SIZES)[1:]
     for option in ("none", "num_items")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype, size, option", CASES, ids=["-".join(case) for case in CASES])
def test_matches_float64(impl, dtype, size, option):
    impl_or_skip(OP, impl, gpu.DEVICE)
    n, hidden, vocab, chunk = SIZES[size]
    check_cross_entropy(impl, DTYPES[dtype], n=n, hidden=hidden, vocab=vocab, chunk_size=chunk,
                        options=OPTIONS[option], device=gpu.DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("byte", gpu.POISON_BYTES)
def test_poisoned_allocations(impl, byte):
    """Every output element and accumulator is written (or zeroed) by the kernels: garbage in freshly allocated
    memory cannot reach the results."""
    impl_or_skip(OP, impl, gpu.DEVICE)
    with gpu.poisoned(byte, modules=("linear_cross_entropy", "linear_chunks")):
        check_cross_entropy(impl, torch.bfloat16, n=1000, hidden=512, vocab=50257, chunk_size=300,
                            options={"label_smoothing": 0.1}, device=gpu.DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_gives_nan_for_out_of_range_target(impl):
    """The kernels themselves (reached without the public function's host check; checking inside would cost a
    device sync): a target outside [0, V) gives its token a NaN loss and gradient row, and no other token's."""
    impl_or_skip(OP, impl, gpu.DEVICE)
    h, w, t, b = cross_entropy_inputs(torch.float32, 9, 16, 7, device=gpu.DEVICE)
    t[2] = 7
    losses, gh, _, _ = backend_op(OP, impl)(h, w, t, b, torch.ones(9, device=gpu.DEVICE), IGNORE, 0.0, 0.0, 0.0, 4)
    assert losses[2].isnan() and not losses[[0, 1, 3, 4, 5]].isnan().any() and gh[2].isnan().all()
    assert losses[3] == 0 and losses[8] == 0  # ignored


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck(impl):
    impl_or_skip(OP, impl, gpu.DEVICE)
    h, w, t, b = cross_entropy_inputs(torch.float32, 9, 16, 13, device=gpu.DEVICE)
    op = backend_op(OP, impl).default
    torch.library.opcheck(op, (h, w, t, b, torch.rand(9, device=gpu.DEVICE), IGNORE, 0.1, 1e-3, 2.0, 4))
    torch.library.opcheck(op, (h, w, t, None, None, IGNORE, 0.0, 0.0, 0.0, 4))
