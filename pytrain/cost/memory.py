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
Tensor parallelism over t ranks (their Eq. 2) splits the 12 e of Q K V, projection input and GeLU and the
attention core by t; the output layer (their Section 4.3) adds 2 e s b h + 4 s b v for vocabulary v.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
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
                      flash: bool = False, tp: int = 1, vocab: int = 0) -> float:
    """Activation bytes a transformer keeps for backward: ``layers`` x the per-layer formula of the module
    docstring (Korthikanti et al. 2022, generalised to ``bytes_per_element`` e and optional dropout;
    e = 2 with dropout gives their ``s b h (34 + 5 a s / h)``).

    ``tp``: tensor-parallel degree t without sequence parallelism (their Eq. 2, ``s b h (10 + 24 / t +
    5 a s / (h t))`` at e = 2): the layer-norm inputs, the QKV and MLP inputs and the dropout masks,
    ``s b h (4 e + 2 d)``, stay whole on every rank; Q K V, the projection input, the GeLU input and output
    (``12 e s b h``) and the attention core are split by t.
    ``vocab``: with v > 0 the output layer is added (their Section 4.3): the final layer-norm input and the
    output projection's input, ``2 e s b h``, and the cross-entropy's fp32 log-softmax of the logits,
    ``4 s b v`` (not split by t: the head is replicated)."""
    seq, micro_batch, hidden, heads, layers, tp = (count(name, value) for name, value in (
        ("seq", seq), ("micro_batch", micro_batch), ("hidden", hidden), ("heads", heads), ("layers", layers),
        ("tp", tp)))
    vocab = count("vocab", vocab, 0)
    real("bytes_per_element", bytes_per_element, strict=True)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if heads % tp:
        raise ValueError(f"tp ({tp}) must divide heads ({heads})")
    e, d = bytes_per_element, (1 if dropout else 0)
    sbh = seq * micro_batch * hidden
    head = (2 * e * sbh + 4 * seq * micro_batch * vocab) if vocab else 0
    if recompute == "full":
        return layers * e * sbh + head
    per_layer = sbh * (4 * e + 2 * d) + 12 * e * sbh / tp
    if flash:
        per_layer += (e * sbh + 4 * heads * seq * micro_batch) / tp
    elif recompute == "none":
        per_layer += heads * seq * seq * micro_batch * (e + (e + d if dropout else 0)) / tp
    return layers * per_layer + head


def activation_peak(seq: int, micro_batch: int, hidden: int, heads: int, layers: int = 1, *,
                    bytes_per_element: int = 2, dropout: bool = True, recompute: str = "none", flash: bool = False,
                    tp: int = 1, vocab: int = 0) -> float:
    """Peak activation bytes of a training step (arguments as ``activation_memory``): the larger of what the
    forward stores (``activation_memory``) and the peak of the backward of the last layer.

    Walking the backward in PyTorch's order (a node's saved tensors are freed once it has run): by the last
    layer's second MLP linear the output layer's activations are gone; that node creates the gradient of the
    GeLU output, ``4 e s b h / t``, while the residual stream's, ``e s b h``, is live (the GeLU node after it
    holds as much: the GeLU output freed, its input's gradient created): the layers' stored activations
    ``+ (4 / t + 1) e s b h``.  With recompute "full" the layer's activations come back first, less its input,
    which is stored already: ``+ activation_memory(layer) - e s b h``.  Not counted (not activations): the
    gradients of that linear's weight and bias, ``4 h^2 / t + h`` elements the node creates (added into an
    existing ``.grad`` after it, or kept unsharded by FSDP).  Without flash attention the softmax's backward,
    which holds two ``a s^2 b`` gradients, may peak higher."""
    stored = activation_memory(seq, micro_batch, hidden, heads, layers, bytes_per_element=bytes_per_element,
                               dropout=dropout, recompute=recompute, flash=flash, tp=tp, vocab=vocab)
    head = stored - activation_memory(seq, micro_batch, hidden, heads, layers, bytes_per_element=bytes_per_element,
                                      dropout=dropout, recompute=recompute, flash=flash, tp=tp)
    e_sbh = bytes_per_element * seq * micro_batch * hidden
    backward = stored - head + (4 / tp + 1) * e_sbh
    if recompute == "full":
        backward += activation_memory(seq, micro_batch, hidden, heads, bytes_per_element=bytes_per_element,
                                      dropout=dropout, flash=flash, tp=tp) - e_sbh
    return max(stored, backward)


def fsdp_unsharded(block_params: float, root_params: float, *, param_bytes: int = 4,
                   grad_bytes: Optional[int] = None, prefetch: int = 1) -> float:
    """Bytes FSDP2 (``fully_shard`` per block, then the root) holds unsharded at the backward's peak, in the
    last block's backward, on top of its shards: that block's gathered parameters and the ``prefetch`` next
    blocks' (FSDP2 issues the next block's all-gather when a block's backward starts), the root module's
    gathered parameters and its unsharded gradients (the root's backward spans the whole backward: gathered
    at its start, reduced in the root's post-backward at the end; an upper bound: by the peak only the
    output layer's gradients exist).
    ``block_params`` / ``root_params``: element counts of one block / the root's own parameters, unsharded
    (tensor-parallel: this rank's part).  The block's own gradients made by the peak node are not included."""
    real("block_params", block_params, unit="elements")
    real("root_params", root_params, unit="elements")
    count("prefetch", prefetch, 0)
    real("param_bytes", param_bytes, strict=True)
    grad_bytes = param_bytes if grad_bytes is None else real("grad_bytes", grad_bytes, strict=True)
    return param_bytes * ((1 + prefetch) * block_params + root_params) + grad_bytes * root_params


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
                      zero_stage: int = 0, dp: int = 1, ddp_buckets: bool = False,
                      activations: Union[float, dict] = 0.0) -> MemoryEstimate:
    """Memory of one data-parallel rank holding ``n_params`` parameters (already divided by TP x PP if any).

    Model states per the module docstring, ZeRO stage 1/2/3 divides optimizer state / + grads / + params by
    ``dp`` (Rajbhandari et al. 2020).  ``ddp_buckets``: PyTorch DDP with ``gradient_as_bucket_view=False`` (its
    default, and ``DDPTrainer``'s) keeps its flat all-reduce buckets besides the ``.grad`` tensors, a second
    copy of the gradients (the DDP docs of that argument: setting it "saves ... the total gradients size"),
    counted in ``grads``.  ``activations``: bytes, or the keyword arguments of ``activation_memory`` for the
    step's peak (``activation_peak``: the stored activations, or the backward's peak with the recomputed layer
    under ``recompute="full"``)."""
    zero_stage, dp = count("zero_stage", zero_stage, 0, 3), count("dp", dp)
    real("param_bytes", param_bytes, strict=True)
    grad_bytes = param_bytes if grad_bytes is None else real("grad_bytes", grad_bytes, strict=True)
    if ddp_buckets and zero_stage:
        raise ValueError(f"ddp_buckets: DDP's gradient buckets exist without ZeRO sharding, got "
                         f"zero_stage={zero_stage}")
    state = optimizer_state_bytes(n_params, optimizer, state_dtype, master_weights)
    shard = [1.0] + [1.0 / dp if zero_stage >= stage else 1.0 for stage in (1, 2, 3)]
    if isinstance(activations, dict):
        act = activation_peak(**activations)
    else:
        act = real("activations", activations, unit="bytes")
    return MemoryEstimate(params=n_params * param_bytes * shard[3],
                          grads=n_params * grad_bytes * shard[2] * (2 if ddp_buckets else 1),
                          optimizer=state * shard[1], activations=act)


class PeakMemory(TorchDispatchMode):
    """Measures the peak bytes of live CPU tensor storage while active (``with PeakMemory() as m: ...;
    m.peak``): every op's output storage is tracked from when it appears until it is freed (storage Python
    objects live exactly as long as their storage, so a weak reference marks the free), and ``current``, the
    sum of the tracked storages' sizes, is read after every op.  Sizes are read again each time, so storages
    resized in place count at their size of the moment (FSDP2 frees and re-allocates its gathered
    parameters with ``untyped_storage().resize_``, which is no op).  Outputs of tensor subclasses (DTensor)
    count their inner tensors.  Tensors created before entering are not counted; allocations that never
    become an op output seen here (a kernel's scratch buffers, the local ops inside a subclass's dispatch)
    are not seen."""

    def __init__(self):
        super().__init__()
        self.peak = 0
        self._live: Dict[int, weakref.ref] = {}

    @property
    def current(self) -> int:
        """Bytes of the tracked storages that are alive now."""
        return sum(storage.nbytes() for storage in (ref() for ref in list(self._live.values())) if storage is not None)

    def _track(self, tensor: torch.Tensor) -> None:
        if is_traceable_wrapper_subclass(tensor):
            for name in tensor.__tensor_flatten__()[0]:
                inner = getattr(tensor, name)
                if isinstance(inner, torch.Tensor):
                    self._track(inner)
            return
        if tensor.device.type != "cpu" or tensor.is_sparse:
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in self._live:
            self._live[key] = weakref.ref(storage, lambda _, key=key: self._live.pop(key, None))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        self.peak = max(self.peak, self.current)
        return out
