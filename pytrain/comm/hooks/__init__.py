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

By name (``HOOK_NAMES``: allreduce, powersgd, topk, int8), as trainers and the command line take them:

    state, hook = make_hook("powersgd", process_group)       # a fresh state with the defaults, and its hook
    model.register_comm_hook(state, hook)
"""
from functools import partial
from typing import Callable, Dict, Tuple

import torch

from ._common import CommStats, HookState
from ._allreduce import AllReduceState, allreduce_hook
from ._powersgd import PowerSGDState, powersgd_hook
from ._quant import QuantState, quantized_allreduce_hook
from ._topk import TopKState, topk_hook

#: the one hook table: name -> (state factory taking the process group, hook)
BY_NAME: Dict[str, Tuple[Callable[..., HookState], Callable]] = {
    "allreduce": (AllReduceState, allreduce_hook),
    "powersgd": (PowerSGDState, powersgd_hook),
    "topk": (TopKState, topk_hook),
    "int8": (partial(QuantState, fmt="int8"), quantized_allreduce_hook),
}
HOOK_NAMES: Tuple[str, ...] = tuple(BY_NAME)
#: state type -> hook, for ``register_comm_hook`` (derived from ``BY_NAME``)
HOOKS: Dict[type, Callable] = {(factory.func if isinstance(factory, partial) else factory): hook
                               for factory, hook in BY_NAME.values()}


def make_hook(name: str, process_group=None) -> Tuple[HookState, Callable]:
    """(state, hook) for a hook name of ``HOOK_NAMES``: a new state with its defaults on ``process_group``
    (None: the default group) and the hook to register with it."""
    if name not in BY_NAME:
        raise ValueError(f"unknown comm_hook {name!r}; expected one of {', '.join(HOOK_NAMES)} or a (state, hook) pair")
    factory, hook = BY_NAME[name]
    return factory(process_group), hook


def register_comm_hook(model: torch.nn.parallel.DistributedDataParallel, state: HookState) -> None:
    """Register the hook of ``state``'s kind on a DDP ``model``; raises if the model's process group has
    other ranks than the state's."""
    if type(state) not in HOOKS:
        raise TypeError(f"register_comm_hook: no pytrain hook for a {type(state).__name__}")
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_comm_hook: model must be a torch.nn.parallel.DistributedDataParallel (hooks "
                        f"run in its gradient all-reduce), got {type(model).__name__}")
    state.check_model(model)
    model.register_comm_hook(state, HOOKS[type(state)])


__all__ = ["CommStats", "HookState", "AllReduceState", "allreduce_hook", "PowerSGDState", "powersgd_hook", "TopKState",
           "topk_hook", "QuantState", "quantized_allreduce_hook", "register_comm_hook", "HOOK_NAMES", "make_hook"]
