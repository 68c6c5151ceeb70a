"""Gradient compression for communication: top-k sparsification, PowerSGD low-rank compression, and the
DDP communication hooks built on them (``pytrain.comm.hooks``: PowerSGD, top-k, quantized all-reduce; by name with
``make_hook(name, process_group)``).

* ``topk(x, ratio, *, exact=False) -> (values, indices)``: see ``pytrain.comm.topk``.
* PowerSGD pieces, batched over same-shape matrices: ``powersgd_p`` (P = M Q), ``orthogonalize_`` (Gram-Schmidt,
  in place), ``powersgd_q`` (Q = M^T P) and ``powersgd_compress`` (the three in one call); see
  ``pytrain.comm.powersgd``.
"""
from .powersgd import orthogonalize_, powersgd_compress, powersgd_p, powersgd_q
from .topk import topk, topk_k
from .hooks import (HOOK_NAMES, AllReduceState, CommStats, PowerSGDState, QuantState, TopKState, allreduce_hook,
                    make_hook, powersgd_hook, quantized_allreduce_hook, register_comm_hook, topk_hook)

__all__ = ["topk", "topk_k", "orthogonalize_", "powersgd_compress", "powersgd_p", "powersgd_q",
           "AllReduceState", "CommStats", "PowerSGDState", "QuantState", "TopKState", "allreduce_hook", "powersgd_hook",
           "quantized_allreduce_hook", "register_comm_hook", "topk_hook", "HOOK_NAMES", "make_hook"]
