"""pytrain.ops.global_norm against PyTorch's total gradient norm on the GPT-like param set (GPT_SHAPES: 70.8M
fp32 gradients in 50 tensors on the CPU, scaled 2x on CUDA; see conftest.py).

The L2 norm over all elements of a list of tensors, as a float32 0-dim tensor: what gradient clipping and
FusedAdamW(max_grad_norm=...) / FusedLAMB compute before their step.  Both providers run in the same process on
the same gradients (read only: no fresh copies needed).
  torch     torch.nn.utils.get_total_norm(grads) (what clip_grad_norm_ computes: one vector_norm per tensor,
            torch._foreach_norm on CUDA, then the norm of the stacked norms); with a torch that lacks it, the
            same composition written out: vector_norm(stack([vector_norm(g) for g in grads]))
  pytrain   pytrain.ops.global_norm(grads, impl=...)

Byte model: read every gradient once, 4 B per fp32 element (the per-tensor partial sums and the 0-dim result
are negligible).  No target: reported as a ratio and as a fraction of the measured memory ceiling.
"""
import torch

from pytrain.ops import global_norm

PROVIDERS = ("torch", "pytrain")
BYTES_PER_ELEMENT = 4
GET_TOTAL_NORM = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6
BASELINE = "torch.nn.utils.get_total_norm" if GET_TOTAL_NORM else "vector_norm(stack([vector_norm(g) for g in grads]))"


def torch_total_norm(tensors):
    """PyTorch's total norm: get_total_norm where this torch has it, else the composition it stands for."""
    if GET_TOTAL_NORM is not None:
        return GET_TOTAL_NORM(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def test_global_norm(provider, impl, param_set, measure):
    grads = param_set.grads
    if provider == "torch":
        step = lambda: torch_total_norm(grads)  # noqa: E731
    else:
        step = lambda: global_norm(grads, impl=impl)  # noqa: E731
    measure(step, case="global_norm fp32", provider=provider, bytes_moved=BYTES_PER_ELEMENT * param_set.numel,
            op="global_norm", impl=impl, baseline=BASELINE)
