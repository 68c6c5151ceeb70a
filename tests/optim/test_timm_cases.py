"""timm's optimizer test cases, run against pytrain's fused optimizers through timm's own factory.

timm's pip package ships no tests, so the cases of timm's ``tests/test_optim.py`` are re-expressed here in
our words, on the same problems: pytrain's optimizers are registered in timm's optimizer registry (names
``pytrainadamw``, ``pytrainlamb``, ``pytrainlars``: timm splits names on "_", so none can have one) and
built with ``timm.optim.create_optimizer_v2``, as a timm training script builds them.

  * basic cases: a weight (10, 5) and bias (10,), contiguous and non-contiguous (slices of larger tensors),
    plain, in two param groups (the second with its own lr) and as one single-tensor group; 200 steps of
    ``optimizer.step(closure)`` on (W x + b)^2 must lower the loss, with and without an LR scheduler;
  * state dict: a second optimizer loads a deep copy of the first one's state dict; 20 more steps of both
    agree bit for bit, their state dicts are equal, and deepcopy keeps the public attributes;
  * Rosenbrock: 2000 steps from (1.5, 1.5) must not end farther from the minimum (1, 1) than the start;
  * timm's model path: ``create_optimizer_v2(model, ...)`` splits weight-decay groups, a channels_last
    model trains, and the Lookahead wrapper (``lookahead_<name>``) steps a pytrain optimizer.
"""
import copy

import pytest
import torch

from pytrain.optim import FusedAdamW, FusedLAMB, FusedLARS

timm_optim = pytest.importorskip("timm.optim", reason="timm (test extra) is not installed")
factory = pytest.importorskip("timm.optim._optim_factory", reason="timm without an optimizer registry")

#: registry name -> (OptimInfo arguments, lr of the cases)
REGISTERED = {
    "pytrainadamw": (dict(opt_class=FusedAdamW, has_betas=True), 1e-3),
    "pytrainlamb": (dict(opt_class=FusedLAMB, has_betas=True), 1e-3),
    "pytrainlars": (dict(opt_class=FusedLARS, has_momentum=True), 1e-3),
}
#: Rosenbrock: lr and the optimizer pytrain's must follow (torch.optim.AdamW needs 1e-2 here: at 1e-3 it ends
#: 0.76 from the minimum after 2000 steps, farther than the start, 0.71).
ROSENBROCK = {
    "pytrainadamw": (1e-2, lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.0, foreach=False)),
    "pytrainlamb": (1e-3, lambda ps, lr: timm_optim.Lamb(ps, lr=lr, weight_decay=0.0, foreach=False)),
    "pytrainlars": (1e-3, lambda ps, lr: timm_optim.Lars(ps, lr=lr, weight_decay=0.0, momentum=0.9)),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """pytrain's optimizers in timm's default registry for this module, then taken out again."""
    registry = factory.default_registry
    for name, (info, _) in REGISTERED.items():
        registry.register(factory.OptimInfo(name=name, description="pytrain fused optimizer", **info))
    yield
    for name in REGISTERED:
        registry._optimizers.pop(name, None)


def create(params, name, **kwargs):
    lr = REGISTERED[name.rpartition("_")[2]][1]
    return timm_optim.create_optimizer_v2(params, name, lr=lr, **kwargs)


def weight_and_bias(contiguous: bool):
    torch.manual_seed(0)
    if contiguous:
        weight, bias = torch.randn(10, 5), torch.randn(10)
    else:
        weight, bias = torch.randn(10, 5, 2)[..., 0], torch.randn(10, 2)[..., 0]
        assert not weight.is_contiguous() and not bias.is_contiguous()
    return weight.requires_grad_(), bias.requires_grad_()


GROUPINGS = {
    "plain": lambda w, b, lr: [w, b],
    "two_groups": lambda w, b, lr: [{"params": [w]}, {"params": [b], "lr": lr}],
    "single_tensor_group": lambda w, b, lr: [{"params": b, "lr": lr}],
}


@pytest.mark.parametrize("scheduler", [False, True])
@pytest.mark.parametrize("grouping", GROUPINGS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("name", REGISTERED)
def test_basic_cases(name, contiguous, grouping, scheduler):
    weight, bias = weight_and_bias(contiguous)
    x = torch.randn(5)
    opt = create(GROUPINGS[grouping](weight, bias, REGISTERED[name][1]), name)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.9) if scheduler else None

    def closure():
        opt.zero_grad()
        loss = (weight.mv(x) + bias).pow(2).sum()
        loss.backward()
        return loss

    initial = closure().item()
    for _ in range(200):
        opt.step(closure)
        if sched:
            sched.step()
    assert closure().item() < initial


def _assert_same(a, b, where="state_dict"):
    """Nested dicts / lists / tensors equal bit for bit."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non_contiguous"])
@pytest.mark.parametrize("name", REGISTERED)
def test_state_dict(name, contiguous):
    weight, bias = weight_and_bias(contiguous)
    x = torch.randn(5)
    opt = create([weight, bias], name, weight_decay=0.01)

    def closure(w, b, o):
        o.zero_grad()
        loss = (w.mv(x) + b).pow(2).sum()
        loss.backward()
        return loss

    for _ in range(20):
        opt.step(lambda: closure(weight, bias, opt))
    weight_c, bias_c = (t.detach().clone().requires_grad_() for t in (weight, bias))
    opt_c = create([weight_c, bias_c], name, weight_decay=0.01)
    opt_c.load_state_dict(copy.deepcopy(opt.state_dict()))
    for _ in range(20):
        opt.step(lambda: closure(weight, bias, opt))
        opt_c.step(lambda: closure(weight_c, bias_c, opt_c))
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    _assert_same(opt.state_dict(), opt_c.state_dict())

    def public(o):
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(opt) == public(copy.deepcopy(opt))


def rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


@pytest.mark.parametrize("name", REGISTERED)
def test_rosenbrock(name):
    """2000 steps from (1.5, 1.5) end no farther from the minimum (1, 1), where torch's / timm's optimizer ends."""
    lr, make_reference = ROSENBROCK[name]
    solution = torch.tensor([1.0, 1.0])
    ends = []
    for make in (lambda ps: timm_optim.create_optimizer_v2(ps, name, lr=lr), lambda ps: make_reference(ps, lr)):
        params = torch.tensor([1.5, 1.5], requires_grad=True)
        initial = params.detach().dist(solution)
        opt = make([params])
        for _ in range(2000):
            opt.zero_grad()
            rosenbrock(params).backward()
            opt.step()
        assert torch.isfinite(params).all() and params.detach().dist(solution) <= initial
        ends.append(params.detach())
    torch.testing.assert_close(ends[0], ends[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", REGISTERED)
def test_timm_model_path_channels_last_and_lookahead(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 10, 10).to(memory_format=torch.channels_last)
    target = torch.randn(4, 2)
    for opt_name in (name, f"lookahead_{name}"):
        opt = create(model, opt_name, weight_decay=0.05)
        inner = getattr(opt, "_base_optimizer", opt)  # timm's Lookahead wraps it
        assert isinstance(inner, REGISTERED[name][0]["opt_class"])
        assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]  # timm's no-decay split
        initial = torch.nn.functional.mse_loss(model(x), target).item()
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), target).backward()
            opt.step()
        assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.nn.functional.mse_loss(model(x), target).item() < initial
