"""Memory per device of training: parameters, gradients, optimizer state, activations; ZeRO sharding.

Model states (bytes per parameter; Rajbhandari et al. 2020, "ZeRO", Section 3):

    params  = N * param_bytes           grads = N * grad_bytes (the param dtype unless given)
    optimizer state = N * sum over the optimizer's states of the state's bytes per element
        AdamW / Adam / LAMB: 2 states (m, v);  SGD with momentum / LARS: 1;  SGD: 0
        per state: fp32 4, bf16 / fp16 2, pytrain int8 1 + 4/256 (one fp32 scale per 256-element block,
        pytrain/ops/adamw.py), so AdamW fp32 = 8 B/param and int8 ~ 2.03 B/param
        + 4 B/param of fp32 master weights when the params are bf16 / fp16 (mixed precision)
    ZeRO over d data-parallel ranks: stage 1 divides the optimizer state (masters included) by d,
        stage 2 also the gradients, stage 3 also the parameters.

Activations kept for the backward of one transformer layer (Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Section 4), sequence s, micro-batch b, hidden h, heads a:

    s b h (34 + 5 a s / h)  bytes   for 2-byte activations with 1-byte dropout masks;

generalised here to e bytes per activation and masks of d = 1 byte (0 without dropout):

    s b h (16 e + 2 d)  +  a s^2 b (e + [dropout] (e + d))

(16 e = layer-norm inputs 2, QKV input 1, Q K V 3, projection input 1, MLP input 1, GeLU input 4, GeLU output 4;
the a s^2 b term is the softmax output, its dropout mask and dropout output).  FlashAttention (Dao et al. 2022)
keeps no s x s matrix but the attention output and fp32 log-sum-exp: the a s^2 b term becomes e s b h + 4 a s b.
Recompute: "selective" recomputes only the attention core (drops the a s^2 b term), "full" keeps only each
layer's input (e s b h; the recomputed layer's activations come back one layer at a time during backward).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ._checks import count, real

INT8_BLOCK = 256
#: states per parameter of each optimizer (Adam-type: first and second moment; momentum SGD / LARS: a buffer)
OPTIMIZER_STATES: Dict[str, int] = {"adamw": 2, "adam": 2, "lamb": 2, "lars": 1, "sgd_momentum": 1, "sgd": 0}
#: bytes per element of one optimizer state by storage dtype (int8: codes + one fp32 scale per block)
STATE_BYTES: Dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0 + 4.0 / INT8_BLOCK}
RECOMPUTE = ("none", "selective", "full")


def optimizer_state_bytes(n_params: int, optimizer: str = "adamw", state_dtype: str = "fp32",
                          master_weights: bool = False) -> float:
    """Bytes of optimizer state for ``n_params`` parameters: ``N * states(optimizer) * STATE_BYTES[state_dtype]``
    plus ``4 N`` for fp32 master weights (ZeRO paper, Section 3.1; int8: pytrain's blockwise format)."""
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}; one of {sorted(OPTIMIZER_STATES)}")
    if state_dtype not in STATE_BYTES:
        raise ValueError(f"unknown state_dtype {state_dtype!r}; one of {sorted(STATE_BYTES)}")
    n_params = count("n_params", n_params, 0)
    return n_params * (OPTIMIZER_STATES[optimizer] * STATE_BYTES[state_dtype] + (4.0 if master_weights else 0.0))


def activation_memory(seq: int, micro_batch: int, hidden: int, heads: int, layers: int = 1, *,
                      bytes_per_element: int = 2, dropout: bool = True, recompute: str = "none",
                      flash: bool = False) -> float:
    """Activation bytes a transformer keeps for backward: ``layers`` x the per-layer formula of the module
    docstring (Korthikanti et al. 2022, generalised to ``bytes_per_element`` e and optional dropout;
    e = 2 with dropout gives their ``s b h (34 + 5 a s / h)``)."""
    seq, micro_batch, hidden, heads, layers = (count(name, value) for name, value in (
        ("seq", seq), ("micro_batch", micro_batch), ("hidden", hidden), ("heads", heads), ("layers", layers)))
    real("bytes_per_element", bytes_per_element, strict=True)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    e, d = bytes_per_element, (1 if dropout else 0)
    sbh = seq * micro_batch * hidden
    if recompute == "full":
        return layers * e * sbh
    per_layer = sbh * (16 * e + 2 * d)
    if flash:
        per_layer += e * sbh + 4 * heads * seq * micro_batch
    elif recompute == "none":
        per_layer += heads * seq * seq * micro_batch * (e + (e + d if dropout else 0))
    return layers * per_layer


@dataclass(frozen=True, repr=False)
class MemoryEstimate:
    """Bytes per device by kind; ``total`` is their sum."""

    params: float
    grads: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        """params + grads + optimizer + activations, bytes."""
        return self.params + self.grads + self.optimizer + self.activations

    def __repr__(self) -> str:
        gib = 2**30
        return (f"MemoryEstimate({self.total / gib:.2f} GiB: params {self.params / gib:.2f}, grads "
                f"{self.grads / gib:.2f}, optimizer {self.optimizer / gib:.2f}, activations "
                f"{self.activations / gib:.2f} GiB)")


def memory_per_device(n_params: int, *, param_bytes: int = 4, grad_bytes: Optional[int] = None,
                      optimizer: str = "adamw", state_dtype: str = "fp32", master_weights: bool = False,
                      zero_stage: int = 0, dp: int = 1, activations: Union[float, dict] = 0.0) -> MemoryEstimate:
    """Memory of one data-parallel rank holding ``n_params`` parameters (already divided by TP x PP if any).

    Model states per the module docstring, ZeRO stage 1/2/3 divides optimizer state / + grads / + params by
    ``dp`` (Rajbhandari et al. 2020).  ``activations``: bytes, or the keyword arguments of
    ``activation_memory`` (with ``recompute="full"`` one layer's full activations are added: the layer being
    recomputed during backward)."""
    zero_stage, dp = count("zero_stage", zero_stage, 0, 3), count("dp", dp)
    real("param_bytes", param_bytes, strict=True)
    grad_bytes = param_bytes if grad_bytes is None else real("grad_bytes", grad_bytes, strict=True)
    state = optimizer_state_bytes(n_params, optimizer, state_dtype, master_weights)
    shard = [1.0] + [1.0 / dp if zero_stage >= stage else 1.0 for stage in (1, 2, 3)]
    if isinstance(activations, dict):
        act = activation_memory(**activations)
        if activations.get("recompute") == "full":
            act += activation_memory(**{**activations, "layers": 1, "recompute": "none"})
    else:
        act = real("activations", activations, unit="bytes")
    return MemoryEstimate(params=n_params * param_bytes * shard[3], grads=n_params * grad_bytes * shard[2],
                          optimizer=state * shard[1], activations=act)


class PeakMemory(TorchDispatchMode):
    """Measures the peak bytes of live CPU tensor storage while active (``with PeakMemory() as m: ...;
    m.peak``): every op's output storage is counted once when it appears and uncounted when it is freed
    (storage Python objects live exactly as long as their storage, so a weakref finalizer marks the free).
    Tensors created before entering are not counted; allocations inside a kernel that never become an op
    output (scratch buffers) are not seen."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: Dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.current += self._live[key]
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.is_sparse:
                self._track(value)
        return out
