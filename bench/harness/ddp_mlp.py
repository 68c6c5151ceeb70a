"""The model, the no-communication floor and the timed step of the DDP hook benchmarks (bench_hooks.py, bench_links.py)."""
import time

import torch
import torch.distributed as dist


def mlp(width: int, depth: int) -> torch.nn.Module:
    """1024 -> width, ``depth`` hidden width x width layers, -> 1024 (ReLU between), seeded: square weights the
    size of a transformer's, so PowerSGD compresses every matrix."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(1024, width), torch.nn.ReLU()]
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, 1024))


def no_communication_hook(state, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The step's floor: gradients left local (no collective), so the step is forward + backward + update."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def timed_step(ddp: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Seconds of one training step (MSE loss), started together on every rank (a barrier first)."""
    dist.barrier()
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(ddp(x), y).backward()
    opt.step()
    return time.perf_counter() - t0
