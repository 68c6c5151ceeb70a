"""One-call swap of pytrain's kernels into models you did not write.

    report = pytrain.swap(model)        # in place; returns what was swapped, where, and why not
    print(report)                       # a table; run-time declines are added as calls happen
    pytrain.unswap(model)               # the originals back, bit for bit

    with pytrain.patch_sdpa() as report:        # or pytrain.patch_sdpa() / patch_sdpa(False): global switch
        model(x)                                # F.scaled_dot_product_attention -> pytrain.ops.flash_attention

The swap is driven by ``RULES``, a table of (module, condition, replacement): the first rule whose
module test matches a submodule applies; its condition returns None (swap) or the reason it keeps
PyTorch's module.  Every replacement returns the function that undoes it.

* ``torch.nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer`` / ``DecoderLayer``):
  its class becomes a subclass of ``pytrain.nn.MultiheadAttention`` (same parameter objects, so an
  optimizer built before the swap keeps working; same state_dict).  Note that an encoder layer's
  inference fast path (eval mode, no grad) runs PyTorch's fused kernel without calling the module.
* Hugging Face transformers models: ``attn_implementation`` set to ``"pytrain"``
  (``pytrain.integrations.transformers``); causal LMs (LLaMA, Mistral, GPT-2, Qwen2, Gemma 2...) also compute
  the training ``loss`` from ``labels`` by ``pytrain.ops.linear_cross_entropy`` without building the logits
  (those outputs have ``logits=None``; inference and evaluation are unchanged).
* Modules whose ``forward`` calls ``scaled_dot_product_attention`` (timm ViTs and many others):
  their forward runs under ``patch_sdpa``.  Code that imported the function by name
  (``from torch.nn.functional import scaled_dot_product_attention``) is not reached.

``patch_sdpa`` routes the calls ``flash_attention`` computes exactly (4-D q/k/v, no mask,
``is_causal`` with seqlen_q == seqlen_k since SDPA aligns causal masks top-left, GQA with
``enable_gqa``, head dim 16..256, fp32/bf16/fp16) and passes every other call (masks, attention
bias, ...) to PyTorch unchanged, counting it with its reason in the report.  It refuses (ValueError) a
key and value of different sequence lengths, which PyTorch's CPU kernel accepts and answers with
garbage that changes from call to call.
"""
from __future__ import annotations

import inspect
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .integrations._routing import ATTRIBUTE, ROUTED, attention_inputs, kernel_decline_reason, record_call  # noqa: F401
from .nn.attention import MultiheadAttention as _PytrainMHA
from .ops import attention as attention_op
from .ops.attention import flash_attention


# ------------------------------------------------------------------------------------------ report
@dataclass
class Entry:
    path: str  # the module's qualified name in the model ("" for the model itself)
    found: str  # what was there
    now: str  # what runs now ("" when kept)
    note: str = ""  # why it was kept, or what to know


@dataclass
class SwapReport:
    """What ``swap`` replaced and kept, and per module the calls that ran pytrain or went to PyTorch."""

    entries: List[Entry] = field(default_factory=list)
    calls: Counter = field(default_factory=Counter)  # (path, ROUTED or decline reason) -> calls
    optimizer: Optional[torch.optim.Optimizer] = None  # the converted optimizer, when one was given
    undo: List[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def swapped(self) -> List[Entry]:
        return [e for e in self.entries if e.now]

    @property
    def kept(self) -> List[Entry]:
        return [e for e in self.entries if not e.now]

    @property
    def declined_calls(self) -> Counter:
        """(path, reason) -> number of calls that went to PyTorch."""
        return Counter({key: n for key, n in self.calls.items() if key[1] != ROUTED})

    def record(self, path: str, reason: Optional[str]) -> None:
        self.calls[(path, reason or ROUTED)] += 1

    def __str__(self) -> str:
        routed = sum(n for (_, outcome), n in self.calls.items() if outcome == ROUTED)
        declined = sum(self.declined_calls.values())
        lines = [f"pytrain.swap: {len(self.swapped)} swapped, {len(self.kept)} kept; "
                 f"calls so far: {routed} ran pytrain, {declined} went to PyTorch"]
        rows = [(e.path or "(model)", e.found, e.now or "kept", e.note) for e in self.entries]
        if self.optimizer is not None:
            rows.append(("(optimizer)", "torch.optim", type(self.optimizer).__name__, ""))
        lines += _table(("module", "found", "now", "note"), rows)
        if self.declined_calls:
            lines += ["", "calls that went to PyTorch:"]
            lines += _table(("module", "calls", "reason"),
                            [(path or "(model)", str(n), reason) for (path, reason), n in self.declined_calls.items()])
        return "\n".join(lines)


def _table(header: Tuple[str, ...], rows: List[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths))] + \
        [fmt.format(*r).rstrip() for r in rows]


# ------------------------------------------------------------------------------------------ patch_sdpa
_ORIGINAL_SDPA = F.scaled_dot_product_attention
_active: List[Tuple[SwapReport, str]] = []  # innermost last; the routed calls are counted in the innermost


def sdpa_decline_reason(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                        enable_gqa: bool) -> Optional[str]:
    """Why a ``scaled_dot_product_attention`` call must go to PyTorch (None: flash attention computes it)."""
    if attn_mask is not None:
        return "attn_mask given (arbitrary masks and attention biases stay with PyTorch)"
    if not query.dim() == key.dim() == value.dim() == 4:
        return f"{query.dim()}-D inputs (only (batch, heads, seqlen, headdim))"
    if any(t.is_nested for t in (query, key, value)):
        return "nested tensors"
    if is_causal and query.shape[2] != key.shape[2]:
        return "is_causal with seqlen_q != seqlen_k (SDPA aligns top-left, flash attention bottom-right)"
    if query.shape[1] != key.shape[1] and not enable_gqa:
        return "different q and k/v head counts without enable_gqa (PyTorch raises the error)"
    return kernel_decline_reason(query, key, value)


def _check_kv_lengths(key, value) -> None:
    """ValueError unless key and value hold as many positions (dim -2): each output row is a softmax-weighted
    sum of value rows, one per key.  PyTorch's CPU SDPA does not check this and reads past the shorter one."""
    if (isinstance(key, Tensor) and isinstance(value, Tensor) and not (key.is_nested or value.is_nested)
            and key.dim() >= 2 and value.dim() >= 2 and key.shape[-2] != value.shape[-2]):
        raise ValueError(f"scaled_dot_product_attention: key and value must have the same sequence length "
                         f"(dim -2), got key {tuple(key.shape)} and value {tuple(value.shape)}")


def _routed_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                 enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` while ``patch_sdpa`` is on (same signature)."""
    _check_kv_lengths(key, value)
    reason = sdpa_decline_reason(query, key, value, attn_mask, is_causal, enable_gqa)
    if _active:
        _active[-1][0].record(_active[-1][1], reason)
    if reason is not None:
        extra = {"enable_gqa": True} if enable_gqa else {}
        return _ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, **extra)
    q, k, v = attention_inputs(query, key, value)
    return flash_attention(q, k, v, causal=is_causal, scale=scale, dropout_p=dropout_p)


def _install(on: bool) -> None:
    F.scaled_dot_product_attention = _routed_sdpa if on else _ORIGINAL_SDPA


class patch_sdpa:  # noqa: N801  (used like a function, as torch.set_grad_enabled)
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to pytrain's flash attention.

    ``with patch_sdpa() as report:`` routes inside the block (nesting is fine) and counts the calls in
    ``report`` (a ``SwapReport``); ``patch_sdpa()`` alone switches routing on globally until
    ``patch_sdpa(False)``, which switches every routing off.
    """

    def __init__(self, enabled: bool = True, *, report: Optional[SwapReport] = None, where: str = "sdpa"):
        self.report = report if report is not None else SwapReport()
        if not enabled:
            _active.clear()
            _install(False)
            return
        _active.append((self.report, where))
        _install(True)

    def __enter__(self) -> SwapReport:
        return self.report

    def __exit__(self, *exc) -> None:
        for i in range(len(_active) - 1, -1, -1):
            if _active[i][0] is self.report:
                del _active[i]
                break
        if not _active:
            _install(False)


def sdpa_patched() -> bool:
    """Whether ``F.scaled_dot_product_attention`` is routed to pytrain right now."""
    return F.scaled_dot_product_attention is _routed_sdpa


# ------------------------------------------------------------------------------------------ rules
class SwappedMultiheadAttention(_PytrainMHA):
    """``pytrain.nn.MultiheadAttention`` that counts each call's outcome in the swap report."""

    def decline_reason(self, query, key_padding_mask, need_weights, attn_mask, is_causal, key=None, value=None):
        reason = super().decline_reason(query, key_padding_mask, need_weights, attn_mask, is_causal, key, value)
        record_call(self, reason)
        return reason


def _mha_condition(m: nn.MultiheadAttention) -> Optional[str]:
    head_dim = m.embed_dim // m.num_heads
    reason = attention_op.head_dim_unsupported(head_dim)
    if reason:
        return reason
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv / add_zero_attn"
    return None


def _swap_mha(m: nn.MultiheadAttention, report: SwapReport, path: str) -> Callable[[], None]:
    original = m.__class__
    m.__class__ = SwappedMultiheadAttention

    def undo():
        m.__class__ = original
    return undo


def _calls_sdpa(m: nn.Module) -> bool:
    forward = inspect.unwrap(type(m).forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "scaled_dot_product_attention" in code.co_names


def _sdpa_condition(m: nn.Module) -> Optional[str]:
    if getattr(m, "fused_attn", True) is False:
        return "fused_attn=False: the module computes attention by hand, not through SDPA"
    return None


def _swap_sdpa_caller(m: nn.Module, report: SwapReport, path: str) -> Callable[[], None]:
    forward = m.forward

    def routed_forward(*args, **kwargs):
        with patch_sdpa(report=report, where=path):
            return forward(*args, **kwargs)

    m.forward = routed_forward

    def undo():
        del m.forward
    return undo


def _is_hf_model(m: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # never import transformers for a model that cannot be one
        return False
    from transformers import PreTrainedModel
    return isinstance(m, PreTrainedModel)


def _hf_condition(m: nn.Module) -> Optional[str]:
    from .integrations.transformers import decline_reason_for_model
    return decline_reason_for_model(m)


def _swap_hf(m: nn.Module, report: SwapReport, path: str) -> Callable[[], None]:
    """Attention through ``attn_implementation="pytrain"``, and for causal LMs the training loss through the
    fused linear cross-entropy (its own report entry; calls counted under ``path + " (loss)"``)."""
    from .integrations.transformers import FUSED_LOSS, fused_loss_decline_reason, use_fused_loss, use_pytrain
    undo_attention = use_pytrain(m)
    reason = fused_loss_decline_reason(m)
    report.entries.append(Entry(path, "transformers loss (logits + F.cross_entropy)", "" if reason else FUSED_LOSS,
                                reason or ""))
    if reason is not None:
        return undo_attention
    undo_loss = use_fused_loss(m, lambda why: report.record(f"{path} (loss)" if path else "(loss)", why))

    def undo():
        undo_loss()
        undo_attention()
    return undo


@dataclass(frozen=True)
class Rule:
    """module: does the rule apply to this submodule; condition: None to swap, or why not;
    replacement: swaps in place and returns the undo."""

    found: str
    module: Callable[[nn.Module], bool]
    condition: Callable[[nn.Module], Optional[str]]
    now: str
    replacement: Callable[[nn.Module, SwapReport, str], Callable[[], None]]
    covers_submodules: bool = False  # a swap of this module already reaches its submodules


RULES: List[Rule] = [
    Rule("torch.nn.MultiheadAttention", lambda m: type(m) is nn.MultiheadAttention, _mha_condition,
         "pytrain.nn.MultiheadAttention", _swap_mha),
    Rule("transformers model", _is_hf_model, _hf_condition, 'attn_implementation="pytrain"', _swap_hf,
         covers_submodules=True),
    Rule("F.scaled_dot_product_attention caller", _calls_sdpa, _sdpa_condition, "forward under patch_sdpa",
         _swap_sdpa_caller),
]


# ------------------------------------------------------------------------------------------ swap
def swap(model: nn.Module, *, attention: bool = True, optimizer: Optional[torch.optim.Optimizer] = None,
         schedulers=(), inplace: bool = True) -> SwapReport:
    """Put pytrain's kernels into ``model`` where they compute the same thing; returns the report.

    Args:
        model: any ``nn.Module`` (plain torch, timm, Hugging Face transformers).
        attention: swap attention (the ``RULES`` table).
        optimizer: a ``torch.optim.AdamW`` / ``Adam`` to convert (``pytrain.optim.from_torch``); the
            converted optimizer is ``report.optimizer`` (step that one from now on).
        schedulers: LR schedulers bound to ``optimizer``, re-bound to the converted one.
        inplace: must be True: the model is changed in place (``unswap`` restores it).  Deep-copy the
            model first to keep an untouched one.
    """
    _check_model("pytrain.swap", model)
    if not inplace:
        raise ValueError("pytrain.swap: only inplace=True is supported; swap a copy.deepcopy(model) instead")
    if ATTRIBUTE in model.__dict__:
        raise RuntimeError("pytrain.swap: this model is already swapped (call pytrain.unswap(model) first)")
    report = SwapReport()
    if attention:
        _apply_rules(model, report)
    if optimizer is not None:
        from .optim.convert import from_torch
        report.optimizer = from_torch(optimizer, schedulers=schedulers)
    for path, module in model.named_modules():
        module.__dict__[ATTRIBUTE] = (report, path)
    return report


def _check_model(caller: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")


def _apply_rules(model: nn.Module, report: SwapReport) -> None:
    covered: List[str] = []  # paths whose swap already reaches their submodules
    for path, module in model.named_modules():
        if any(path.startswith(prefix) for prefix in covered):
            continue
        rule = next((r for r in RULES if r.module(module)), None)
        if rule is None:
            continue
        reason = rule.condition(module)
        report.entries.append(Entry(path, rule.found, "" if reason else rule.now, reason or ""))
        if reason is None:
            report.undo.append(rule.replacement(module, report, path))
            if rule.covers_submodules:
                covered.append(f"{path}." if path else "")


def unswap(model: nn.Module) -> SwapReport:
    """Undo ``swap(model)`` (the optimizer conversion stays); returns the swap's report."""
    _check_model("pytrain.unswap", model)
    tag = model.__dict__.get(ATTRIBUTE)
    if tag is None:
        raise RuntimeError("pytrain.unswap: this model was not swapped by pytrain.swap")
    report = tag[0]
    for undo in reversed(report.undo):
        undo()
    report.undo.clear()
    for module in model.modules():
        module.__dict__.pop(ATTRIBUTE, None)
    return report
