"""One rank of the DDP hook tests: ``python ddp_worker.py RANK WORLD STORE_FILE OUT_FILE [SCENARIO ...]``.

Runs the named scenarios (default: every scenario of tests/comm/test_hooks.py, ``SCENARIOS``) in one process pair
(process start-up dominates the cost) and saves a dict of results to OUT_FILE for the test to check; scenarios
that keep files between launches (``resume_save`` / ``resume_load``) use OUT_FILE's directory.  gloo, CPU, one thread per rank; a collective that
hangs raises after TIMEOUT instead of hanging CI.

Model and data (documented for the convergence checks): an MLP 32 -> 128 -> 128 -> 128 -> 10 (ReLU; 38.5k
params, the two 128 x 128 weights batched by PowerSGD) on 16384 points x ~ N(0, I_32) labelled by a fixed random
teacher MLP (32 -> 64 -> 10, tanh) with 10% of the labels replaced at random.  Plain SGD, lr 0.5, global batch
128 (64 per rank), 300 steps; the loss is the full-set cross entropy (plain DDP ends near 0.98).  Momentum is
left out on purpose: on top of top-k's error feedback it needs DGC's momentum correction (an optimizer change),
without which top-k 1% ends ~17% (0.9 momentum, lr 0.05) above plain DDP here.
"""
from __future__ import annotations

import datetime
import io
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as torch_psgd

from pytrain.comm import (AllReduceState, PowerSGDState, QuantState, TopKState, powersgd_hook, register_comm_hook,
                          topk_hook)

TIMEOUT = datetime.timedelta(seconds=60)
STEPS = 300
SMALL_BUCKETS_MB = 0.02  # ~20 KB: the 38.5k-param MLP spans 5 buckets, several in flight
ONE_BUCKET_MB = 100
N, D_IN, CLASSES, BATCH = 16384, 32, 10, 64


def dataset():
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(N, D_IN, generator=gen)
    w1, w2 = torch.randn(D_IN, 64, generator=gen) / D_IN ** 0.5, torch.randn(64, CLASSES, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    flip = torch.rand(N, generator=gen) < 0.1
    y[flip] = torch.randint(CLASSES, (int(flip.sum()),), generator=gen)
    return x, y


def mlp(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(D_IN, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
              torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, CLASSES)]
    return torch.nn.Sequential(*layers).to(dtype)


def batch(data, step: int):
    """Rank's half of the global batch of ``step`` (the same batches in every run)."""
    x, y = data
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(step))[:2 * BATCH]
    idx = idx[dist.get_rank() * BATCH:(dist.get_rank() + 1) * BATCH]
    return x[idx], y[idx]


def backward(model, data, step: int) -> None:
    model.zero_grad(set_to_none=True)
    x, y = batch(data, step)
    F.cross_entropy(model(x), y).backward()


def train(model: DDP, data, steps: range, opt: torch.optim.Optimizer) -> None:
    for step in steps:
        backward(model, data, step)
        opt.step()


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def full_loss(model, data) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(data[0]), data[1]))


STATES: Dict[str, Callable[[], object]] = {
    "allreduce": lambda: AllReduceState(None),
    "powersgd": lambda: PowerSGDState(None, rank=4, start_iter=10),
    "topk": lambda: TopKState(None, ratio=0.01),
    "topk_exact": lambda: TopKState(None, ratio=0.01, exact=True),
    "int8": lambda: QuantState(None, fmt="int8", block_size=256),
    "fp8_e4m3": lambda: QuantState(None, fmt="fp8_e4m3", block_size=128),
}


def hooked(state, bucket_mb: float = SMALL_BUCKETS_MB, dtype=torch.float32):
    model = DDP(mlp(dtype), bucket_cap_mb=bucket_mb)
    if state is not None:
        register_comm_hook(model, state)
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def scenario_train(data) -> dict:
    """Each hook (and DDP's default) trained STEPS steps with several buckets in flight."""
    out = {}
    for name, make in [("default", lambda: None)] + list(STATES.items()):
        state = make()
        model, opt = hooked(state)
        train(model, data, range(STEPS - 1), opt)
        calls = state.stats.calls if state is not None else 0
        train(model, data, range(STEPS - 1, STEPS), opt)
        out[name] = {"loss": full_loss(model, data), "params": flat_params(model),
                     "buckets": state.stats.calls - calls if state is not None else 0,  # one call per bucket
                     "ratio": state.stats.compression_ratio if state is not None else 1.0}
    return out


def torch_and_pytrain_powersgd():
    """The same MLP under torch's powerSGD_hook and under pytrain's, one bucket each, rank 4, same settings."""
    theirs = DDP(mlp(), bucket_cap_mb=ONE_BUCKET_MB)
    theirs.register_comm_hook(torch_psgd.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2,
                                                       min_compression_rate=2, use_error_feedback=True,
                                                       warm_start=True, random_seed=0,
                                                       batch_tensors_with_same_shape=True), torch_psgd.powerSGD_hook)
    ours, _ = hooked(PowerSGDState(None, rank=4, start_iter=2), ONE_BUCKET_MB)
    return theirs, ours


def scenario_torch_powersgd(data) -> dict:
    """Averaged gradients of torch's powerSGD_hook and pytrain's, one bucket, same settings and seed."""
    theirs, ours = torch_and_pytrain_powersgd()
    grads: Dict[str, List[torch.Tensor]] = {"torch": [], "pytrain": []}
    for step in range(7):
        for name, model in (("torch", theirs), ("pytrain", ours)):
            backward(model, data, step)
            grads[name].append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return grads


def scenario_nan(data) -> dict:
    """A NaN in one rank's gradient at a compressed step: every rank's gradient of that param must be non-finite;
    the next step is finite again."""
    out = {}
    for name in ("allreduce", "powersgd", "topk", "int8"):
        state = STATES[name]()
        model, opt = hooked(state)
        weight = model.module[0].weight
        poison = {"on": False}
        weight.register_hook(lambda g: g.index_fill(0, torch.tensor([3]), float("nan")) if poison["on"] else g)
        train(model, data, range(12), opt)
        poison["on"] = dist.get_rank() == 1
        backward(model, data, 12)
        nan_step = {n: bool(torch.isfinite(p.grad).all()) for n, p in model.named_parameters()}
        poison["on"] = False
        backward(model, data, 13)
        out[name] = {"nan_step_finite": nan_step,
                     "next_step_finite": all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())}
    return out


def scenario_half(data) -> dict:
    """bfloat16 / float16 gradients (compressed in float32): 30 steps of each compressing hook."""
    out = {}
    for dtype in (torch.bfloat16, torch.float16):
        x, y = data[0].to(dtype), data[1]
        for name in ("powersgd", "topk", "int8"):
            state = {"powersgd": lambda: PowerSGDState(None, rank=4, start_iter=2)}.get(name, STATES[name])()
            model, opt = hooked(state, dtype=dtype)
            first = full_loss(model, (x, y))
            train(model, (x, y), range(30), opt)
            out[f"{name}_{str(dtype).removeprefix('torch.')}"] = {"losses": (first, full_loss(model, (x, y))),
                                                                   "params": flat_params(model)}
    return out


def roundtrip(state_dict: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def scenario_save_load(data) -> dict:
    """Train 8 steps, save model + optimizer + hook state, train 6 more; a fresh run (new DDP) resumed from the
    save must end bitwise equal.  The continued run reloads its own state too (a state loaded into the DDP it
    was saved from continues as it was)."""
    out = {}
    for name in ("powersgd", "topk", "int8"):
        make = {"powersgd": lambda: PowerSGDState(None, rank=2, start_iter=3)}.get(name, STATES[name])
        state = make()
        model, opt = hooked(state)
        train(model, data, range(8), opt)
        saved = [roundtrip(model.module.state_dict()), roundtrip(opt.state_dict()), roundtrip(state.state_dict())]
        state.load_state_dict(state.state_dict())
        train(model, data, range(8, 14), opt)
        resumed_state = make()
        resumed_state.load_state_dict(saved[2])
        resumed, resumed_opt = hooked(resumed_state)
        resumed.module.load_state_dict(saved[0])
        resumed_opt.load_state_dict(saved[1])
        train(resumed, data, range(8, 14), resumed_opt)
        out[name] = {"continued": flat_params(model), "resumed": flat_params(resumed),
                     "iter": (state.iter, resumed_state.iter)}
    return out


def _error(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (the message is what the test checks)
        return f"{type(exc).__name__}: {exc}"
    return ""


def scenario_errors(data) -> dict:
    """States used with another process group, and unsupported gradient dtypes (last: a failed backward leaves
    its DDP model unusable)."""
    group0 = dist.new_group([0])
    out = {}
    model, _ = hooked(None)  # DDP's constructor runs collectives: on every rank
    if dist.get_rank() == 0:
        out["register_other_group"] = _error(lambda: register_comm_hook(model, TopKState(group0)))
    else:
        out["build_not_member"] = _error(lambda: TopKState(group0))
    saved = TopKState(None).state_dict()
    saved["group_ranks"] = [0]
    out["load_other_group"] = _error(lambda: TopKState(None).load_state_dict(saved))
    out["load_other_config"] = _error(lambda: TopKState(None, ratio=0.5).load_state_dict(TopKState(None).state_dict()))
    model = DDP(mlp(torch.float64))
    model.register_comm_hook(PowerSGDState(None), powersgd_hook)
    out["float64"] = _error(lambda: backward(model, (data[0].double(), data[1]), 0))
    model = DDP(mlp())
    model.register_comm_hook(PowerSGDState(None), topk_hook)
    out["wrong_state"] = _error(lambda: backward(model, data, 0))
    return out


def scenario_rank_deficient(data) -> dict:
    """2 ranks x batch 1: every weight gradient has rank <= 2 < 4.  Averaged gradients of plain DDP, torch's
    powerSGD_hook and pytrain's (rank 4, one bucket, same seed) at the same parameters, 6 steps."""
    def one_sample(model, step):
        model.zero_grad(set_to_none=True)
        x, y = batch(data, step)
        F.cross_entropy(model(x[:1]), y[:1]).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    theirs, ours = torch_and_pytrain_powersgd()
    plain = DDP(mlp(), bucket_cap_mb=ONE_BUCKET_MB)
    return {name: [one_sample(model, step) for step in range(6)]
            for name, model in (("torch", theirs), ("pytrain", ours), ("allreduce", plain))}


#: resume_save / resume_load: hook states (one bucket of 38.5k elements: top-k's sampled selection; small
#: buckets: several in flight and a first layout unlike the rebuilt one)
RESUME = {"powersgd": (lambda: PowerSGDState(None, rank=2, start_iter=3), SMALL_BUCKETS_MB),
          "powersgd_one_bucket": (lambda: PowerSGDState(None, rank=4, start_iter=2), ONE_BUCKET_MB),
          "topk": (lambda: TopKState(None, ratio=0.01), ONE_BUCKET_MB),
          "topk_small_buckets": (lambda: TopKState(None, ratio=0.01), SMALL_BUCKETS_MB),
          "int8": (lambda: QuantState(None, fmt="int8", block_size=256), SMALL_BUCKETS_MB)}
RESUME_AT, RESUME_END = 8, 14
WORKDIR = Path(".")


def _resume_file(kind: str, name: str) -> Path:
    return WORKDIR / f"{kind}_{name}_rank{dist.get_rank()}.pt"


def run_to_resume_end(model, opt, state, data) -> dict:
    """Steps RESUME_AT..RESUME_END: each step's averaged gradients, the final parameters, the hook's iteration."""
    grads = []
    for step in range(RESUME_AT, RESUME_END):
        backward(model, data, step)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
    return {"params": flat_params(model), "grads": grads, "iter": state.iter}


def scenario_resume_save(data) -> dict:
    """Uninterrupted runs of RESUME_END steps; at RESUME_AT each saves model, optimizer, the state's state_dict
    and the pickled state itself (torch.save(state)) for ``resume_load`` in fresh processes."""
    out = {}
    for name, (make, cap) in RESUME.items():
        state = make()
        model, opt = hooked(state, cap)
        train(model, data, range(RESUME_AT), opt)
        torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(),
                    "hook": roundtrip(state.state_dict())}, _resume_file("saved", name))
        torch.save(state, _resume_file("pickled", name))  # the state object itself, as torch's PowerSGDState allows
        out[name] = run_to_resume_end(model, opt, state, data)
    return out


def scenario_resume_load(data) -> dict:
    """Fresh processes: a new state given the saved state_dict by a plain load_state_dict (no priming backward),
    and the unpickled state object, each with a new DDP, run from RESUME_AT to RESUME_END."""
    out = {}
    for name, (make, cap) in RESUME.items():
        saved = torch.load(_resume_file("saved", name), weights_only=True)
        runs = {}
        for how in ("load_state_dict", "unpickled"):
            if how == "load_state_dict":
                state = make()
                state.load_state_dict(saved["hook"])
            else:
                state = torch.load(_resume_file("pickled", name), weights_only=False)
            model, opt = hooked(state, cap)
            model.module.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            runs[how] = run_to_resume_end(model, opt, state, data)
        out[name] = runs
    state = RESUME["powersgd"][0]()  # last: the failed backward leaves its DDP model unusable
    state.load_state_dict(torch.load(_resume_file("saved", "powersgd"), weights_only=True)["hook"])
    other = DDP(torch.nn.Sequential(torch.nn.Linear(D_IN, 64), torch.nn.ReLU(), torch.nn.Linear(64, CLASSES)))
    register_comm_hook(other, state)
    out["wrong_model"] = _error(lambda: backward(other, data, 0))
    return out


SCENARIOS = {"train": scenario_train, "torch_powersgd": scenario_torch_powersgd, "nan": scenario_nan,
             "save_load": scenario_save_load, "half": scenario_half, "errors": scenario_errors}
#: run only when named on the command line
EXTRA_SCENARIOS = {"rank_deficient": scenario_rank_deficient, "resume_save": scenario_resume_save,
                   "resume_load": scenario_resume_load}


def main(rank: int, world: int, store: str, out_file: str, names: List[str]) -> None:
    global WORKDIR
    WORKDIR = Path(out_file).parent
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    data = dataset()
    chosen = {name: {**SCENARIOS, **EXTRA_SCENARIOS}[name] for name in names} if names else SCENARIOS
    results = {name: fn(data) for name, fn in chosen.items()}
    torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
