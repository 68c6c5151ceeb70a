"""DDP communication hooks: PowerSGD, top-k and 8-bit quantized gradient averaging, plus a counted all-reduce.

    from pytrain.comm import PowerSGDState, register_comm_hook
    model = torch.nn.parallel.DistributedDataParallel(net)
    state = PowerSGDState(None, rank=4, start_iter=10)       # None: the default process group
    register_comm_hook(model, state)                          # = model.register_comm_hook(state, powersgd_hook),
                                                              #   after checking the model's process group
    ...
    state.stats.bytes_sent, state.stats.compression_ratio     # cumulative, per the byte model in _common
    torch.save(state.state_dict(), path)                      # memories, iteration, RNG; load_state_dict

Every hook issues its collectives in the same order on every rank, with any number of DDP buckets in flight
(see ``_common`` for how and what it costs).
"""
from typing import Dict

import torch

from ._common import CommStats, HookState
from ._allreduce import AllReduceState, allreduce_hook
from ._powersgd import PowerSGDState, powersgd_hook
from ._quant import QuantState, quantized_allreduce_hook
from ._topk import TopKState, topk_hook

HOOKS: Dict[type, object] = {AllReduceState: allreduce_hook, PowerSGDState: powersgd_hook, TopKState: topk_hook,
                             QuantState: quantized_allreduce_hook}


def register_comm_hook(model: torch.nn.parallel.DistributedDataParallel, state: HookState) -> None:
    """Register the hook of ``state``'s kind on a DDP ``model``; raises if the model's process group has
    other ranks than the state's."""
    if type(state) not in HOOKS:
        raise TypeError(f"register_comm_hook: no pytrain hook for a {type(state).__name__}")
    state.check_model(model)
    model.register_comm_hook(state, HOOKS[type(state)])


__all__ = ["CommStats", "HookState", "AllReduceState", "allreduce_hook", "PowerSGDState", "powersgd_hook", "TopKState",
           "topk_hook", "QuantState", "quantized_allreduce_hook", "register_comm_hook"]
