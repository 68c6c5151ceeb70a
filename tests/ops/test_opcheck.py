"""torch.library.opcheck over every pytrain op and every backend registered as an op that can run here."""
import pytest
import torch

from pytrain.ops import registry
from pytrain.testing.backends import CPU_IMPLS, impl_or_skip
from pytrain.ops.adamw import INT8_BLOCK
from pytrain.ops.attention import seed_tensor

SHAPES = [(3, 5), (300,)]


def _like(dtype=None):
    return [torch.zeros(s, dtype=dtype) for s in SHAPES]


def _steps(*counts):
    """adamw_step's per-param step counts (as the optimizer's state["step"])."""
    return [torch.tensor(float(c)) for c in counts]


def _adamw_int8_args():
    blocks = [torch.zeros((torch.Size(s).numel() + INT8_BLOCK - 1) // INT8_BLOCK) for s in SHAPES]
    return ([torch.randn(s) for s in SHAPES], [torch.randn(s) for s in SHAPES], _like(torch.int8), _like(torch.uint8),
            [], [], blocks, [b.clone() for b in blocks], 1e-3, 0.9, 0.999, 1e-8, 0.01, _steps(1, 2), False, False, 1.0)


def _cases():
    return {
        "adamw_step": ([torch.randn(s) for s in SHAPES], [torch.randn(s) for s in SHAPES], _like(), _like(), _like(),
                       [], [], [], 1e-3, 0.9, 0.999, 1e-8, 0.01, _steps(3, 3), True, False, 0.5),
        "adamw_step_int8": _adamw_int8_args(),
        "lars_step": ([torch.randn(s) for s in SHAPES], [torch.randn(s) for s in SHAPES], _like(), 0.1, 0.9, 0.0,
                      1e-4, 1e-3, 1e-8, True, False, True, False),
        "lamb_step": ([torch.randn(s) for s in SHAPES], [torch.randn(s) for s in SHAPES], _like(), _like(), 1e-3,
                      0.9, 0.999, 0.1, 1e-6, 0.01, 0.1, 0.001, 0.7, True, True),
        "global_norm": ([torch.randn(s) for s in SHAPES],),
        "quantize_into": (torch.randn(300), torch.randn(300), torch.empty(300, dtype=torch.int8), torch.empty(2),
                          "int8", 256),
        "requantize_mean": (torch.randint(-127, 128, (2, 304), dtype=torch.int8)[:, :300], torch.rand(2, 3)[:, 1:],
                            torch.empty(300, dtype=torch.int8), torch.empty(2), torch.randn(150), 256),
        "dequantize_into": (torch.randint(-127, 128, (300,), dtype=torch.int8), torch.rand(2), 256, torch.empty(300)),
    }


OP_NAMES = {"cpu": "{}", "reference": "{}_reference", "triton": "{}_triton"}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("case", list(_cases()))
def test_opcheck(case, impl):
    op = case.replace("_int8", "")
    impl_or_skip(op, impl)
    torch.library.opcheck(getattr(torch.ops.pytrain, OP_NAMES[impl].format(op)).default, _cases()[case])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_attention_forward_and_backward(impl, causal):
    """opcheck of attention_fwd with inputs that need grads: test_autograd_registration and
    test_aot_dispatch_dynamic then run the backward registered with torch.library.register_autograd."""
    impl_or_skip("attention_fwd", impl)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 6, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 2, 5, 16, generator=gen, requires_grad=True) for _ in range(2))
    op = getattr(torch.ops.pytrain, OP_NAMES[impl].format("attention_fwd")).default
    torch.library.opcheck(op, (q, k, v, 0.25, causal, -1, -1, 0.0, seed_tensor(0)))


def test_every_op_has_a_reference():
    for name in ("adamw_step", "lars_step", "lamb_step", "global_norm", "linear_distillation_loss"):
        assert registry(name).availability()["reference"] is None
