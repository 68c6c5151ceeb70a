"""torch.compile: every op with fullgraph=True against eager, break counts of swapped Hugging Face training
steps and of the fused optimizers (``torch._dynamo.explain``), and autocast parity with SDPA.

Break counts are asserted, not only "runs": a graph break is where dynamo hands control back to Python
(backend selection traced through ``importlib`` used to give a 2-layer LLaMA 15 graphs).  Shapes are
tiny: these tests measure what dynamo captures, not speed.
"""
import copy

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F

import pytrain
from pytrain import ops
from pytrain.comm import orthogonalize_, powersgd_p, powersgd_q
from pytrain.ops.attention import seed_tensor
from pytrain.ops.quantize import dequantize_groups, quantize_groups
from pytrain.ops.topk import topk_filter
from pytrain.optim import FusedAdamW, FusedLARS
from pytrain.testing.swap_models import llama_batch, tiny_gpt2, tiny_llama, tiny_mistral

transformers = pytest.importorskip("transformers", reason="the swapped-model tests need transformers")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


def _explain(fn, *args):
    return dynamo.explain(fn)(*args)


def _qkv(dtype=torch.float32, requires_grad=False, heads=(4, 2)):
    gen = torch.Generator().manual_seed(0)
    shapes = [(2, heads[0], 12, 16), (2, heads[1], 10, 16), (2, heads[1], 10, 16)]
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(requires_grad) for s in shapes]


# ------------------------------------------------------------------------------------------ each op
def test_flash_attention_fullgraph_forward_and_backward_match_eager():
    def fn(q, k, v):
        return ops.flash_attention(q, k, v, causal=True, window=(5, 0))

    eager_in, compiled_in = _qkv(requires_grad=True), _qkv(requires_grad=True)
    explained = _explain(fn, *eager_in)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    g = torch.randn(2, 4, 12, 16, generator=torch.Generator().manual_seed(1))
    fn(*eager_in).backward(g)
    torch.compile(fn, fullgraph=True)(*compiled_in).backward(g)
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_flash_attention_dropout_draws_its_seed_in_the_graph():
    """Without a seed, dropout draws one from torch's generator as a tensor: no break, the eager draw (so the
    eager mask) under the same generator state, and a new mask each call (the seed is not baked in)."""
    def fn(q, k, v):
        return ops.flash_attention(q, k, v, causal=True, dropout_p=0.3)

    eager_in, compiled_in = _qkv(requires_grad=True), _qkv(requires_grad=True)
    explained = _explain(fn, *eager_in)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # inductor draws with its own generator
    torch.manual_seed(5)
    want = fn(*eager_in)
    torch.manual_seed(5)
    got = compiled(*compiled_in)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    got.sum().backward()
    want.sum().backward()
    for a, b in zip(compiled_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad, atol=0, rtol=0)
    assert not torch.equal(compiled(*compiled_in), got)


def _params(n=2):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in [(3, 5), (7,)][:n]]


STEPS = {
    "adamw_step": lambda p, g: ops.adamw_step(p, g, [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p],
                                              [], [], [], [], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                              weight_decay=0.01, step=1),
    "lars_step": lambda p, g: ops.lars_step(p, g, [torch.zeros_like(t) for t in p], lr=0.1, momentum=0.9,
                                            dampening=0.0, weight_decay=1e-4, trust_coefficient=1e-3, eps=1e-8,
                                            nesterov=False, trust_clip=False, adapt=True, init_buffers=True),
    "lamb_step": lambda p, g: ops.lamb_step(p, g, [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p],
                                            lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.1, eps=1e-6, weight_decay=0.01,
                                            bias_correction1=0.1, bias_correction2=0.001),
}


@pytest.mark.parametrize("op", list(STEPS))
def test_optimizer_ops_fullgraph_match_eager(op):
    def fn(params, grads):
        STEPS[op](params, grads)
        return params

    eager, compiled, grads = _params(), _params(), [t * 0.5 for t in _params()]
    explained = _explain(fn, [t.clone() for t in eager], grads)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    fn(eager, grads)
    torch.compile(fn, fullgraph=True)(compiled, grads)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _fullgraph_matches(fn, *args):
    explained = _explain(fn, *args)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager = fn(*args)
    compiled = torch.compile(fn, fullgraph=True)(*args)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_global_norm_fullgraph_matches_eager():
    _fullgraph_matches(lambda ts: (ops.global_norm(ts),), _params())


def test_quantize_dequantize_fullgraph_match_eager():
    def fn(x):
        data, scales = quantize_groups(x, "int8", 8)
        return data, scales, dequantize_groups(data, scales, 8, torch.float32)

    _fullgraph_matches(fn, torch.randn(5, 7, generator=torch.Generator().manual_seed(0)))


def test_powersgd_fullgraph_matches_eager():
    def fn(m, q):
        p = orthogonalize_(powersgd_p(m, q))
        return p, powersgd_q(m, p)

    gen = torch.Generator().manual_seed(0)
    _fullgraph_matches(fn, torch.randn(2, 9, 6, generator=gen), torch.randn(2, 6, 3, generator=gen))


def test_linear_distillation_loss_fullgraph_forward_and_backward_match_eager():
    """The public function (registry choice, autograd.Function, host-side option checks) in one graph; the student's
    gradients too."""
    gen = torch.Generator().manual_seed(0)
    student = [torch.randn(40, 16, generator=gen, requires_grad=True), torch.randn(101, 16, generator=gen,
                                                                                  requires_grad=True)]
    teacher = [torch.randn(40, 24, generator=gen), torch.randn(101, 24, generator=gen)]
    target = torch.randint(0, 101, (40,), generator=gen)

    def fn(hs, ws):
        return ops.linear_distillation_loss(hs, ws, *teacher, target, kind="jsd", temperature=2.0,
                                            hard_label_weight=0.3)

    eager, compiled = fn(*student), torch.compile(fn, fullgraph=True)(*student)
    for a, b in zip((compiled,) + torch.autograd.grad(compiled, student),
                    (eager,) + torch.autograd.grad(eager, student)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_topk_filter_fullgraph_matches_eager():
    # its output length depends on the data: dynamo captures it only with dynamic output shapes on
    with dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        _fullgraph_matches(lambda x: topk_filter(x, 1.0), torch.randn(40, generator=torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------------ swapped models
def _loss(model):
    def fn(tokens, labels):
        logits = model(tokens).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return fn


def _fused_loss(model):  # labels given to the model: the swap's fused linear cross-entropy computes the loss
    return lambda tokens, labels: model(tokens, labels=labels).loss


MODELS = {  # one layer: the break count of a layer does not change with depth
    "llama": lambda: tiny_llama(layers=1),
    "gpt2": lambda: tiny_gpt2(layers=1),
    # sequence (16) within and beyond the window: pytrain's mask builder passes no mask either way
    "mistral": lambda: tiny_mistral(layers=1, sliding_window=32),
    "mistral_windowed": lambda: tiny_mistral(layers=1, sliding_window=6),
}


@pytest.mark.parametrize("name,loss_of", [(name, _loss) for name in MODELS] + [("llama", _fused_loss)],
                         ids=[*MODELS, "llama-fused-loss"])
def test_swapped_hf_training_step_compiles_with_zero_breaks(name, loss_of):
    eager = MODELS[name]()
    report = pytrain.swap(eager)
    assert report.swapped
    compiled_model = copy.deepcopy(eager)
    tokens, labels = llama_batch(128, 2, 16)
    explained = _explain(loss_of(eager), tokens, labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    loss_of(eager)(tokens, labels).backward()
    # aot_eager: dynamo, fakes and AOT autograd (the backward) as inductor sees them, without inductor's
    # code generation, which costs tens of seconds per model on a 2-core machine
    loss = torch.compile(loss_of(compiled_model), fullgraph=True, backend="aot_eager")(tokens, labels)
    loss.backward()
    assert sum(n for (_, outcome), n in report.calls.items() if outcome == "pytrain") > 0, str(report)
    torch.testing.assert_close(loss, loss_of(eager)(tokens, labels), atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------------------ optimizers
def _explain_step(opt, op: str) -> None:
    """1 graph, 0 breaks for ``opt.step`` in its current state, with ``pytrain::op`` in the graph.  explain runs
    the step, so on a deep copy, given the grads too (deepcopy leaves them out: the step would be empty)."""
    twin = copy.deepcopy(opt)
    for group, twin_group in zip(opt.param_groups, twin.param_groups):
        for p, q in zip(group["params"], twin_group["params"]):
            q.grad = None if p.grad is None else p.grad.clone()
    explained = _explain(twin.step)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert f"pytrain.{op}" in explained.graphs[0].code, explained.graphs[0].code


OPTIMIZERS = {  # name: (optimizer of params, its op, backend); "aot_eager" where inductor adds only compile time
    "lars": (lambda ps: FusedLARS(ps, lr=0.1, weight_decay=1e-4), "lars_step", "inductor"),
    "adamw": (lambda ps: FusedAdamW(ps, lr=1e-2), "adamw_step", "inductor"),
    "adamw_amsgrad_bf16_states": (lambda ps: FusedAdamW(ps, lr=1e-2, amsgrad=True, state_dtype=torch.bfloat16),
                                  "adamw_step", "aot_eager"),
    "adamw_int8_states": (lambda ps: FusedAdamW(ps, lr=1e-2, state_dtype="int8"), "adamw_step", "aot_eager"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_optimizer_step_compiles_with_zero_breaks_and_matches_eager(name):
    """Four steps, param 1 without a gradient in the second (so the params' step counts differ after it);
    explained in the fourth.  The compiled step gives the eager step's bits."""
    make, op, backend = OPTIMIZERS[name]
    eager_params = [torch.nn.Parameter(t) for t in _params()]
    compiled_params = [torch.nn.Parameter(t.detach().clone()) for t in eager_params]
    eager, compiled = make(eager_params), make(compiled_params)
    step = torch.compile(compiled.step, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(2)
    for i in range(4):
        for a, b in zip(eager_params, compiled_params):
            a.grad = None if (i, a is eager_params[1]) == (1, True) else torch.randn(a.shape, generator=gen)
            b.grad = None if a.grad is None else a.grad.clone()
        if i == 3:
            _explain_step(compiled, op)
        eager.step()
        step()
    for a, b in zip(compiled_params, eager_params):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(compiled_params, eager_params):
        for key, value in eager.state[b].items():
            torch.testing.assert_close(compiled.state[a][key], value, atol=0, rtol=0, msg=key)


def test_fused_adamw_later_steps_reuse_the_graph():
    """The step count is a tensor the kernel reads: after the first step (state creation) and the second (state
    present) the graph is reused; a Python int step would be a constant that recompiles every step."""
    params = [torch.nn.Parameter(t) for t in _params()]
    step = torch.compile(FusedAdamW(params, lr=1e-2).step, fullgraph=True, backend="eager")
    gen = torch.Generator().manual_seed(3)
    for i in range(5):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with dynamo.config.patch(error_on_recompile=i >= 2):
            step()


# ------------------------------------------------------------------------------------------ autocast
AUTOCAST_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA"))]


@pytest.mark.parametrize("device", AUTOCAST_DEVICES)
@pytest.mark.parametrize("inputs", ["float32", "mixed", "float64"])
def test_autocast_casts_like_sdpa(device, inputs):
    """Output dtype and input casts as F.scaled_dot_product_attention's under autocast: fp32 and mixed
    fp32/bf16/fp16 inputs run in the autocast dtype; float64 is left alone (then both keep float64)."""
    q, k, v = (t.to(device) for t in _qkv(heads=(2, 2)))
    if inputs == "mixed":
        k, v = k.bfloat16(), v.half()
    if inputs == "float64":
        q, k, v = q.double(), k.double(), v.double()
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        ours = ops.flash_attention(q, k, v)
        raw, _ = torch.ops.pytrain.attention_fwd_reference(q, k, v, 0.25, False, -1, -1, 0.0, seed_tensor(0))
        module = pytrain.nn.FlashAttention()(q, k, v)
        theirs = F.scaled_dot_product_attention(q, k, v)
    assert ours.dtype == raw.dtype == module.dtype == theirs.dtype
    torch.testing.assert_close(ours.double(), theirs.double(), atol=2e-2 if theirs.dtype != torch.float64 else 1e-10,
                               rtol=0)


def test_autocast_backward_gives_grads_in_the_inputs_dtype():
    q, k, v = _qkv(heads=(2, 2), requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.flash_attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all() for t in (q, k, v))
