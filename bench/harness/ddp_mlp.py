"""The model and the no-communication floor of the DDP hook benchmarks (bench_hooks.py, bench_links.py)."""
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
