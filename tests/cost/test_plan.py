"""Planner: valid layouts, ranking, monotonic properties, presets, the `pytrain cost` / `plan` entry point."""
from dataclasses import replace

import pytest

from pytrain.cost import Cluster, Link, get_cluster, plan, training_flops
from pytrain.cost.cli import main

SMALL = dict(model_params=1.3e9, layers=24, hidden=2048, seq=2048, global_batch=64)


@pytest.fixture(scope="module")
def node():
    return get_cluster("8xH100-400G")


@pytest.fixture(scope="module")
def ranked(node):
    return plan(**SMALL, cluster=node, compression=(1.0, 0.5))


def test_valid_and_ranked(ranked, node):
    assert ranked
    times = [float(f"{c.step_s:.3g}") for c in ranked]
    assert times == sorted(times)
    ties = [(a, b) for a, b in zip(ranked, ranked[1:]) if f"{a.step_s:.3g}" == f"{b.step_s:.3g}"]
    assert all(a.compression >= b.compression for a, b in ties)  # an equally fast config without compression first
    for c in ranked:
        assert c.dp * c.pp * c.tp == node.devices and c.tp <= node.gpus_per_node
        assert c.dp * c.micro_batch * c.microbatches == SMALL["global_batch"] and c.microbatches >= c.pp
        assert c.memory.total <= node.memory_bytes
        assert c.tokens_per_s == pytest.approx(SMALL["global_batch"] * SMALL["seq"] / c.step_s)


def test_small_model_prefers_data_parallel(ranked):
    best = ranked[0]
    assert (best.dp, best.pp, best.tp) == (8, 1, 1)  # fits on one device: DP has no bubble and no TP traffic
    assert best.recompute == "none"  # recompute only costs time when memory is not short


def test_large_model_needs_model_parallel():
    # 70B: bf16 params + grads alone are 280 GB, so 80 GB devices need the model split by TP x PP
    configs = plan(70e9, 80, 8192, 4096, 64, get_cluster("8xH100-400G", nodes=4), heads=64, compression=(1.0,),
                   micro_batches=(1,))
    assert configs and all(c.pp * c.tp >= 4 for c in configs)


def test_monotonic_in_cluster(node):
    slow = replace(node, intra=Link(node.intra.alpha, node.intra.beta * 20))
    fast_gpus = replace(node, flops=node.flops * 2)
    best = plan(**SMALL, cluster=node)[0].step_s
    assert plan(**SMALL, cluster=slow)[0].step_s >= best
    assert plan(**SMALL, cluster=fast_gpus)[0].step_s < best
    two_nodes = get_cluster("8xH100-400G", nodes=2)
    assert plan(**SMALL, cluster=two_nodes)[0].step_s < best  # twice the devices on the same global batch
    more_memory = plan(**SMALL, cluster=replace(node, memory_bytes=node.memory_bytes * 4))
    assert len(more_memory) >= len(plan(**SMALL, cluster=node))


def test_training_flops():
    assert training_flops(1e9, 24, 2048, 1, 1) == pytest.approx(6e9 + 12 * 24 * 2048)
    full = training_flops(1e9, 24, 2048, 2048, 8, "full")
    assert full == pytest.approx(training_flops(1e9, 24, 2048, 2048, 8) * 4 / 3)


@pytest.mark.parametrize("call, exc, match", [
    # tp | heads = 1 and pp | layers = 7 leave dp = 8, which 3 sequences cannot feed
    (lambda n: plan(**{**SMALL, "global_batch": 3, "layers": 7}, cluster=n, heads=1), ValueError, "no valid layout"),
    (lambda n: plan(**{**SMALL, "layers": 0}, cluster=n), ValueError, "layers"),
    (lambda n: plan(**{**SMALL, "model_params": -1}, cluster=n), ValueError, "model_params"),
    (lambda n: plan(**SMALL, cluster="8xH100-400G"), TypeError, "Cluster"),
    (lambda n: get_cluster("8xTPU"), ValueError, "unknown cluster preset"),
    (lambda n: Cluster("x", 0, 1, 1e12, 1e9, Link(0, 0), Link(0, 0)), ValueError, "gpus_per_node"),
])
def test_bad_input(node, call, exc, match):
    with pytest.raises(exc, match=match):
        call(node)


def test_cli(capsys):
    assert main(["--params", "1.3e9", "--layers", "24", "--hidden", "2048", "--seq", "2048", "--batch", "64",
                 "--top", "3"], command="plan") == 0
    out = capsys.readouterr().out
    assert out.count("\n| 8 | 1 | 1 |") >= 1 and "tokens/s" in out
    assert main(["--params", "1.3e9", "--layers", "24", "--hidden", "2048", "--seq", "2048", "--batch", "64",
                 "--dp", "4", "--pp", "2"]) == 0
    assert "dp=4 pp=2" in capsys.readouterr().out
    assert main(["cost", "--collective", "25e6", "--nodes", "2"]) == 0
    assert "hierarchical_allreduce" in capsys.readouterr().out
    assert main(["plan", "--batch", "3", "--layers", "7", "--heads", "1"]) == 2
    assert "no valid layout" in capsys.readouterr().out
