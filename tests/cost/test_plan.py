"""Planner: valid layouts, ranking, monotonic properties, presets (memory, utilisation and their sources),
compressed variants, "runs with pytrain" marks, reprs, the `pytrain cost` / `plan` entry point."""
from dataclasses import replace

import pytest

from pytrain.cost import (PRESETS, Cluster, Link, Utilisation, ddp_step, get_cluster, plan, training_flops,
                          utilisation_from_step)
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
        assert c.memory.total <= node.usable_bytes
        assert c.tokens_per_s == pytest.approx(SMALL["global_batch"] * SMALL["seq"] / c.step_s)


def test_small_model_prefers_data_parallel(ranked):
    best = ranked[0]
    assert (best.dp, best.pp, best.tp) == (8, 1, 1)  # fits on one device: DP has no bubble and no TP traffic
    assert best.recompute == "none"  # recompute only costs time when memory is not short


def test_large_model_needs_model_parallel():
    # 70B: bf16 params + grads alone are 280 GB, so 80 GB devices need the model split by TP x PP (unless ZeRO-3
    # shards the params and grads too)
    configs = plan(70e9, 80, 8192, 4096, 64, get_cluster("8xH100-400G", nodes=4), heads=64, compression=(1.0,),
                   micro_batches=(1,), zero_stages=(0, 1))
    assert configs and all(c.pp * c.tp >= 4 for c in configs)
    sharded = plan(70e9, 80, 8192, 4096, 64, get_cluster("8xH100-400G", nodes=4), heads=64, compression=(1.0,),
                   micro_batches=(1,), zero_stages=(3,))
    assert any(c.pp * c.tp < 4 for c in sharded)


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
    (lambda n: Cluster("x", 0, 1, 1e12, 1e9, Link(0, 0), Link(0, 0), Utilisation(0.4, "s")), ValueError,
     "gpus_per_node"),
    (lambda n: Cluster("x", 8, 1, 1e12, 1e9, Link(0, 0), Link(0, 0), 0.45), TypeError, "Utilisation"),
    (lambda n: Utilisation(1.5, "s"), ValueError, "utilisation"),
    (lambda n: Utilisation(0.4, " "), ValueError, "source"),
    (lambda n: utilisation_from_step(1e-6, 1e9, 24, 2048, 2048, 8, 989e12), ValueError, "above peak_flops"),
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


def test_device_memory_is_the_vendor_figure_in_gib():
    """NVIDIA's "80GB" HBM3 of an H100 SXM is 80 GiB (5 stacks of 16 GiB; nvidia-smi shows 81,559 MiB),
    not 80e9 bytes (74.5 GiB); what a plan may fill leaves a reserve below it."""
    h100 = get_cluster("8xH100-400G")
    assert h100.memory_bytes == 80 * 2**30
    assert h100.usable_bytes == h100.memory_bytes - h100.reserve_bytes < 81559 * 2**20
    assert {name: c.memory_bytes / 2**30 for name, c in PRESETS.items()} == {
        "8xH100-400G": 80, "8xH200-400G": 141, "8xA100-200G": 80, "8xA100-40G-100G": 40}


def test_utilisation_is_per_gpu_with_a_source():
    sources = {name: c.utilisation for name, c in PRESETS.items()}
    assert all(u.source and 0 < u.value <= 1 for u in sources.values())
    assert "Dubey et al. 2024" in sources["8xH100-400G"].source  # Llama 3: 38-43% bf16 MFU on H100
    assert "Narayanan et al. 2021" in sources["8xA100-200G"].source
    assert sources["8xH100-400G"].value != sources["8xA100-200G"].value  # not one constant for every GPU


def test_compute_follows_the_utilisation(node):
    half = replace(node, utilisation=Utilisation(node.utilisation.value / 2, "test"))
    want = plan(**SMALL, cluster=node, compression=(1.0,))[0]
    got = [c for c in plan(**SMALL, cluster=half, compression=(1.0,)) if c.describe() == want.describe()][0]
    assert got.compute_s == pytest.approx(2 * want.compute_s)


def test_utilisation_from_a_measured_step_round_trips(node):
    """A step time made from a known utilisation calibrates back to it, with the numbers in its source."""
    flops = training_flops(SMALL["model_params"], SMALL["layers"], SMALL["hidden"], SMALL["seq"], 64)
    step_s = flops / 8 / (node.flops * 0.37)
    got = utilisation_from_step(step_s, SMALL["model_params"], SMALL["layers"], SMALL["hidden"], SMALL["seq"], 64,
                                node.flops, devices=8)
    assert got.value == pytest.approx(0.37) and got.source.startswith("calibrated")
    assert get_cluster("8xH100-400G", utilisation=got).utilisation is got


def test_compressed_variants_only_where_they_are_faster(node):
    """One node's NVLink hides the 1.3B model's all-reduce behind the backward: compression changes nothing
    there, so no compressed variant is listed; across nodes on a slow link, compressed variants that are
    listed are each faster than the same layout uncompressed."""
    assert all(c.compression == 1.0 for c in plan(**SMALL, cluster=node))
    slow = replace(get_cluster("8xH100-400G", nodes=4), inter=Link(8e-6, 1 / 1e9))
    configs = plan(**SMALL, cluster=slow)
    plain = {c.describe().replace("compression=1", ""): c.step_s for c in configs if c.compression == 1.0}
    compressed = [c for c in configs if c.compression < 1]
    assert compressed
    for c in compressed:
        key = c.describe().replace(f"compression={c.compression:g}", "")
        assert key not in plain or c.step_s < 0.99 * plain[key]


def test_every_configuration_is_marked():
    configs = plan(7e9, 32, 4096, 4096, 512, get_cluster("8xH100-400G", nodes=8))
    for c in configs:
        fsdp = c.zero_stage == 3
        model_only = (c.tp > 1 and not fsdp) or c.zero_stage in (1, 2) or (c.pp > 1 and (fsdp or c.tp > 1)) \
            or (c.compression < 1 and (c.pp > 1 or fsdp))
        assert c.runs_with_pytrain == (not model_only), c
        assert c.support.startswith("model only" if model_only else "FSDPTrainer" if fsdp else
                                    "PipelineTrainer" if c.pp > 1 else "DDPTrainer"), c
        if c.pp > 1 and c.dp > 1:  # PipelineTrainer all-reduces after the schedule: the hidden part comes back
            assert c.pytrain_step_s == pytest.approx(c.step_s + c.dp_comm_s - c.dp_exposed_s)
            assert c.pytrain_step_s > c.step_s
        else:
            assert c.pytrain_step_s == c.step_s
    assert {c.runs_with_pytrain for c in configs} == {True, False}
    ddp = plan(**SMALL, cluster=get_cluster("8xH100-400G"), zero_stages=(0,))[0]
    assert (ddp.dp, ddp.zero_stage, ddp.support) == (8, 0, "DDPTrainer")


def test_zero3_sends_one_and_a_half_times_the_bytes_and_shards_everything():
    configs = plan(7e9, 32, 4096, 4096, 512, get_cluster("8xH100-400G", nodes=8))
    by_layout = {(c.dp, c.pp, c.tp, c.micro_batch, c.recompute, c.zero_stage, c.compression): c for c in configs}
    pairs = [(c, by_layout.get((c.dp, c.pp, c.tp, c.micro_batch, c.recompute, 1, c.compression)))
             for c in configs if c.zero_stage == 3]
    pairs = [(z3, z1) for z3, z1 in pairs if z1 is not None]
    assert pairs
    for z3, z1 in pairs:
        assert z3.dp_comm_s == pytest.approx(1.5 * z1.dp_comm_s, rel=1e-2)  # the buckets' latency does not scale
        assert z3.memory.params == pytest.approx(z1.memory.params / z3.dp)
        assert z3.memory.grads == pytest.approx(z1.memory.grads / z3.dp)
        assert z3.memory.optimizer == pytest.approx(z1.memory.optimizer)
    assert configs[0].support == "FSDPTrainer"  # fastest, and of the equally fast the one pytrain runs


def test_reprs_are_short_and_informative():
    big = ddp_step(int(7e9), compute_s=1.0, world_size=64, link=get_cluster("8xH100-400G").inter)
    assert len(big.buckets) > 1000
    text = repr(big)
    assert len(text) < 250 and f"{len(big.buckets)} buckets of 1-25 MiB" in text and "exposed comm" in text
    best = plan(7e9, 32, 4096, 4096, 512, get_cluster("8xH100-400G", nodes=8))[0]
    text = repr(best)
    assert len(text) < 250 and best.describe() in text and "GiB/device" in text and best.support in text


def test_cli_states_its_assumptions_and_marks(capsys):
    assert main(["--nodes", "8", "--top", "40"], command="plan") == 0
    out = capsys.readouterr().out
    assert "989 TFLOP/s" in out and "utilisation 40% of peak (preset: " in out and "Dubey et al. 2024" in out
    assert "80 GiB per device (vendor capacity), 78 GiB usable" in out
    assert "| PipelineTrainer (DP all-reduce after the schedule: +0.125 s) |" in out
    assert "| model only: ZeRO-1 not in pytrain's trainers yet |" in out
    assert main(["--nodes", "8", "--pytrain-only", "--utilisation", "0.3"], command="plan") == 0
    out = capsys.readouterr().out
    assert "model only:" not in out.split("| pytrain |")[1] and "30% of peak (given with --utilisation)" in out


@pytest.mark.parametrize("command", ["cost", "plan"])
def test_cli_help_is_plain_text(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"], command=command)
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "``" not in out and f"pytrain {command}" in out
    assert "(default: 8xH100-400G)" in out and "(default: 32)" in out
