"""Bad and edge inputs for pytrain.ops and pytrain.comm's tensor ops: the multi-tensor optimizer steps
(adamw_step, lars_step, lamb_step), global_norm, flash_attention, the group quantizer, topk, the PowerSGD
pieces, linear_cross_entropy and linear_distillation_loss.  Every case runs in a worker process
(``pytrain.testing.robustness``): these calls reach C++ code.

Expected outcomes: a clear error naming the argument (``Raises``), or the float64 reference's result
(``Correct``: NaN / Inf inputs must give what the reference gives), or, for layouts an op may either serve or
refuse (non-contiguous, expanded read-only inputs), ``Either``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List

import torch

from pytrain.testing.robustness import Case, Correct, Either, Raises

F32, F64 = torch.float32, torch.float64
BAD_DTYPES = {"int32": torch.int32, "bool": torch.bool, "complex64": torch.complex64}
F64_EXACT = Correct(atol=1e-6, rtol=1e-5)  # float32 kernels against the float64 reference


def rand(*shape, dtype=F32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).to(dtype)


def retype(t: torch.Tensor, dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return t > 0
    return (t * 4).to(dtype) if not dtype.is_floating_point and not dtype.is_complex else t.to(dtype)


# layouts: the same values in another memory layout
def transposed(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major (non-contiguous, dense)."""
    return t.t().contiguous().t() if t.dim() == 2 else t[..., None].expand(*t.shape, 2)[..., 0]


def strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, every other element of a larger buffer (non-contiguous, not dense)."""
    buf = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype)
    buf[..., ::2] = t
    return buf[..., ::2]


def expanded(t: torch.Tensor) -> torch.Tensor:
    """First row repeated by a stride-0 view: elements share memory (overlapping)."""
    return t[:1].expand(t.shape) if t.dim() >= 1 else t


LAYOUTS = {"transposed": transposed, "strided": strided}


# ================================================================ multi-tensor optimizer steps
SHAPES = ((5, 7), (3, 4))


def _states(op: str, params: List[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
    if op == "adamw_step":
        return {"exp_avgs": [rand(*p.shape, seed=3 + i) * 0.1 for i, p in enumerate(params)],
                "exp_avg_sqs": [rand(*p.shape, seed=5 + i).abs() * 0.01 for i, p in enumerate(params)]}
    if op == "lars_step":
        return {"momentum_buffers": [rand(*p.shape, seed=3 + i) * 0.1 for i, p in enumerate(params)]}
    return {"exp_avgs": [rand(*p.shape, seed=3 + i) * 0.1 for i, p in enumerate(params)],
            "exp_avg_sqs": [rand(*p.shape, seed=5 + i).abs() * 0.01 for i, p in enumerate(params)]}


HYPER = {
    "adamw_step": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3),
    "lars_step": dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8,
                      nesterov=False, trust_clip=False, adapt=True, init_buffers=False),
    "lamb_step": dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.01,
                      bias_correction1=0.271, bias_correction2=0.003, grad_scale=1.0, adapt=True, trust_clip=False),
}
LISTS = {"adamw_step": ("params", "grads", "exp_avgs", "exp_avg_sqs"),
         "lars_step": ("params", "grads", "momentum_buffers"),
         "lamb_step": ("params", "grads", "exp_avgs", "exp_avg_sqs")}


def make_lists(op: str, dtype=F32) -> Dict[str, List[torch.Tensor]]:
    params = [rand(*s, dtype=dtype, seed=i) for i, s in enumerate(SHAPES)]
    grads = [rand(*s, dtype=dtype, seed=10 + i) for i, s in enumerate(SHAPES)]
    states = {k: [t.to(dtype) for t in v] for k, v in _states(op, params).items()}
    return {"params": params, "grads": grads, **states}


def call_step(op: str, lists: Dict[str, List], impl=None, **hyper) -> None:
    import pytrain.ops as ops

    kw = {**HYPER[op], **hyper}
    if op == "adamw_step":
        ops.adamw_step(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], [], [], [], [],
                       impl=impl, **kw)
    elif op == "lars_step":
        ops.lars_step(lists["params"], lists["grads"], lists["momentum_buffers"], impl=impl, **kw)
    else:
        ops.lamb_step(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"], impl=impl, **kw)


def reference_step(op: str, lists: Dict[str, List], ref_dtype=F64, **hyper) -> Dict[str, List[torch.Tensor]]:
    """The op's own reference on contiguous copies in ``ref_dtype`` (float64; or None: the inputs' dtype, where
    float32 arithmetic itself overflows or cancels and float64 would answer another question)."""
    from pytrain.ops import adamw, lamb, lars

    ref = {k: [t.detach().to(ref_dtype or t.dtype).contiguous().clone() for t in v] for k, v in lists.items()}
    kw = {**HYPER[op], **hyper}
    if op == "adamw_step":
        steps = kw["step"] if isinstance(kw["step"], list) else [torch.tensor(float(kw["step"]))] * len(ref["params"])
        adamw.adamw_step_reference(ref["params"], ref["grads"], ref["exp_avgs"], ref["exp_avg_sqs"], [], [], [], [],
                                   kw["lr"], kw["beta1"], kw["beta2"], kw["eps"], kw["weight_decay"], steps,
                                   False, False, 1.0)
    elif op == "lars_step":
        lars.lars_step_reference(ref["params"], ref["grads"], ref["momentum_buffers"], *kw.values())
    else:
        lamb.lamb_step_reference(ref["params"], ref["grads"], ref["exp_avgs"], ref["exp_avg_sqs"], *kw.values())
    return ref


def step_result(op: str, edit: Callable[[Dict[str, List]], None] = lambda lists: None, dtype=F32, impl=None,
                ref_dtype=F64, **hyper):
    """Run the op on inputs changed by ``edit`` and its reference on the same values: (got, want) over every
    list the op writes."""
    lists = make_lists(op, dtype)
    edit(lists)
    want = reference_step(op, lists, ref_dtype, **hyper)
    call_step(op, lists, impl=impl, **hyper)
    written = [k for k in LISTS[op] if k != "grads"]
    return [lists[k] for k in written], [want[k] for k in written]


def step_call(op: str, edit: Callable[[Dict[str, List]], None], **hyper):
    def run():
        lists = make_lists(op)
        edit(lists)
        call_step(op, lists, **hyper)
        return [lists[k] for k in LISTS[op] if k != "grads"]
    return run


def _set(slot: str, index: int, fn: Callable[[torch.Tensor], object]):
    def edit(lists):
        lists[slot][index] = fn(lists[slot][index])
    return edit


def step_cases() -> List[Case]:
    out: List[Case] = []
    for op in ("adamw_step", "lars_step", "lamb_step"):
        fam = f"ops.{op}"
        for slot in LISTS[op]:
            name = rf"{slot}\[1\]"
            who = r"(params\[1\]|grads\[1\])" if slot in ("params", "grads") else name
            for dname, dt in BAD_DTYPES.items():
                out.append(Case(fam, f"{slot}_{dname}", step_call(op, _set(slot, 1, lambda t, dt=dt: retype(t, dt))),
                                Raises(TypeError, who)))
            other = torch.float64 if slot != "params" else torch.float16
            out.append(Case(fam, f"{slot}_mixed_dtype", step_call(op, _set(slot, 1, lambda t, o=other: t.to(o))),
                            Raises(TypeError, who)))
            out.append(Case(fam, f"{slot}_same_numel_other_shape",
                            step_call(op, _set(slot, 1, lambda t: t.reshape(-1))), Raises(ValueError, who)))
            out.append(Case(fam, f"{slot}_fewer_elements",
                            step_call(op, _set(slot, 1, lambda t: t.reshape(-1)[:-1].clone())),
                            Raises((ValueError, RuntimeError), who)))
            out.append(Case(fam, f"{slot}_meta", step_call(op, _set(slot, 1, lambda t: t.to("meta"))),
                            Raises((RuntimeError, ValueError), who)))
            out.append(Case(fam, f"{slot}_none", step_call(op, _set(slot, 1, lambda t: None)),
                            Raises(TypeError, who)))
            out.append(Case(fam, f"{slot}_str", step_call(op, _set(slot, 1, lambda t: "x")), Raises(TypeError, who)))
            out.append(Case(fam, f"{slot}_short_list", step_call(op, lambda lists, s=slot: lists[s].pop()),
                            Raises(ValueError, slot)))
            for lname, layout in LAYOUTS.items():
                out.append(Case(fam, f"{slot}_{lname}",
                                lambda op=op, slot=slot, layout=layout: step_result(op, _set(slot, 1, layout)),
                                Either(Raises(ValueError, who + ".*contiguous"), F64_EXACT)))
            if slot == "grads":  # read-only: an overlapping view is a valid input
                out.append(Case(fam, "grads_expanded", lambda op=op: step_result(op, _set("grads", 1, expanded)),
                                Either(Raises(ValueError, who + ".*contiguous"), F64_EXACT)))
            else:  # written in place: overlapping elements cannot all hold their update
                out.append(Case(fam, f"{slot}_expanded", step_call(op, _set(slot, 1, expanded)),
                                Raises((ValueError, RuntimeError), who)))
        # a single tensor where a list is expected
        out.append(Case(fam, "params_not_a_list", step_call(op, lambda lists: lists.update(params=lists["params"][0])),
                        Raises(TypeError, "params")))
        # values: empty tensors, NaN / Inf gradients and params: what the reference gives
        empty = lambda t: t.new_empty(0)  # noqa: E731
        out.append(Case(fam, "all_empty_tensors",
                        lambda op=op: step_result(op, lambda ls: ls.update({k: [empty(t) for t in v]
                                                                             for k, v in ls.items()})), F64_EXACT))
        out.append(Case(fam, "empty_lists", lambda op=op: step_result(op, lambda ls: ls.update({k: [] for k in ls})),
                        F64_EXACT))
        for vname, value in (("nan", math.nan), ("inf", math.inf), ("neg_inf", -math.inf), ("huge", 1e30)):
            for slot in ("grads", "params"):
                def poke(lists, slot=slot, value=value):
                    lists[slot][0][2, 3] = value
                out.append(Case(fam, f"{slot}_{vname}", lambda op=op, poke=poke: step_result(op, poke, ref_dtype=None),
                                F64_EXACT))
        out.append(Case(fam, "float64", lambda op=op: step_result(op, dtype=F64), Correct(1e-12, 1e-10)))
        out.append(Case(fam, "bfloat16", lambda op=op: step_result(op, dtype=torch.bfloat16),
                        Correct(1e-5, 2.0**-7)))
        out.append(Case(fam, "impl_unknown", step_call(op, lambda lists: None, impl="nonexistent"),
                        Raises(RuntimeError, "nonexistent")))
        # hyperparameters: the ops compute what the reference computes (validation is the optimizers' job),
        # and refuse values of the wrong type naming the argument
        for hname in ("lr", "eps", "weight_decay"):
            for vname, value in (("nan", math.nan), ("inf", math.inf), ("negative", -1.0), ("zero", 0.0)):
                out.append(Case(fam, f"{hname}_{vname}",
                                lambda op=op, h=hname, v=value: step_result(op, ref_dtype=None, **{h: v}),
                                F64_EXACT))
            for vname, value in (("none", None), ("str", "0.1")):
                out.append(Case(fam, f"{hname}_{vname}", step_call(op, lambda lists: None, **{hname: value}),
                                Raises((TypeError, RuntimeError), hname)))
    out.append(Case("ops.adamw_step", "step_zero", step_call("adamw_step", lambda ls: None, step=0),
                    Raises(ValueError, "step")))
    out.append(Case("ops.adamw_step", "step_negative", step_call("adamw_step", lambda ls: None, step=-4),
                    Raises(ValueError, "step")))
    out.append(Case("ops.adamw_step", "step_float", step_call("adamw_step", lambda ls: None, step=1.5),
                    Raises((TypeError, RuntimeError), "step")))
    # one step count per param, as tensors (the optimizer's state["step"]): each param's own bias corrections
    def steps(*counts):
        return [torch.tensor(float(c)) for c in counts] + [torch.tensor(1.0)] * (len(SHAPES) - len(counts))

    out.append(Case("ops.adamw_step", "step_tensors_differ",
                    lambda: step_result("adamw_step", step=steps(3, 7)), F64_EXACT))
    out.append(Case("ops.adamw_step", "step_tensor_zero", step_call("adamw_step", lambda ls: None, step=steps(1, 0)),
                    Raises((ValueError, RuntimeError), "step must be >= 1")))
    out.append(Case("ops.adamw_step", "step_tensors_count",
                    step_call("adamw_step", lambda ls: None, step=steps()[:1]),
                    Raises((ValueError, RuntimeError), "steps has 1 tensors")))
    out.append(Case("ops.adamw_step", "step_tensor_shape",
                    step_call("adamw_step", lambda ls: None, step=[torch.ones(2)] + steps()[1:]),
                    Raises((ValueError, RuntimeError), "one-element")))
    out.append(Case("ops.lars_step", "momentum_without_buffers",
                    step_call("lars_step", lambda ls: ls.update(momentum_buffers=[])),
                    Raises(ValueError, "momentum")))
    return out


# ================================================================ global_norm
def _norm_case(tensors_fn, impl=None, dtype_out=None):
    def run():
        import pytrain.ops as ops
        tensors = tensors_fn()
        got = ops.global_norm(tensors, impl=impl)
        want = torch.sqrt(sum((t.detach().to(F64) ** 2).sum() for t in tensors)) if tensors else torch.tensor(0.0)
        return got, want
    return run


def _norm_call(tensors_fn, impl=None):
    def run():
        import pytrain.ops as ops
        return ops.global_norm(tensors_fn(), impl=impl)
    return run


def global_norm_cases() -> List[Case]:
    fam = "ops.global_norm"
    out = []
    for dname, dt in BAD_DTYPES.items():
        out.append(Case(fam, f"tensors_{dname}", _norm_call(lambda dt=dt: [rand(5, 7), retype(rand(3, 4), dt)]),
                        Raises(TypeError, r"tensors\[1\]")))
    out.append(Case(fam, "tensors_mixed_dtype", _norm_call(lambda: [rand(5, 7), rand(3, 4, dtype=F64)]),
                    Raises(TypeError, r"tensors\[1\]")))
    out.append(Case(fam, "tensors_meta_and_cpu", _norm_call(lambda: [rand(5, 7), rand(3, 4).to("meta")]),
                    Raises((RuntimeError, ValueError), r"tensors\[1\].*meta|meta")))
    out.append(Case(fam, "tensors_all_meta", lambda: (__import__("pytrain").ops.global_norm(
        [rand(5, 7).to("meta")]), torch.empty((), device="meta")),
        Either(Raises((RuntimeError, ValueError), "meta"), Correct())))
    out.append(Case(fam, "tensors_none_item", _norm_call(lambda: [rand(5, 7), None]), Raises(TypeError, r"tensors\[1\]")))
    out.append(Case(fam, "tensors_not_a_list", _norm_call(lambda: rand(5, 7)), Raises(TypeError, "tensors")))
    for lname, layout in {**LAYOUTS, "expanded": expanded}.items():
        out.append(Case(fam, f"tensors_{lname}", _norm_case(lambda layout=layout: [rand(5, 7), layout(rand(3, 4))]),
                        Either(Raises(ValueError, r"\[1\].*contiguous"), F64_EXACT)))
    out.append(Case(fam, "empty_list", _norm_case(lambda: []), F64_EXACT))
    out.append(Case(fam, "empty_tensors", _norm_case(lambda: [rand(0), rand(0, 3)]), F64_EXACT))
    out.append(Case(fam, "scalar_tensor", _norm_case(lambda: [torch.tensor(3.0), torch.tensor(-4.0)]), F64_EXACT))
    out.append(Case(fam, "float64", _norm_case(lambda: [rand(5, 7, dtype=F64)]), Correct(1e-12, 1e-10)))
    out.append(Case(fam, "float16", _norm_case(lambda: [rand(5, 7, dtype=torch.float16)]), Correct(1e-3, 1e-3)))
    for impl in ("cpu", "reference", "triton"):  # triton: interpreted here (TRITON_INTERPRET=1)
        for vname, scale in (("huge_1e20", 1e20), ("huge_1e30", 1e30), ("tiny_1e-25", 1e-25)):
            out.append(Case(fam, f"{vname}_{impl}", _norm_case(lambda s=scale: [rand(64) * s], impl=impl),
                            Correct(0.0, 1e-5)))
        for vname, value in (("nan", math.nan), ("inf", math.inf)):
            def poked(value=value):
                t = rand(5, 7)
                t[1, 1] = value
                return [rand(3), t]
            out.append(Case(fam, f"{vname}_{impl}", _norm_case(poked, impl=impl), F64_EXACT))
    return out


# ================================================================ flash_attention
def qkv(b=1, h=2, lq=5, lk=6, d=16, hk=None, dtype=F32):
    hk = hk or h
    return rand(b, h, lq, d, dtype=dtype), rand(b, hk, lk, d, dtype=dtype, seed=1), rand(b, hk, lk, d, dtype=dtype,
                                                                                          seed=2)


def attn_ref(q, k, v, causal=False, scale=None, window=(-1, -1)):
    from pytrain.ops.attention import attention_fwd_reference, seed_tensor
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return attention_fwd_reference(q.to(F64), k.to(F64), v.to(F64), scale, causal, window[0], window[1], 0.0,
                                   seed_tensor(0))[0]


def attn_result(make=qkv, impl=None, causal=False, scale=None, **kw):
    def run():
        from pytrain.ops import flash_attention
        q, k, v = make()
        got = flash_attention(q, k, v, causal=causal, scale=scale, impl=impl, **kw)
        return got, attn_ref(q, k, v, causal, scale)
    return run


def attn_call(make=qkv, **kw):
    def run():
        from pytrain.ops import flash_attention
        return flash_attention(*make(), **kw)
    return run


def attn_backward(make):
    """Gradients of sum(out * w) through flash_attention and through the float64 reference."""
    def run():
        from pytrain.ops import flash_attention
        q, k, v = (t.detach().requires_grad_() for t in make())
        w = rand(*q.shape, seed=9)
        (flash_attention(q, k, v) * w).sum().backward()
        leaves = [t.detach().to(F64).requires_grad_() for t in (q, k, v)]
        (attn_ref(*leaves) * w.to(F64)).sum().backward()
        return [q.grad, k.grad, v.grad], [t.grad for t in leaves]
    return run


def _with(fn, which: int, change):
    def make():
        t = list(fn())
        t[which] = change(t[which])
        return tuple(t)
    return make


def _raw_fwd(impl: str, seed):
    def run():
        op = torch.ops.pytrain.attention_fwd if impl == "cpu" else torch.ops.pytrain.attention_fwd_reference
        return list(op(*qkv(), 0.25, False, -1, -1, 0.1, seed))
    return run


def attention_cases() -> List[Case]:
    fam = "ops.flash_attention"
    out = []
    for i, name in enumerate("qkv"):
        for dname, dt in BAD_DTYPES.items():
            out.append(Case(fam, f"{name}_{dname}", attn_call(_with(qkv, i, lambda t, dt=dt: retype(t, dt))),
                            Raises(TypeError, "dtype")))
        out.append(Case(fam, f"{name}_float16_mixed", attn_call(_with(qkv, i, lambda t: t.half())),
                        Raises(TypeError, "share a dtype")))
        out.append(Case(fam, f"{name}_3d", attn_call(_with(qkv, i, lambda t: t[0])), Raises(ValueError, f"{name}")))
        out.append(Case(fam, f"{name}_5d", attn_call(_with(qkv, i, lambda t: t[None])), Raises(ValueError, f"{name}")))
        out.append(Case(fam, f"{name}_meta_mixed", attn_call(_with(qkv, i, lambda t: t.to("meta"))),
                        Raises(RuntimeError, "device")))
        out.append(Case(fam, f"{name}_none", attn_call(_with(qkv, i, lambda t: None)), Raises(TypeError, name)))
        for lname, layout in {"transposed": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
                              "strided": lambda t: torch.cat([t, t], -1)[..., ::2]}.items():
            out.append(Case(fam, f"{name}_{lname}", attn_result(_with(qkv, i, layout)), F64_EXACT))
    out.append(Case(fam, "kv_expanded_heads", attn_result(lambda: (rand(1, 4, 5, 16),) + tuple(
        t.expand(1, 4, 6, 16) for t in qkv(h=1)[1:])), F64_EXACT))
    out.append(Case(fam, "all_meta", lambda: (__import__("pytrain").ops.flash_attention(
        *(t.to("meta") for t in qkv())), torch.empty(1, 2, 5, 16, device="meta")),
        Either(Raises(RuntimeError, "meta"), Correct())))
    out.append(Case(fam, "kv_shape_mismatch", attn_call(lambda: (*qkv()[:2], rand(1, 2, 7, 16))),
                    Raises(ValueError, "k and v")))
    out.append(Case(fam, "batch_mismatch", attn_call(lambda: (rand(2, 2, 5, 16), *qkv()[1:])),
                    Raises(ValueError, "batch")))
    out.append(Case(fam, "head_dim_mismatch", attn_call(lambda: (rand(1, 2, 5, 32), *qkv()[1:])),
                    Raises(ValueError, "head dim")))
    out.append(Case(fam, "heads_not_multiple", attn_call(lambda: qkv(h=3, hk=2)), Raises(ValueError, "heads")))
    out.append(Case(fam, "kv_heads_zero", attn_call(lambda: qkv(h=2, hk=2)[:1] + (rand(1, 0, 6, 16),) * 2),
                    Raises(ValueError, "heads")))
    for d in (8, 15, 257, 512):
        out.append(Case(fam, f"head_dim_{d}", attn_call(lambda d=d: qkv(d=d)), Raises(ValueError, "head dim")))
    out.append(Case(fam, "head_dim_odd_24", attn_result(lambda: qkv(d=24)), F64_EXACT))
    out.append(Case(fam, "head_dim_256", attn_result(lambda: qkv(d=256, lq=3, lk=4)), Correct(1e-5, 1e-4)))
    out.append(Case(fam, "float64", attn_result(lambda: qkv(dtype=F64)), Correct(1e-12, 1e-10)))
    out.append(Case(fam, "gqa", attn_result(lambda: qkv(h=4, hk=2)), F64_EXACT))
    out.append(Case(fam, "empty_seqlen_q", attn_result(lambda: qkv(lq=0)), F64_EXACT))
    out.append(Case(fam, "empty_seqlen_k", lambda: (__import__("pytrain").ops.flash_attention(*qkv(lk=0)),
                                                   torch.zeros(1, 2, 5, 16)), F64_EXACT))
    out.append(Case(fam, "empty_batch", attn_result(lambda: qkv(b=0)), F64_EXACT))
    out.append(Case(fam, "seqlen_1", attn_result(lambda: qkv(lq=1, lk=1)), F64_EXACT))
    out.append(Case(fam, "causal_lq_gt_lk", attn_result(lambda: qkv(lq=7, lk=3), causal=True), F64_EXACT))
    out.append(Case(fam, "causal_lq_lt_lk", attn_result(lambda: qkv(lq=3, lk=7), causal=True), F64_EXACT))
    for name, i, value in (("q_nan", 0, math.nan), ("k_nan", 1, math.nan), ("v_nan", 2, math.nan),
                           ("k_inf", 1, math.inf), ("v_inf", 2, math.inf)):
        def make(i=i, value=value):
            t = list(qkv())
            t[i][0, 1, 2, 3] = value
            return tuple(t)
        out.append(Case(fam, name, attn_result(make, impl="cpu"), F64_EXACT))
    # large finite scores: any finite input must give the (stable) softmax
    for scale in (1e4, 3e9, 1e30):
        for impl in ("cpu", "reference", "triton"):
            out.append(Case(fam, f"scale_{scale:g}_{impl}", attn_result(impl=impl, scale=scale), F64_EXACT))
    out.append(Case(fam, "huge_values_1e18", attn_result(lambda: tuple(t * 1e18 for t in qkv()), impl="cpu"),
                    Correct(1e-6 * 1e18, 1e-5)))
    out.append(Case(fam, "scale_zero", attn_result(scale=0.0), F64_EXACT))
    out.append(Case(fam, "scale_negative", attn_result(scale=-0.5), F64_EXACT))
    for name, value in (("nan", math.nan), ("inf", math.inf), ("neg_inf", -math.inf)):
        out.append(Case(fam, f"scale_{name}", attn_call(scale=value), Raises(ValueError, "scale")))
    out.append(Case(fam, "scale_str", attn_call(scale="x"), Raises(TypeError, "scale")))
    for name, value in (("one", 1.0), ("negative", -0.1), ("nan", math.nan), ("inf", math.inf)):
        out.append(Case(fam, f"dropout_{name}", attn_call(dropout_p=value), Raises(ValueError, "dropout_p")))
    out.append(Case(fam, "dropout_str", attn_call(dropout_p="0.1"), Raises(TypeError, "dropout_p")))
    for name, value in (("float", 1.5), ("bool", True), ("tensor", torch.tensor(3))):
        out.append(Case(fam, f"seed_{name}", attn_call(dropout_p=0.1, seed=value), Raises(TypeError, "seed")))
    for impl in ("cpu", "reference"):  # the ops' seed: a one-element integer CPU tensor, checked by each backend
        for name, value in (("float_tensor", torch.tensor(3.0)), ("two_elements", torch.tensor([1, 2]))):
            out.append(Case(fam, f"op_seed_{name}_{impl}", _raw_fwd(impl, value),
                            Raises((ValueError, RuntimeError), "seed must be a one-element integer CPU tensor")))
    for name, window in (("negative", (-2, 0)), ("one_side", (1,)), ("float", (1.5, 0)), ("str", ("a", 0)),
                         ("bool", (True, 0))):
        out.append(Case(fam, f"window_{name}", attn_call(window=window), Raises((ValueError, TypeError), "window")))
    out.append(Case(fam, "window_not_a_tuple", attn_call(window=3), Raises((ValueError, TypeError), "window")))
    out.append(Case(fam, "impl_unknown", attn_call(impl="nonexistent"), Raises(RuntimeError, "nonexistent")))
    out.append(Case(fam, "backward", attn_backward(qkv), Correct(1e-5, 1e-4)))
    out.append(Case(fam, "backward_transposed_q",
                    attn_backward(_with(qkv, 0, lambda t: t.transpose(1, 2).contiguous().transpose(1, 2))),
                    Correct(1e-5, 1e-4)))
    out.append(Case(fam, "backward_gqa", attn_backward(lambda: qkv(h=4, hk=2)), Correct(1e-5, 1e-4)))
    return out


# ================================================================ group quantizer (pytrain.ops.quantize)
def qg(x_fn, fmt="int8", group_size=32, **kw):
    def run():
        from pytrain.ops.quantize import quantize_groups
        return quantize_groups(x_fn(), fmt, group_size, **kw)
    return run


def dqg(data_fn, scales_fn, group_size=32, dtype=F32):
    def run():
        from pytrain.ops.quantize import dequantize_groups
        return dequantize_groups(data_fn(), scales_fn(), group_size, dtype)
    return run


def qg_vs_reference(x_fn, fmt="int8", group_size=32, impl="cpu"):
    """The backend's codes and scales against the reference's (bit-exact by contract); a group larger than x is
    one group of x.numel()."""
    def run():
        from pytrain.ops.quantize import quantize_groups, quantize_reference
        x = x_fn()
        got = quantize_groups(x, fmt, group_size, impl=impl)
        want = quantize_reference(x.contiguous(), fmt, min(group_size, x.numel()), False, 0)
        return [got[0].view(torch.uint8), got[1]], [want[0].view(torch.uint8), want[1]]
    return run


def quantize_group_cases() -> List[Case]:
    fam = "ops.quantize_groups"
    out = []
    for name, value in (("zero", 0), ("negative", -1), ("bool", True), ("float", 2.5), ("none", None),
                        ("str", "32")):
        out.append(Case(fam, f"group_size_{name}", qg(lambda: rand(64), group_size=value),
                        Raises((ValueError, TypeError), "group_size")))
    out.append(Case(fam, "fmt_unknown", qg(lambda: rand(64), fmt="int4"), Raises(ValueError, "format")))
    out.append(Case(fam, "fmt_none", qg(lambda: rand(64), fmt=None), Raises((ValueError, TypeError), "format")))
    for dname, dt in BAD_DTYPES.items():
        out.append(Case(fam, f"x_{dname}", qg(lambda dt=dt: retype(rand(64), dt)), Raises(TypeError, "dtype")))
    out.append(Case(fam, "x_transposed", qg(lambda: transposed(rand(8, 8))), Raises(ValueError, "contiguous")))
    out.append(Case(fam, "x_meta", lambda: (qg(lambda: rand(64).to("meta"))(),
                                             (torch.empty(64, dtype=torch.int8, device="meta"),
                                              torch.empty(2, device="meta"))),
                    Either(Raises(RuntimeError, "meta"), Correct())))
    out.append(Case(fam, "seed_negative", qg(lambda: rand(64), stochastic=True, seed=-1), Raises(ValueError, "seed")))
    out.append(Case(fam, "seed_2_63", qg(lambda: rand(64), stochastic=True, seed=2**63), Raises(ValueError, "seed")))
    out.append(Case(fam, "stochastic_fp8", qg(lambda: rand(64), fmt="fp8_e4m3", stochastic=True),
                    Raises(ValueError, "stochastic")))
    out.append(Case(fam, "empty", lambda: (qg(lambda: rand(0))(), (torch.empty(0, dtype=torch.int8),
                                                                    torch.empty(0))), Correct()))
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        for vname, value in (("nan", math.nan), ("inf", math.inf), ("huge", 3e38), ("subnormal", 1e-40)):
            def poked(value=value):
                x = rand(70)
                x[5] = value
                return x
            out.append(Case(fam, f"{fmt}_{vname}", qg_vs_reference(poked, fmt), Correct(0, 0)))
        out.append(Case(fam, f"{fmt}_all_zero", qg_vs_reference(lambda: torch.zeros(70), fmt), Correct(0, 0)))
        out.append(Case(fam, f"{fmt}_float64", qg_vs_reference(lambda: rand(70, dtype=F64), fmt, impl=None),
                        Correct(0, 0)))
    out.append(Case(fam, "group_size_2_31_cpu", qg_vs_reference(lambda: rand(1000), group_size=2**31 - 1),
                    Correct(0, 0)))
    out.append(Case(fam, "group_size_2_31_reference",
                    lambda: (qg(lambda: rand(1000), group_size=2**31 - 1, impl="reference")(),
                             qg(lambda: rand(1000), group_size=1000, impl="reference")()), Correct(0, 0)))
    fam = "ops.dequantize_groups"
    codes = lambda: torch.randint(-127, 128, (64,), dtype=torch.int8)  # noqa: E731
    scales = lambda: torch.rand(2)  # noqa: E731
    out.append(Case(fam, "data_float32", dqg(lambda: rand(64), scales), Raises(TypeError, "data")))
    out.append(Case(fam, "scales_wrong_count", dqg(codes, lambda: torch.rand(3)), Raises(ValueError, "scales")))
    out.append(Case(fam, "scales_float64", dqg(codes, lambda: torch.rand(2, dtype=F64)), Raises(ValueError, "scales")))
    out.append(Case(fam, "scales_2d", dqg(codes, lambda: torch.rand(2, 1)), Raises(ValueError, "scales")))
    out.append(Case(fam, "scales_meta", dqg(codes, lambda: torch.rand(2).to("meta")), Raises(ValueError, "scales")))
    out.append(Case(fam, "dtype_int32", dqg(codes, scales, dtype=torch.int32), Raises(TypeError, "dtype")))
    out.append(Case(fam, "group_size_zero", dqg(codes, scales, group_size=0), Raises(ValueError, "group_size")))
    out.append(Case(fam, "data_transposed", dqg(lambda: transposed(codes().reshape(8, 8)), scales),
                    Raises(ValueError, "contiguous")))

    def nan_scale():
        from pytrain.ops.quantize import dequantize_groups, dequantize_reference
        c, s = codes(), scales()
        s[1] = math.nan
        return dequantize_groups(c, s, 32, F32, impl="cpu"), dequantize_reference(c, s, 32, F64)
    out.append(Case(fam, "scales_nan", nan_scale, F64_EXACT))
    return out


# ================================================================ topk
def tk(x_fn, ratio=0.1, **kw):
    def run():
        from pytrain.comm import topk
        return topk(x_fn(), ratio, **kw)
    return run


def tk_exact(x_fn, ratio=0.1):
    """Exact mode against torch.topk of |x| (NaN first): the same set of indices, values = x[indices]."""
    def run():
        from pytrain.comm import topk
        x = x_fn()
        values, indices = topk(x, ratio, exact=True)
        k = max(1, round(ratio * x.numel()))
        want = torch.topk(x.reshape(-1).to(F64).abs(), k).indices.sort().values
        order = indices.sort()
        return [order.values, values[order.indices]], [want, x.reshape(-1)[want]]
    return run


def topk_cases() -> List[Case]:
    fam = "comm.topk"
    out = []
    for name, value in (("zero", 0.0), ("negative", -0.1), ("above_one", 1.5), ("nan", math.nan),
                        ("inf", math.inf)):
        out.append(Case(fam, f"ratio_{name}", tk(lambda: rand(100), value), Raises(ValueError, "ratio")))
    out.append(Case(fam, "ratio_bool", tk(lambda: rand(100), True), Raises(TypeError, "ratio")))
    for name, value in (("str", "0.1"), ("none", None)):
        out.append(Case(fam, f"ratio_{name}", tk(lambda: rand(100), value), Raises((TypeError, ValueError), "ratio")))
    out.append(Case(fam, "x_list", tk(lambda: [1.0, 2.0]), Raises(TypeError, "x")))
    for dname, dt in BAD_DTYPES.items():
        out.append(Case(fam, f"x_{dname}", tk(lambda dt=dt: retype(rand(100), dt)), Raises(TypeError, "dtype")))
    out.append(Case(fam, "x_empty", tk(lambda: rand(0)), Raises(ValueError, "empty")))
    out.append(Case(fam, "x_sparse", tk(lambda: rand(10, 10).to_sparse()), Raises(ValueError, "dense")))
    out.append(Case(fam, "x_meta", lambda: (tk(lambda: rand(100).to("meta"))(),
                                             (torch.empty(10, device="meta"),
                                              torch.empty(10, dtype=torch.int64, device="meta"))),
                    Either(Raises(RuntimeError, "meta"), Correct())))
    for size in (100, 40000):
        for lname, layout in LAYOUTS.items():
            out.append(Case(fam, f"x_{lname}_{size}", tk_exact(lambda s=size, f=layout: f(rand(s // 100, 100))),
                            Either(Raises(ValueError, "contiguous"), Correct(0, 0))))
        out.append(Case(fam, f"exact_{size}", tk_exact(lambda s=size: rand(s)), Correct(0, 0)))
        for vname, value in (("nan", math.nan), ("inf", math.inf), ("neg_inf", -math.inf)):
            def poked(s=size, value=value):
                x = rand(s)
                x[s // 3] = value
                return x
            out.append(Case(fam, f"{vname}_{size}", tk_exact(poked), Correct(0, 0)))
        out.append(Case(fam, f"all_nan_{size}", tk_exact(lambda s=size: torch.full((s,), math.nan), ratio=0.01),
                        Correct(0, 0)))
        out.append(Case(fam, f"ratio_one_{size}", tk_exact(lambda s=size: rand(s), ratio=1.0), Correct(0, 0)))
        out.append(Case(fam, f"ratio_tiny_{size}", tk_exact(lambda s=size: rand(s), ratio=1e-9), Correct(0, 0)))
    out.append(Case(fam, "scalar", tk_exact(lambda: torch.tensor(3.0), ratio=0.5), Correct(0, 0)))
    out.append(Case(fam, "float64_40000", tk_exact(lambda: rand(40000, dtype=F64)), Correct(0, 0)))

    def approx_nan():
        from pytrain.comm import topk
        x = rand(40000)
        x[123] = math.nan
        values, indices = topk(x, 0.01)
        return [bool((indices == 123).any()), int(values.isnan().sum())], [True, 1]
    out.append(Case(fam, "approx_nan_selected", approx_nan, Correct(0, 0)))

    fam = "ops.topk_filter"

    def tf(x_fn, threshold, impl="cpu"):
        def run():
            from pytrain.ops.topk import topk_filter, topk_filter_reference
            x = x_fn()
            return topk_filter(x, threshold, impl=impl), topk_filter_reference(x, threshold)
        return run
    out.append(Case(fam, "threshold_nan", tf(lambda: rand(100), math.nan), Raises((ValueError, RuntimeError),
                                                                                  "threshold")))
    out.append(Case(fam, "threshold_inf", tf(lambda: rand(100), math.inf), Correct(0, 0)))
    out.append(Case(fam, "threshold_negative", tf(lambda: rand(100), -1.0), Correct(0, 0)))
    out.append(Case(fam, "x_int32", tf(lambda: retype(rand(100), torch.int32), 0.5),
                    Raises((TypeError, RuntimeError), "dtype")))
    out.append(Case(fam, "x_transposed", tf(lambda: transposed(rand(10, 10)), 0.5),
                    Either(Raises((ValueError, RuntimeError), "contiguous"), Correct(0, 0))))
    out.append(Case(fam, "x_nan_inf", tf(lambda: torch.tensor([1.0, math.nan, -math.inf, 0.1]), 0.5), Correct(0, 0)))
    return out


# ================================================================ PowerSGD pieces
def psgd(fn_name, *makers, **kw):
    def run():
        import pytrain.comm as comm
        return getattr(comm, fn_name)(*(m() for m in makers), **kw)
    return run


def psgd_vs_reference(fn_name, M_fn, X_fn, impl="cpu"):
    def run():
        import pytrain.comm as comm
        from pytrain.ops import powersgd as ref
        M, X = M_fn(), X_fn()
        got = getattr(comm, fn_name)(M, X, impl=impl)
        want = getattr(ref, f"{fn_name}_reference")(M.to(F64), X.to(F64))
        return got, want
    return run


def ortho_vs_reference(P_fn, eps=1e-8, impl="cpu"):
    def run():
        from pytrain.comm import orthogonalize_
        from pytrain.ops.powersgd import orthogonalize_reference
        P = P_fn()
        want = P.to(F64).clone()
        orthogonalize_reference(want, eps)
        return orthogonalize_(P, eps, impl=impl), want
    return run


def powersgd_cases() -> List[Case]:
    out = []
    M = lambda: rand(8, 6)  # noqa: E731
    Q = lambda: rand(6, 2, seed=1)  # noqa: E731
    P = lambda: rand(8, 2, seed=2)  # noqa: E731
    for fn, other, rows in (("powersgd_p", Q, 6), ("powersgd_q", P, 8)):
        out += _product_cases(fn, M, other, rows)
    return out + _orthogonalize_cases(P)


def _product_cases(fn, M, other, rows) -> List[Case]:
    out = []
    fam = f"comm.{fn}"
    oname = "Q" if fn == "powersgd_p" else "P"
    for dname, dt in BAD_DTYPES.items():
        out.append(Case(fam, f"M_{dname}", psgd(fn, lambda dt=dt: retype(M(), dt), other), Raises(TypeError, "M")))
        out.append(Case(fam, f"{oname}_{dname}", psgd(fn, M, lambda dt=dt: retype(other(), dt)),
                        Raises(TypeError, oname)))
    out.append(Case(fam, "mixed_dtype", psgd(fn, M, lambda: other().double()), Raises(TypeError, oname)))
    out.append(Case(fam, "M_1d", psgd(fn, lambda: rand(8), other), Raises(ValueError, "M")))
    out.append(Case(fam, "M_4d", psgd(fn, lambda: rand(1, 1, 8, 6), other), Raises(ValueError, "M")))
    out.append(Case(fam, "M_empty", psgd(fn, lambda: rand(0, 6), other), Raises(ValueError, "M")))
    out.append(Case(fam, f"{oname}_wrong_rows", psgd(fn, M, lambda: rand(rows + 1, 2)), Raises(ValueError, oname)))
    out.append(Case(fam, "rank_too_large", psgd(fn, M, lambda: rand(rows, 7)), Raises(ValueError, "rank")))
    out.append(Case(fam, "batch_mismatch", psgd(fn, lambda: rand(2, 8, 6), lambda: rand(3, rows, 2)),
                    Raises(ValueError, oname)))
    out.append(Case(fam, "M_none", psgd(fn, lambda: None, other), Raises(TypeError, "M")))
    out.append(Case(fam, "M_meta", psgd(fn, lambda: M().to("meta"), other), Raises(TypeError, oname)))
    out.append(Case(fam, "M_transposed", psgd_vs_reference(fn, lambda: transposed(M()), other),
                    Either(Raises(ValueError, "contiguous"), F64_EXACT)))
    out.append(Case(fam, "M_expanded", psgd_vs_reference(fn, lambda: expanded(M()), other),
                    Either(Raises(ValueError, "contiguous"), F64_EXACT)))
    out.append(Case(fam, "float64", psgd_vs_reference(fn, lambda: M().double(), lambda: other().double(),
                                                      impl=None), Correct(1e-12, 1e-10)))
    out.append(Case(fam, "batched", psgd_vs_reference(fn, lambda: rand(3, 8, 6), lambda: rand(3, rows, 2)),
                    F64_EXACT))
    for vname, value in (("nan", math.nan), ("inf", math.inf)):
        def poked(value=value):
            m = M()
            m[1, 2] = value
            return m
        out.append(Case(fam, f"M_{vname}", psgd_vs_reference(fn, poked, other), F64_EXACT))
    return out


def _orthogonalize_cases(P) -> List[Case]:
    out = []
    fam = "comm.orthogonalize_"
    out.append(Case(fam, "more_columns_than_rows", psgd("orthogonalize_", lambda: rand(2, 3)),
                    Raises(ValueError, "columns")))
    for name, value in (("negative", -1.0), ("nan", math.nan), ("inf", math.inf)):
        out.append(Case(fam, f"eps_{name}", psgd("orthogonalize_", P, eps=value), Raises(ValueError, "eps")))
    out.append(Case(fam, "eps_str", psgd("orthogonalize_", P, eps="x"), Raises(TypeError, "eps")))
    out.append(Case(fam, "P_int32", psgd("orthogonalize_", lambda: retype(P(), torch.int32)), Raises(TypeError, "P")))
    out.append(Case(fam, "P_transposed", ortho_vs_reference(lambda: transposed(P())),
                    Either(Raises(ValueError, "contiguous"), F64_EXACT)))
    out.append(Case(fam, "zero_column", ortho_vs_reference(lambda: torch.cat([P()[:, :1], torch.zeros(8, 1)], 1)),
                    F64_EXACT))
    out.append(Case(fam, "nan", ortho_vs_reference(lambda: P().index_put_((torch.tensor([1]), torch.tensor([0])),
                                                                       torch.tensor(math.nan))), F64_EXACT))
    out.append(Case(fam, "float64", ortho_vs_reference(lambda: P().double(), impl=None), Correct(1e-12, 1e-10)))

    def orthonormal_when_dependent():
        """Duplicate columns: the result must still have orthonormal (or zero) columns and span P's range."""
        from pytrain.comm import orthogonalize_
        p = P()[:, :1].repeat(1, 2).contiguous()
        orthogonalize_(p)
        return [torch.linalg.matrix_norm(p[:, :1].t() @ p[:, 1:]).item() < 1e-5, p.isfinite().all().item()], \
            [True, True]
    out.append(Case(fam, "dependent_columns", orthonormal_when_dependent, Correct(0, 0)))

    def rank_deficient(n=8, m=6, r=2, true_rank=1, batch=None):
        """M of rank below r: P Q^T after one compression step must reproduce M (as torch's hook does)."""
        def run():
            from pytrain.comm import powersgd_compress
            shape = (batch,) if batch else ()
            u, w = rand(*shape, n, true_rank, seed=4), rand(*shape, m, true_rank, seed=5)
            Mx = (u @ w.transpose(-1, -2)).contiguous()
            p, q = powersgd_compress(Mx, rand(*shape, m, r, seed=6))
            return p @ q.transpose(-1, -2), Mx
        return run
    fam = "comm.powersgd_compress"
    out.append(Case(fam, "rank_deficient_1_of_2", rank_deficient(), Correct(1e-5, 1e-4)))
    out.append(Case(fam, "rank_deficient_2_of_4", rank_deficient(n=16, m=12, r=4, true_rank=2), Correct(1e-5, 1e-4)))
    out.append(Case(fam, "rank_deficient_batched", rank_deficient(batch=3), Correct(1e-5, 1e-4)))
    out.append(Case(fam, "zero_matrix", lambda: (__import__("pytrain").comm.powersgd_compress(
        torch.zeros(8, 6), rand(6, 2))[0].isfinite().all().item(), True), Correct(0, 0)))
    return out


# ================================================================ linear_cross_entropy
def lce_inputs(n=6, h=4, v=11, dtype=F32):
    return rand(n, h, dtype=dtype), rand(v, h, dtype=dtype, seed=1), torch.arange(n) % v, rand(v, dtype=dtype, seed=2)


def lce(fn=lce_inputs, **kw):
    def run():
        from pytrain.ops import linear_cross_entropy
        return linear_cross_entropy(*fn(), **kw)
    return run


def lce_exact(fn=lce_inputs, **kw):
    """The op on fn()'s inputs against F.linear + F.cross_entropy in float64 (what the op must equal)."""
    def run():
        import torch.nn.functional as F
        from pytrain.ops import linear_cross_entropy
        h, w, t, b = fn()
        want = F.cross_entropy(F.linear(h.to(F64), w.to(F64), b.to(F64)), t, reduction=kw.get("reduction", "mean"))
        return linear_cross_entropy(h, w, t, b, **kw), want
    return run


def lce_with(**changes):
    """lce_inputs() with some of (hidden, weight, target, bias) replaced by fn(original)."""
    def fn():
        args = dict(zip(("hidden", "weight", "target", "bias"), lce_inputs()))
        for k, f in changes.items():
            args[k] = f(args[k])
        return tuple(args.values())
    return fn


def target_cases(fam: str, call: Callable, replace: Callable, vocab: int) -> List[Case]:
    """Bad class targets of a fused linear loss: call(replace(target=fn)) runs the op with its target fn(target)."""
    return [
        Case(fam, "target_2d", call(replace(target=lambda t: t[None])), Raises(ValueError, "target")),
        Case(fam, "target_float", call(replace(target=lambda t: t.float())), Raises(ValueError, "int64")),
        Case(fam, "target_is_vocab", call(replace(target=lambda t: t.clone().fill_(vocab))),
             Raises(ValueError, "outside")),
        Case(fam, "target_minus_one", call(replace(target=lambda t: t - 1)), Raises(ValueError, "outside")),
    ]


def linear_cross_entropy_cases() -> List[Case]:
    fam = "ops.linear_cross_entropy"
    out = [
        Case(fam, "hidden_list", lce(lce_with(hidden=lambda h: h.tolist())), Raises(TypeError, "hidden")),
        Case(fam, "hidden_1d", lce(lce_with(hidden=lambda h: h[0])), Raises(ValueError, "hidden")),
        Case(fam, "hidden_size_mismatch", lce(lce_with(weight=lambda w: w[:, :3])), Raises(ValueError, "differ in H")),
        Case(fam, "weight_no_rows", lce(lce_with(weight=lambda w: w[:0], bias=lambda b: b[:0])),
             Raises(ValueError, "V = 0")),
        Case(fam, "weight_dtype_mismatch", lce(lce_with(weight=lambda w: w.double())), Raises(ValueError, "dtype")),
        Case(fam, "bias_shape", lce(lce_with(bias=lambda b: b[:5])), Raises(ValueError, "bias")),
        Case(fam, "reduction_unknown", lce(reduction="avg"), Raises(ValueError, "reduction")),
        Case(fam, "num_items_with_sum", lce(reduction="sum", num_items_in_batch=3), Raises(ValueError, "num_items")),
        Case(fam, "chunk_zero", lce(chunk_size=0), Raises(ValueError, "chunk_size")),
        Case(fam, "ignore_index_float", lce(ignore_index=1.5), Raises(TypeError, "ignore_index")),
        Case(fam, "softcap_zero", lce(softcap=0.0), Raises(ValueError, "softcap")),
        Case(fam, "z_loss_negative", lce(z_loss=-1.0), Raises(ValueError, "z_loss")),
        Case(fam, "label_smoothing_bool", lce(label_smoothing=True), Raises(TypeError, "label_smoothing")),
        Case(fam, "hidden_meta", lce(lce_with(**{k: (lambda x: x.to("meta")) for k in ("hidden", "weight", "bias")},
                                               target=lambda t: t.to("meta"))),
             Raises((RuntimeError, ValueError, NotImplementedError), "meta|Meta")),
    ] + target_cases(fam, lce, lce_with, 11)
    for dname, dt in BAD_DTYPES.items():
        out.append(Case(fam, f"hidden_{dname}", lce(lce_with(**{k: (lambda x, dt=dt: retype(x, dt))
                                                                 for k in ("hidden", "weight", "bias")})),
                        Raises(ValueError, "dtype")))
    for name, value in (("nan", math.nan), ("inf", math.inf), ("above_one", 1.5)):
        out.append(Case(fam, f"label_smoothing_{name}", lce(label_smoothing=value), Raises(ValueError, "label_smooth")))
    for name, poke in (("nan", math.nan), ("inf", math.inf)):
        def poked(h, value=poke):
            h = h.clone()
            h[2, 1] = value
            return h
        for reduction in ("mean", "none"):
            out.append(Case(fam, f"hidden_{name}_{reduction}", lce_exact(lce_with(hidden=poked), reduction=reduction),
                            Correct()))
    out += [
        Case(fam, "exact_transposed_weight", lce_exact(lce_with(weight=transposed)), Correct()),
        Case(fam, "exact_strided_hidden", lce_exact(lce_with(hidden=strided)), Correct()),
        Case(fam, "exact_no_tokens", lce_exact(lce_with(hidden=lambda h: h[:0], target=lambda t: t[:0])), Correct()),
        Case(fam, "exact_huge_logits", lce_exact(lce_with(hidden=lambda h: h * 1e4)), Correct(atol=1e-2, rtol=1e-5)),
        Case(fam, "exact_float64", lce_exact(lambda: lce_inputs(dtype=F64)), Correct(1e-12, 1e-10)),
    ]
    return out


# ================================================================ linear_distillation_loss
LDL_ARGS = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "target")


def ldl_inputs(n=6, hs=4, ht=5, v=11, dtype=F32):
    return (rand(n, hs, dtype=dtype), rand(v, hs, dtype=dtype, seed=1), rand(n, ht, dtype=dtype, seed=2),
            rand(v, ht, dtype=dtype, seed=3), torch.arange(n) % v)


def ldl_with(**changes):
    """ldl_inputs() with some of LDL_ARGS replaced by fn(original)."""
    def fn():
        args = dict(zip(LDL_ARGS, ldl_inputs()))
        for k, f in changes.items():
            args[k] = f(args[k])
        return tuple(args.values())
    return fn


def ldl(fn=ldl_inputs, **kw):
    def run():
        from pytrain.ops import linear_distillation_loss
        return linear_distillation_loss(*fn(), **kw)
    return run


def ldl_exact(fn=ldl_inputs, reduction="mean", **kw):
    """The op (kind "kl", every target counted) on fn()'s inputs against KL(teacher || student) written out in
    float64: sum_j p_j (log p_j - log q_j) per token."""
    def run():
        from pytrain.ops import linear_distillation_loss
        sh, sw, th, tw, t = fn()
        lq = torch.log_softmax(sh.to(F64) @ sw.to(F64).t(), -1)
        lp = torch.log_softmax(th.to(F64) @ tw.to(F64).t(), -1)
        per = (lp.exp() * (lp - lq)).sum(-1)
        want = per if reduction == "none" else per.sum() / len(per)
        return linear_distillation_loss(sh, sw, th, tw, t, reduction=reduction, **kw), want
    return run


def poke(value, row=2, col=1):
    def fn(x):
        x = x.clone()
        x[row, col] = value
        return x
    return fn


def linear_distillation_loss_cases() -> List[Case]:
    fam = "ops.linear_distillation_loss"
    meta = lambda x: x.to("meta")  # noqa: E731
    out = [
        Case(fam, "student_hidden_list", ldl(ldl_with(student_hidden=lambda h: h.tolist())),
             Raises(TypeError, "student_hidden")),
        Case(fam, "target_list", ldl(ldl_with(target=lambda t: t.tolist())), Raises(TypeError, "target")),
        Case(fam, "student_hidden_1d", ldl(ldl_with(student_hidden=lambda h: h[0])), Raises(ValueError, "student")),
        Case(fam, "student_hidden_size_mismatch", ldl(ldl_with(student_weight=lambda w: w[:, :3])),
             Raises(ValueError, "differ in H")),
        Case(fam, "teacher_hidden_size_mismatch", ldl(ldl_with(teacher_weight=lambda w: w[:, :3])),
             Raises(ValueError, "teacher_hidden .* differ in H")),
        Case(fam, "vocab_mismatch", ldl(ldl_with(teacher_weight=lambda w: w[:7])),
             Raises(ValueError, "share a vocabulary")),
        Case(fam, "tokens_mismatch", ldl(ldl_with(teacher_hidden=lambda h: h[:4])), Raises(ValueError, "must match")),
        Case(fam, "no_vocab", ldl(ldl_with(student_weight=lambda w: w[:0], teacher_weight=lambda w: w[:0])),
             Raises(ValueError, "V = 0")),
        Case(fam, "teacher_dtype_mismatch", ldl(ldl_with(teacher_hidden=lambda h: h.double(),
                                                         teacher_weight=lambda w: w.double())),
             Raises(ValueError, "share a dtype")),
        Case(fam, "teacher_on_meta", ldl(ldl_with(teacher_hidden=meta, teacher_weight=meta)),
             Raises(ValueError, "one device")),
        Case(fam, "all_on_meta", ldl(ldl_with(**{k: meta for k in LDL_ARGS})),
             Raises((RuntimeError, ValueError, NotImplementedError), "meta|Meta")),
        Case(fam, "kind_unknown", ldl(kind="forward"), Raises(ValueError, "kind")),
        Case(fam, "temperature_zero", ldl(temperature=0.0), Raises(ValueError, "temperature")),
        Case(fam, "temperature_negative", ldl(temperature=-1.0), Raises(ValueError, "temperature")),
        Case(fam, "temperature_nan", ldl(temperature=math.nan), Raises(ValueError, "temperature")),
        Case(fam, "temperature_str", ldl(temperature="2"), Raises(TypeError, "temperature")),
        Case(fam, "jsd_beta_zero", ldl(kind="jsd", beta=0.0), Raises(ValueError, "beta")),
        Case(fam, "jsd_beta_one", ldl(kind="jsd", beta=1.0), Raises(ValueError, "beta")),
        Case(fam, "jsd_beta_inf", ldl(kind="jsd", beta=math.inf), Raises(ValueError, "beta")),
        Case(fam, "hard_label_weight_above_one", ldl(hard_label_weight=1.5), Raises(ValueError, "hard_label_weight")),
        Case(fam, "hard_label_weight_without_target", ldl(ldl_with(target=lambda t: None), hard_label_weight=0.5),
             Raises(ValueError, "needs a target")),
        Case(fam, "reduction_unknown", ldl(reduction="avg"), Raises(ValueError, "reduction")),
        Case(fam, "chunk_zero", ldl(chunk_size=0), Raises(ValueError, "chunk_size")),
        Case(fam, "ignore_index_float", ldl(ignore_index=1.5), Raises(TypeError, "ignore_index")),
    ] + target_cases(fam, ldl, ldl_with, 11)
    for dname, dt in BAD_DTYPES.items():
        out.append(Case(fam, f"student_hidden_{dname}",
                        ldl(ldl_with(**{k: (lambda x, dt=dt: retype(x, dt)) for k in LDL_ARGS[:4]})),
                        Raises(ValueError, "dtype")))
    for name, value in (("nan", math.nan), ("inf", math.inf)):
        for side in ("student_hidden", "teacher_hidden"):
            for reduction in ("mean", "none"):
                out.append(Case(fam, f"{side}_{name}_{reduction}",
                                ldl_exact(ldl_with(**{side: poke(value)}), reduction=reduction), Correct()))
    out += [
        Case(fam, "exact_transposed_weights", ldl_exact(ldl_with(student_weight=transposed, teacher_weight=transposed)),
             F64_EXACT),
        Case(fam, "exact_strided_hidden", ldl_exact(ldl_with(student_hidden=strided, teacher_hidden=strided)),
             F64_EXACT),
        Case(fam, "exact_no_tokens", ldl_exact(ldl_with(student_hidden=lambda h: h[:0], teacher_hidden=lambda h: h[:0],
                                                        target=lambda t: t[:0])), Correct()),
        Case(fam, "exact_huge_logits", ldl_exact(ldl_with(student_hidden=lambda h: h * 1e4,
                                                          teacher_hidden=lambda h: h * 1e4)),
             Correct(atol=1e-2, rtol=1e-4)),
        Case(fam, "exact_float64", ldl_exact(lambda: ldl_inputs(dtype=F64)), Correct(1e-12, 1e-10)),
    ]
    return out


# ================================================================ codec ops of the quantized all-reduce hook
def _codec_args(op, n=70, group=32, fmt="int8"):
    """Fresh good arguments of pytrain.ops.quantize.<op> (a dict of keywords)."""
    from pytrain.ops.quantize import FORMATS, num_groups, quantize_groups
    g, code = num_groups(n, group), FORMATS[fmt].dtype
    if op == "quantize_into":
        return dict(x=rand(n), residual=rand(n, seed=1) * 1e-2, data=torch.empty(n, dtype=code),
                    scales=torch.empty(g), fmt=fmt, group_size=group)
    rows = [quantize_groups(rand(n, seed=s), fmt, group) for s in (2, 3)]
    data, scales = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
    if op == "requantize_mean":
        return dict(data=data, scales=scales, out_data=torch.empty(n, dtype=code), out_scales=torch.empty(g),
                    residual=rand(n // 2, seed=4) * 1e-2, group_size=group)
    return dict(data=data[0], scales=scales[0], group_size=group, out=torch.empty(n))


def codec_call(op, **change):
    def run():
        import pytrain.ops.quantize as q
        return getattr(q, op)(**{**_codec_args(op), **change})
    return run


CODEC_WRITES = {"quantize_into": ("residual", "data", "scales"),
                "requantize_mean": ("out_data", "out_scales", "residual"), "dequantize_into": ("out",)}


def codec_vs_reference(op, poke, fmt="int8"):
    """The CPU kernel's written tensors against the reference's (bit-exact by contract), after ``poke(args)``."""
    def run():
        import pytrain.ops.quantize as q
        args = _codec_args(op, fmt=fmt)
        poke(args)
        outs = []
        for impl in ("cpu", "reference"):
            mine = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
            getattr(q, op)(**mine, impl=impl)
            outs.append([mine[k].view(torch.uint8) if mine[k].element_size() == 1 else mine[k]
                         for k in CODEC_WRITES[op]])
        return outs[0], outs[1]
    return run


def codec_cases() -> List[Case]:
    out = []
    fam = "ops.quantize_into"
    out.append(Case(fam, "residual_short", codec_call("quantize_into", residual=rand(69)),
                    Raises(ValueError, "residual")))
    out.append(Case(fam, "residual_bf16", codec_call("quantize_into", residual=rand(70, dtype=torch.bfloat16)),
                    Raises(TypeError, "residual")))
    out.append(Case(fam, "data_strided", codec_call("quantize_into", data=torch.empty(140, dtype=torch.int8)[::2]),
                    Raises(ValueError, "contiguous")))
    out.append(Case(fam, "scales_wrong_count", codec_call("quantize_into", scales=torch.empty(2)),
                    Raises(ValueError, "scales")))
    for dname, dt in BAD_DTYPES.items():
        out.append(Case(fam, f"x_{dname}", codec_call("quantize_into", x=retype(rand(70), dt)),
                        Raises(TypeError, "dtype")))
    fam = "ops.requantize_mean"
    out.append(Case(fam, "rows_transposed",
                    codec_call("requantize_mean", data=torch.zeros(70, 2, dtype=torch.int8).t()),
                    Raises(ValueError, "rows")))
    out.append(Case(fam, "residual_long", codec_call("requantize_mean", residual=rand(71)),
                    Raises(ValueError, "residual")))
    out.append(Case(fam, "scales_rows", codec_call("requantize_mean", scales=torch.rand(3, 3)),
                    Raises(ValueError, "scales")))
    fam = "ops.dequantize_into"
    out.append(Case(fam, "out_short", codec_call("dequantize_into", out=torch.empty(69)), Raises(ValueError, "out")))
    out.append(Case(fam, "out_int32", codec_call("dequantize_into", out=torch.empty(70, dtype=torch.int32)),
                    Raises(TypeError, "dtype")))
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        for vname, value in (("nan", math.nan), ("inf", math.inf), ("huge", 3e38), ("subnormal", 1e-40)):
            def poke_x(args, value=value):
                args["x"][5] = value
                args["residual"][6] = value

            def poke_scale(args, value=value):
                args["scales"][1, 1] = value
            out.append(Case("ops.quantize_into", f"{fmt}_{vname}",
                            codec_vs_reference("quantize_into", poke_x, fmt), Correct(0, 0)))
            out.append(Case("ops.requantize_mean", f"{fmt}_scale_{vname}",
                            codec_vs_reference("requantize_mean", poke_scale, fmt), Correct(0, 0)))
    return out


def warmup() -> None:
    """One good call of each op family (first-call set-up outside the cases' time limits)."""
    import pytrain.comm as comm
    import pytrain.ops as ops
    from pytrain.ops.quantize import quantize_groups
    call_step("adamw_step", make_lists("adamw_step"))
    ops.global_norm([rand(3)])
    ops.flash_attention(*qkv()).sum()
    quantize_groups(rand(64), "int8", 32)
    codec_call("requantize_mean")()
    comm.topk(rand(40000), 0.01)
    comm.powersgd_compress(rand(8, 6), rand(6, 2))
    ops.linear_cross_entropy(*lce_inputs())
    ops.linear_distillation_loss(*ldl_inputs())


def cases() -> List[Case]:
    return step_cases() + global_norm_cases() + attention_cases() + quantize_group_cases() + codec_cases() + \
        topk_cases() + powersgd_cases() + linear_cross_entropy_cases() + linear_distillation_loss_cases()
