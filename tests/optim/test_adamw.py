"""FusedAdamW against torch.optim.AdamW step by step, on every backend that runs here."""
import functools
import math

import pytest
import torch

from pytrain.ops.adamw import dequantize_m, dequantize_v
from pytrain.ops.multi_tensor import storage_perm
from pytrain.optim import FusedAdamW
from pytrain.testing.backends import CPU_IMPLS, impl_or_skip
from pytrain.testing.optim_compare import (LAYOUTS, ODD_SHAPES, clone_params, layout_params, make_params,
                                           random_grads, run_side_by_side, states_keep_layout,
                                           storage_frame_mismatches)

STEPS = 50
FP32_MAX_REL = 1e-5

# Triton runs in the interpreter on CPU: fewer steps keep it quick while still exercising the state.
STEPS_BY_IMPL = {"triton": 12}

CONFIGS = {
    "default": dict(lr=1e-2),
    "amsgrad": dict(lr=1e-2, amsgrad=True, weight_decay=0.1),
    "maximize": dict(lr=3e-3, maximize=True, betas=(0.8, 0.99), eps=1e-6),
    "no_decay": dict(lr=1e-3, weight_decay=0.0),
}


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_torch_adamw(impl, config):
    impl_or_skip("adamw_step", impl)
    ours = make_params(ODD_SHAPES)
    theirs = clone_params(ours)
    kwargs = CONFIGS[config]
    worst = run_side_by_side(ours, FusedAdamW(ours, impl=impl, **kwargs), theirs,
                             torch.optim.AdamW(theirs, foreach=False, **kwargs),
                             random_grads(ours, STEPS_BY_IMPL.get(impl, STEPS)))
    assert worst <= FP32_MAX_REL


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_two_param_groups(impl):
    impl_or_skip("adamw_step", impl)
    ours = make_params(ODD_SHAPES)
    theirs = clone_params(ours)

    def groups(ps):
        return [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.5}, {"params": ps[2:], "lr": 3e-3}]

    worst = run_side_by_side(ours, FusedAdamW(groups(ours), weight_decay=0.01, impl=impl), theirs,
                             torch.optim.AdamW(groups(theirs), weight_decay=0.01),
                             random_grads(ours, STEPS_BY_IMPL.get(impl, STEPS)))
    assert worst <= FP32_MAX_REL


def test_float32_kernel_tracks_float64_reference():
    """The fp32 kernel stays within fp32 rounding of the same algorithm run in float64."""
    ours = make_params(ODD_SHAPES)
    exact = clone_params(ours, torch.float64)
    worst = run_side_by_side(ours, FusedAdamW(ours, lr=1e-2), exact, FusedAdamW(exact, lr=1e-2, impl="reference"),
                             random_grads(ours, STEPS))
    assert worst <= FP32_MAX_REL


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_max_grad_norm_matches_clip_then_step(impl):
    impl_or_skip("adamw_step", impl)
    ours = make_params(ODD_SHAPES)
    theirs = clone_params(ours)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2)
    fused = FusedAdamW(ours, lr=1e-2, max_grad_norm=1.0, impl=impl)

    class ClipThenStep:
        def step(self):
            torch.nn.utils.clip_grad_norm_(theirs, 1.0)
            torch_opt.step()

    worst = run_side_by_side(ours, fused, theirs, ClipThenStep(), random_grads(ours, STEPS, scale=3.0))
    assert worst <= FP32_MAX_REL
    assert fused.last_grad_norm > 1.0  # clipping was active


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_grads_skip_the_step(bad):
    params = make_params(ODD_SHAPES)
    opt = FusedAdamW(params, lr=1e-2, max_grad_norm=1.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state[params[1]].items()}
    params[1].grad[0, 0, 0] = bad
    opt.step()
    assert opt.last_step_skipped and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert all(torch.equal(state_before[k], v) for k, v in opt.state[params[1]].items())
    params[1].grad[0, 0, 0] = 0.0
    opt.step()
    assert not opt.last_step_skipped and int(opt.state[params[1]]["step"]) == 2


@pytest.mark.parametrize("impl", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_with_masters_follow_fp32(impl, dtype):
    """With fp32 masters, bf16/fp16 params are the rounded fp32 trajectory (same rounded grads)."""
    impl_or_skip("adamw_step", impl)
    low = make_params(ODD_SHAPES, dtype)
    masters = clone_params(low, torch.float32)
    opt = FusedAdamW(low, lr=1e-2, master_weights=True, impl=impl)
    fp32_opt = torch.optim.AdamW(masters, lr=1e-2)
    for gs in random_grads(masters, STEPS):
        for p, q, g in zip(low, masters, gs):
            p.grad = g.to(dtype)
            q.grad = p.grad.float()
        opt.step()
        fp32_opt.step()
    for p, q in zip(low, masters):
        torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), rtol=FP32_MAX_REL, atol=1e-6)
        assert torch.equal(p.detach(), opt.state[p]["master_param"].to(dtype))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"])
def test_state_dict_round_trip_continues_identically(state_dtype):
    params = make_params(ODD_SHAPES)
    grads = list(random_grads(params, 20))
    opt = FusedAdamW(params, lr=1e-2, state_dtype=state_dtype)
    for gs in grads[:10]:
        for p, g in zip(params, gs):
            p.grad = g.float()
        opt.step()
    saved = opt.state_dict()
    resumed_params = clone_params(params)
    resumed = FusedAdamW(resumed_params, lr=1e-2, state_dtype=state_dtype)
    resumed.load_state_dict(saved)
    for k, v in opt.state[params[0]].items():
        assert resumed.state[resumed_params[0]][k].dtype == v.dtype
    for gs in grads[10:]:
        for ps, o in ((params, opt), (resumed_params, resumed)):
            for p, g in zip(ps, gs):
                p.grad = g.float()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, resumed_params))


def test_loads_torch_adamw_state():
    """A torch.optim.AdamW checkpoint continues under FusedAdamW with the same next steps."""
    params = make_params(ODD_SHAPES)
    grads = list(random_grads(params, 20))
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    for gs in grads[:10]:
        for p, g in zip(params, gs):
            p.grad = g.float()
        torch_opt.step()
    ours = clone_params(params)
    fused = FusedAdamW(ours, lr=1e-2)
    fused.load_state_dict(torch_opt.state_dict())
    worst = run_side_by_side(ours, fused, params, torch_opt, iter(grads[10:]))
    assert worst <= FP32_MAX_REL


def test_compact_states_use_less_memory():
    params = make_params([(1024, 256)])

    def state_bytes(state_dtype):
        opt = FusedAdamW(params, state_dtype=state_dtype)
        params[0].grad = torch.randn_like(params[0])
        opt.step()
        return sum(v.numel() * v.element_size() for v in opt.state[params[0]].values() if v.dim() > 0)

    fp32 = state_bytes(torch.float32)
    assert state_bytes(torch.bfloat16) == fp32 // 2
    assert state_bytes("int8") <= 0.3 * fp32


SEEDS = 8


@functools.lru_cache(maxsize=None)
def _final_losses(state_dtype) -> torch.Tensor:
    """Final training losses of a small MLP regression (300 full-batch steps), one per init seed 0..SEEDS-1,
    plus the loss at init of seed 0 last.  One thread: torch's CPU matmuls round differently with the
    OpenMP team size (pytrain's kernels do not: tests/ops/test_multi_tensor.py), so pinning it makes every
    run repeat bit for bit on a given CPU whatever the machine's load or OMP_NUM_THREADS."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        data = torch.randn(512, 32, generator=gen)
        target = torch.sin(data[:, :1] * 2) + data[:, 1:2] * data[:, 2:3] + 0.3 * torch.randn(512, 1, generator=gen)
        losses, initial = [], None
        for seed in range(SEEDS):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
            opt = FusedAdamW(model.parameters(), lr=3e-3, state_dtype=state_dtype)
            for _ in range(300):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(data), target)
                initial = float(loss.detach()) if initial is None else initial
                loss.backward()
                opt.step()
            with torch.no_grad():
                losses.append(float(torch.nn.functional.mse_loss(model(data), target)))
        return torch.tensor(losses + [initial], dtype=torch.float64)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
def test_compact_states_train_like_fp32(state_dtype):
    """Compact states train as well as fp32 ones, judged against fp32 training's own spread.

    A bound on one run cannot be derived: training is chaotic, so a rounding difference anywhere grows into
    a different end point (on this machine one int8 run ends 0.5% apart between 1 and 2 matmul threads, and
    the int8-minus-fp32 difference per init seed ranged from -19% to +35% of the mean loss over seeds 0-7,
    while the means differed by 5%).  What is stable is the distribution over init seeds: the mean final
    loss of compact states must lie within 3 standard errors of the difference of the two means, the
    standard errors estimated from the seeds' spread itself (each run's end point is an independent draw
    from its optimizer's distribution; 3 SE: a 0.3% false alarm rate for equal means under a normal
    approximation, measured z = 0.06 (bfloat16) and 0.43 (int8) here).  With 8 seeds that is a shift of
    about a third of the mean loss (31% and 35% here): an optimizer that does not train (stale, wrongly
    scaled or zeroed moments) ends far beyond it, and both must also have learnt (below half the loss at
    init, 1.57 here).
    """
    fp32, compact = _final_losses(torch.float32), _final_losses(state_dtype)
    initial, fp32, compact = fp32[-1], fp32[:-1], compact[:-1]
    standard_error = math.sqrt(fp32.var() / SEEDS + compact.var() / SEEDS)
    assert abs(compact.mean() - fp32.mean()) <= 3 * standard_error, (compact.tolist(), fp32.tolist())
    assert fp32.mean() < 0.5 * initial and compact.mean() < 0.5 * initial


def test_lr_scheduler_and_closure():
    params = make_params([(7, 3)])
    opt = FusedAdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = params[0].pow(2).sum()
        loss.backward()
        return loss

    losses = []
    for _ in range(3):
        losses.append(float(opt.step(closure)))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    assert losses[2] < losses[0]


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="real floating-point"):
        FusedAdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    with pytest.raises(ValueError, match="mixes devices"):
        FusedAdamW([torch.zeros(3, requires_grad=True), torch.zeros(3, device="meta", requires_grad=True)])
    with pytest.raises(ValueError, match="state_dtype"):
        FusedAdamW(make_params([(3,)]), state_dtype=torch.float16)
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdamW(make_params([(3,)]), amsgrad=True, state_dtype="int8")
    sparse = torch.nn.Embedding(10, 3, sparse=True)
    sparse(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        FusedAdamW(sparse.parameters()).step()


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_params_match_torch(impl, layout):
    """channels_last conv weights, transposed and sliced weights step as torch.optim.AdamW steps them."""
    impl_or_skip("adamw_step", impl)
    ours = layout_params(layout)
    theirs = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, amsgrad=True, impl=impl)
    worst = run_side_by_side(ours, opt, theirs, torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, foreach=False),
                             random_grads(ours, STEPS_BY_IMPL.get(impl, 10)))
    assert worst <= FP32_MAX_REL
    assert states_keep_layout(opt)


LAYOUT_SETTINGS = {
    "fp32": (torch.float32, dict()),
    "int8": (torch.float32, dict(state_dtype="int8")),
    "bf16_masters": (torch.bfloat16, dict(master_weights=True)),
    "bf16_states": (torch.float32, dict(state_dtype=torch.bfloat16, max_grad_norm=1.0)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("setting", LAYOUT_SETTINGS)
def test_non_contiguous_params_step_in_storage_order(layout, setting):
    """Any layout (int8 states, bf16 masters too) is the contiguous kernel on the storage order, bit for bit."""
    dtype, kwargs = LAYOUT_SETTINGS[setting]
    assert storage_frame_mismatches(lambda ps: FusedAdamW(ps, lr=1e-2, **kwargs), layout, dtype) == []


def test_channels_last_model_trains_like_torch():
    """model.to(memory_format=torch.channels_last): real autograd grads, params stay channels_last."""
    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        return net.to(memory_format=torch.channels_last)

    ours, theirs = model(), model()
    opt_ours = FusedAdamW(ours.parameters(), lr=1e-2)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(2, 3, 12, 12).to(memory_format=torch.channels_last)
    for _ in range(5):
        for net, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    assert ours[0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=FP32_MAX_REL, atol=1e-6)


def test_float64_params_keep_float64_moments():
    """float64 params: float64 moments, so the run is torch.optim.AdamW's to float64 rounding over many steps."""
    ours = make_params(ODD_SHAPES, torch.float64)
    theirs = clone_params(ours)
    opt = FusedAdamW(ours, lr=1e-2, amsgrad=True)
    worst = run_side_by_side(ours, opt, theirs, torch.optim.AdamW(theirs, lr=1e-2, amsgrad=True, foreach=False),
                             random_grads(ours, 200))
    assert worst <= 1e-12
    assert all(v.dtype == torch.float64 for k, v in opt.state[ours[1]].items() if k != "step")


@pytest.mark.parametrize("saved,loaded", [(torch.float32, "int8"), ("int8", torch.float32),
                                          (torch.float32, torch.bfloat16), ("int8", torch.bfloat16)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_load_state_dict_converts_to_the_state_dtype(saved, loaded, layout):
    """After load_state_dict the states have the loading optimizer's format (int8 codes, not 4x the memory)."""
    def params():
        return layout_params("channels_last") if layout == "channels_last" else make_params(ODD_SHAPES)

    source_params, target_params = params(), params()
    source = FusedAdamW(source_params, lr=1e-2, state_dtype=saved)
    grads = list(random_grads(source_params, 4))
    run_side_by_side(source_params, source, clone_params(source_params), FusedAdamW(clone_params(source_params)),
                     iter(grads))
    target = FusedAdamW(target_params, lr=1e-2, state_dtype=loaded)
    target.load_state_dict(source.state_dict())
    fresh = FusedAdamW(params(), lr=1e-2, state_dtype=loaded)
    run_side_by_side(fresh.param_groups[0]["params"], fresh, clone_params(source_params),
                     FusedAdamW(clone_params(source_params)), iter(grads[:1]))
    for p, q in zip(target_params, fresh.param_groups[0]["params"]):
        got, want = target.state[p], fresh.state[q]
        assert sorted(got) == sorted(want)
        for key in want:
            assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
            assert got[key].stride() == want[key].stride(), key
    # the converted moments are the saved ones up to the format's rounding
    for p, q in zip(target_params, source_params):
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = _float_moment(target.state[p], key), _float_moment(source.state[q], key)
            torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * float(b.abs().max()))
    # and stepping continues
    run_side_by_side(target_params, target, clone_params(target_params), FusedAdamW(clone_params(target_params)),
                     iter(grads[:2]))
    assert all(torch.isfinite(p).all() for p in target_params)


def test_int8_refuses_an_amsgrad_state_dict_before_replacing_anything():
    params = make_params(ODD_SHAPES)
    torch_opt = torch.optim.AdamW(params, lr=1e-2, amsgrad=True)
    for p in params:
        p.grad = torch.ones_like(p)
    torch_opt.step()
    ours = FusedAdamW(clone_params(params), lr=0.5, state_dtype="int8")
    with pytest.raises(ValueError, match=r"amsgrad is not supported with int8 states.*saved param group 0"):
        ours.load_state_dict(torch_opt.state_dict())
    assert ours.param_groups[0]["lr"] == 0.5 and not ours.state


def _float_moment(state, key):
    """exp_avg / exp_avg_sq of a state as float32 values shaped like the param (int8 codes dequantized in the
    storage order their blocks follow)."""
    q = state[key]
    if q.is_floating_point():
        return q.float()
    dequantize = dequantize_m if key == "exp_avg" else dequantize_v
    perm = storage_perm(q) or tuple(range(q.dim()))
    out = torch.empty_like(q, dtype=torch.float32)
    out.permute(perm).copy_(dequantize(q.permute(perm), state[f"{key}_scale"], torch.float32))
    return out


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_clipping_huge_and_tiny_grads_is_not_a_skip(impl, scale):
    """Finite gradients whose float32 squares overflow (1e20) or underflow (1e-25) are clipped like torch's
    clip_grad_norm_ clips them in float64, never taken for an overflow (a skipped step) or for 0."""
    impl_or_skip("global_norm", impl)
    ours = make_params(ODD_SHAPES)
    theirs = clone_params(ours, torch.float64)
    fused = FusedAdamW(ours, lr=1e-2, max_grad_norm=1.0, impl=impl)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)

    class ClipThenStep:
        def step(self):
            torch.nn.utils.clip_grad_norm_(theirs, 1.0)
            torch_opt.step()

    worst = run_side_by_side(ours, fused, theirs, ClipThenStep(), random_grads(ours, 3, scale=scale))
    assert fused.skipped_steps == 0 and math.isfinite(fused.last_grad_norm) and fused.last_grad_norm > 0
    assert worst <= FP32_MAX_REL
