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
from pytrain.ops.quantize import dequantize_groups, quantize_groups
from pytrain.ops.topk import topk_filter
from pytrain.optim import FusedLARS
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


MODELS = {  # one layer: the break count of a layer does not change with depth
    "llama": lambda: tiny_llama(layers=1),
    "gpt2": lambda: tiny_gpt2(layers=1),
    # sequence shorter than the window: transformers then passes no mask (a mask tensor is checked with
    # torch.equal in pytrain.integrations.transformers, a data-dependent break under torch.compile)
    "mistral": lambda: tiny_mistral(layers=1, sliding_window=32),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_swapped_hf_training_step_compiles_with_zero_breaks(name):
    eager = MODELS[name]()
    report = pytrain.swap(eager)
    assert report.swapped
    compiled_model = copy.deepcopy(eager)
    tokens, labels = llama_batch(128, 2, 16)
    explained = _explain(_loss(eager), tokens, labels)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    _loss(eager)(tokens, labels).backward()
    # aot_eager: dynamo, fakes and AOT autograd (the backward) as inductor sees them, without inductor's
    # code generation, which costs tens of seconds per model on a 2-core machine
    loss = torch.compile(_loss(compiled_model), fullgraph=True, backend="aot_eager")(tokens, labels)
    loss.backward()
    assert sum(n for (_, outcome), n in report.calls.items() if outcome == "pytrain") > 0, str(report)
    torch.testing.assert_close(loss, _loss(eager)(tokens, labels), atol=1e-5, rtol=1e-5)
    for (n, a), (_, b) in zip(compiled_model.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)


# ------------------------------------------------------------------------------------------ optimizers
def test_fused_lars_step_compiles_with_zero_breaks_and_matches_eager():
    eager_params = [torch.nn.Parameter(t) for t in _params()]
    compiled_params = [torch.nn.Parameter(t.detach().clone()) for t in eager_params]
    eager, compiled = FusedLARS(eager_params, lr=0.1, weight_decay=1e-4), FusedLARS(compiled_params, lr=0.1,
                                                                                    weight_decay=1e-4)
    step = torch.compile(compiled.step, fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    for i in range(3):
        for a, b in zip(eager_params, compiled_params):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        if i == 1:  # explain runs the step: on a copy, in mid-run state
            explained = _explain(copy.deepcopy(compiled).step)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        eager.step()
        step()
    for a, b in zip(compiled_params, eager_params):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


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
        raw, _ = torch.ops.pytrain.attention_fwd_reference(q, k, v, 0.25, False, -1, -1, 0.0, 0)
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
