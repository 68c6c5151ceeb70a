"""Bad inputs for pytrain.cost (collectives, DDP, pipeline, memory, tensor parallel, plan) and the command line
(``pytrain train`` / ``cost`` / ``plan`` flags).

The cost models are pure Python and run in the test process, except the calls that loop over a count derived
from their input (bucket lists of a huge or infinite byte count), which run in a worker under the hang and
memory limits.  Command-line cases run ``pytrain.cli.main`` (or ``TrainConfig.from_args`` where an accepted
flag would start training) in a worker: a bad flag must end in exit status 2 with a message naming the flag.
One case runs the real ``python -m pytrain`` entry point.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
from typing import List

from pytrain.testing.robustness import Case, Raises

NAN, INF = math.nan, math.inf


def cost(fn_name: str, *args, **kw):
    def run():
        import pytrain.cost as cost_mod
        return getattr(cost_mod, fn_name)(*args, **kw)
    return run


def link():
    from pytrain.cost import Link
    return Link(1e-6, 1e-10)


def with_link(fn_name: str, *args, **kw):
    """``fn_name(*args, link=Link(...))``, the link built inside the call (tables are built before imports)."""
    def run():
        import pytrain.cost as cost_mod
        return getattr(cost_mod, fn_name)(*args, link(), **kw)
    return run


def plan_call(**change):
    def run():
        from pytrain.cost import get_cluster, plan
        kw = dict(model_params=1e9, layers=8, hidden=1024, seq=512, global_batch=64,
                  cluster=get_cluster("8xH100-400G", 1))
        kw.update(change)
        return plan(**kw)
    return run


def local(family: str, name: str, run, expect) -> Case:
    return Case(family, name, run, expect, isolate=False)


def cost_cases() -> List[Case]:
    out: List[Case] = []
    fam = "cost.collectives"
    for field in ("alpha", "beta"):
        for vname, value in (("negative", -1.0), ("nan", NAN), ("inf", INF), ("str", "x"), ("none", None)):
            kw = {"alpha": 1e-6, "beta": 1e-10, field: value}
            out.append(local(fam, f"Link_{field}_{vname}", cost("Link", **kw), Raises(ValueError, f"Link.{field}")))
    for vname, value in (("zero", 0.0), ("negative", -1.0), ("nan", NAN)):
        out.append(local(fam, f"from_bandwidth_{vname}", lambda v=value: __import__("pytrain").cost.Link.
                         from_bandwidth(1e-6, v), Raises(ValueError, "bandwidth")))
    for fn in ("ring_allreduce", "reduce_scatter", "all_gather", "rabenseifner_allreduce", "tree_allreduce",
               "all_to_all"):
        for vname, value in (("negative", -1.0), ("nan", NAN), ("inf", INF)):
            out.append(local(fam, f"{fn}_n_bytes_{vname}", with_link(fn, value, 4), Raises(ValueError, "n_bytes")))
        for vname, value in (("zero", 0), ("float", 1.5), ("bool", True)):
            out.append(local(fam, f"{fn}_p_{vname}", with_link(fn, 1e6, value), Raises(ValueError, r"\bp\b")))
        out.append(local(fam, f"{fn}_link_none", cost(fn, 1e6, 4, None), Raises(TypeError, "link")))
    out.append(local(fam, "hierarchical_gpus_zero", lambda: __import__("pytrain").cost.hierarchical_allreduce(
        1e6, 0, 2, link(), link()), Raises(ValueError, r"\bp\b|gpus_per_node")))
    out.append(local(fam, "bytes_sent_unknown_op", cost("bytes_sent", "nope", 1e6, 4), Raises(ValueError, "nope")))
    out.append(local(fam, "busbw_unknown_op", cost("busbw", 1e6, 1e-3, 4, "nope"), Raises(ValueError, "nope")))
    out.append(local(fam, "busbw_p_zero", cost("busbw", 1e6, 1e-3, 0), Raises(ValueError, r"\bp\b")))
    for vname, value in (("zero", 0.0), ("negative", -1.0), ("nan", NAN)):
        out.append(local(fam, f"algbw_seconds_{vname}", cost("algbw", 1e6, value), Raises(ValueError, "seconds")))
    fam = "cost.clusters"
    out.append(local(fam, "unknown_preset", cost("get_cluster", "nope"), Raises(ValueError, "nope")))
    for vname, value in (("zero", 0), ("negative", -1), ("float", 1.5), ("bool", True)):
        out.append(local(fam, f"nodes_{vname}", cost("get_cluster", "8xH100-400G", value), Raises(ValueError, "nodes")))
    fam = "cost.plan"
    for field in ("layers", "hidden", "seq", "global_batch"):
        for vname, value in (("zero", 0), ("negative", -2), ("float", 2.5), ("bool", True)):
            out.append(local(fam, f"{field}_{vname}", plan_call(**{field: value}), Raises(ValueError, field)))
    for vname, value in (("zero", 0), ("negative", -8)):
        out.append(local(fam, f"heads_{vname}", plan_call(heads=value), Raises(ValueError, "heads")))
    for vname, value in (("zero", 0.0), ("negative", -1.0), ("nan", NAN), ("inf", INF)):
        out.append(local(fam, f"model_params_{vname}", plan_call(model_params=value), Raises(ValueError, "model_params")))
    out.append(local(fam, "cluster_str", plan_call(cluster="8xH100-400G"), Raises(TypeError, "cluster")))
    for field, value, word in (("micro_batches", (0,), "micro_batch"), ("micro_batches", (-2,), "micro_batch"),
                               ("micro_batches", (), "micro_batch"), ("recompute", ("bogus",), "recompute"),
                               ("zero_stages", (5,), "zero"), ("compression", (0.0,), "compression"),
                               ("compression", (2.0,), "compression"), ("optimizer", "nope", "optimizer"),
                               ("state_dtype", "nope", "state_dtype")):
        label = f"{field}_{'_'.join(map(str, value)) if isinstance(value, tuple) else value}" or field
        out.append(local(fam, label.replace(".", "_").replace("-", "neg"), plan_call(**{field: value}),
                         Raises(ValueError, word)))
    out.append(local(fam, "nothing_valid", plan_call(global_batch=3, layers=7, hidden=1001, heads=7),
                     Raises(ValueError, "no valid layout")))
    out.append(local(fam, "training_flops_negative", cost("training_flops", -1e9, 8, 1024, 512, 64),
                     Raises(ValueError, "n_params")))
    fam = "cost.pipeline"
    for fn in ("bubble_fraction", "inflight_microbatches"):
        out.append(local(fam, f"{fn}_stages_zero", cost(fn, 0, 8), Raises(ValueError, "stages")))
        out.append(local(fam, f"{fn}_microbatches_float", cost(fn, 4, 8.0), Raises(ValueError, "microbatches")))
        out.append(local(fam, f"{fn}_schedule_unknown", cost(fn, 4, 8, "zigzag"), Raises(ValueError, "schedule")))
        out.append(local(fam, f"{fn}_virtual_without_interleaved", cost(fn, 4, 8, "1f1b", 2),
                         Raises(ValueError, "virtual_stages")))
    out.append(local(fam, "bubble_relative_to_unknown", cost("bubble_fraction", 4, 8, relative_to="x"),
                     Raises(ValueError, "relative_to")))
    out.append(local(fam, "p2p_bytes_seq_zero", cost("p2p_bytes", 0, 1, 1024), Raises(ValueError, "seq")))
    for vname, times in (("empty", []), ("negative", [1.0, -1.0]), ("nan", [1.0, NAN]), ("inf", [1.0, INF]),
                         ("all_zero", [0.0, 0.0])):
        out.append(local(fam, f"load_balance_{vname}", cost("load_balance", times), Raises(ValueError, "stage_times")))
        out.append(local(fam, f"pipeline_step_{vname}", cost("pipeline_step", times, 4),
                         Raises(ValueError, "stage_times")))
    out.append(local(fam, "pipeline_step_p2p_negative", cost("pipeline_step", [1.0, 1.0], 4, p2p_s=-1.0),
                     Raises(ValueError, "p2p_s")))
    fam = "cost.tensor_parallel"
    out.append(local(fam, "tp_zero", lambda: __import__("pytrain").cost.tp_layer_comm(512, 1, 1024, 0, link()),
                     Raises(ValueError, r"\bp\b|tp")))
    out.append(local(fam, "link_none", cost("tp_layer_comm", 512, 1, 1024, 2, None), Raises(TypeError, "link")))
    out.append(local(fam, "bytes_hidden_negative", cost("tp_layer_bytes", 512, 1, -4), Raises(ValueError, "hidden")))
    fam = "cost.ddp"

    def ddp(**change):
        def run():
            import pytrain.cost as cost_mod
            kw = dict(n_params=10**8, compute_s=0.1, world_size=8, link=link())
            kw.update(change)
            return cost_mod.ddp_step(**kw)
        return run
    for field, value in (("n_params", -1), ("n_params", 1.5), ("world_size", 0), ("compute_s", -1.0),
                         ("compute_s", NAN), ("compression_ratio", 0.0), ("compression_ratio", 1.5),
                         ("backward_fraction", 2.0), ("bucket_bytes", 0), ("bucket_bytes", NAN)):
        word = "times|compute_s" if field == "compute_s" else field.split("_")[0]
        label = f"{field}_{value}".replace(".", "_").replace("-", "neg")
        out.append(local(fam, label, ddp(**{field: value}), Raises(ValueError, word)))
    out.append(local(fam, "link_none", ddp(link=None), Raises(TypeError, "link")))
    # loops over a count derived from the input: isolated, under the hang and memory limits
    for vname, value in (("inf", INF), ("1e30", 1e30)):
        out.append(Case(fam, f"bucket_sizes_n_bytes_{vname}", cost("bucket_sizes", value),
                        Raises(ValueError, "n_bytes")))
        out.append(Case(fam, f"ddp_step_n_params_{vname}", ddp(n_params=value), Raises(ValueError, "n_params")))
    out.append(local(fam, "bucket_sizes_nan", cost("bucket_sizes", NAN), Raises(ValueError, "n_bytes")))
    fam = "cost.memory"
    out.append(local(fam, "optimizer_unknown", cost("optimizer_state_bytes", 10**6, "nope"),
                     Raises(ValueError, "optimizer")))
    out.append(local(fam, "state_dtype_unknown", cost("optimizer_state_bytes", 10**6, "adamw", "fp4"),
                     Raises(ValueError, "state_dtype")))
    out.append(local(fam, "n_params_negative", cost("optimizer_state_bytes", -1), Raises(ValueError, "n_params")))
    out.append(local(fam, "zero_stage_4", cost("memory_per_device", 10**6, zero_stage=4),
                     Raises(ValueError, "zero_stage")))
    out.append(local(fam, "dp_zero", cost("memory_per_device", 10**6, dp=0), Raises(ValueError, r"\bdp\b")))
    out.append(local(fam, "param_bytes_zero", cost("memory_per_device", 10**6, param_bytes=0),
                     Raises(ValueError, "param_bytes")))
    out.append(local(fam, "activation_heads_not_dividing", cost("activation_memory", 512, 1, 10, 3),
                     Raises(ValueError, "heads")))
    out.append(local(fam, "activation_recompute_unknown", cost("activation_memory", 512, 1, 1024, 8, recompute="x"),
                     Raises(ValueError, "recompute")))
    out.append(local(fam, "activation_seq_zero", cost("activation_memory", 0, 1, 1024, 8), Raises(ValueError, "seq")))
    out.append(local(fam, "activation_tp_not_dividing_heads", cost("activation_memory", 512, 1, 1024, 8, tp=3),
                     Raises(ValueError, r"\btp\b")))
    out.append(local(fam, "activation_vocab_negative", cost("activation_memory", 512, 1, 1024, 8, vocab=-1),
                     Raises(ValueError, "vocab")))
    out.append(local(fam, "activation_peak_recompute_unknown", cost("activation_peak", 512, 1, 1024, 8, recompute="x"),
                     Raises(ValueError, "recompute")))
    out.append(local(fam, "ddp_buckets_with_zero", cost("memory_per_device", 10**6, zero_stage=2, dp=2,
                                                        ddp_buckets=True), Raises(ValueError, "ddp_buckets")))
    out.append(local(fam, "fit_link_one_rank", cost("fit_link", [1, 2], [1e-3, 2e-3], 1), Raises(ValueError, "rank")))
    out.append(local(fam, "fit_link_no_points", cost("fit_link", [], [], 2), Raises(ValueError, "size|point")))
    return out


# ================================================================ command line
class CliError(Exception):
    """A command that ended with a non-zero status: ``exit N: <its stdout and stderr>``."""


def cli(argv: List[str], parse_only: bool = False):
    """``pytrain <argv>`` in this process (``parse_only``: only ``pytrain train``'s flag parsing, for flags that,
    accepted, would start training).  Raises CliError unless the command succeeds."""
    def run():
        from pytrain.cli import main
        from pytrain.train import TrainConfig
        text = io.StringIO()
        with contextlib.redirect_stderr(text), contextlib.redirect_stdout(text):
            try:
                status = (TrainConfig.from_args(argv[1:]) and 0) if parse_only else main(argv)
            except SystemExit as e:
                status = e.code
        if status not in (0, None):
            raise CliError(f"exit {status}: {' '.join(text.getvalue().split())}")
        return f"exit 0: {' '.join(text.getvalue().split())[-200:]}"
    return run


def usage(flag: str) -> Raises:
    return Raises(CliError, rf"^exit 2: .*{flag}")


def cli_cases() -> List[Case]:
    fam = "cli"
    out = [
        Case(fam, "unknown_command", cli(["nope"]), usage("unknown command")),
        Case(fam, "train_steps_negative", cli(["train", "--steps", "-1"]), usage("--steps")),
        Case(fam, "train_steps_zero", cli(["train", "--steps", "0"]), usage("--steps")),
        Case(fam, "train_steps_float", cli(["train", "--steps", "1.5"]), usage("--steps")),
        Case(fam, "train_nproc_zero", cli(["train", "--nproc", "0"]), usage("--nproc")),
        Case(fam, "train_grad_accum_zero", cli(["train", "--grad-accum", "0"]), usage("--grad-accum")),
        Case(fam, "train_batch_indivisible", cli(["train", "--batch", "7"]), usage("--batch")),
        Case(fam, "train_heads_indivisible", cli(["train", "--hidden", "100", "--heads", "3"]), usage("--hidden")),
        Case(fam, "train_lr_str", cli(["train", "--lr", "abc"]), usage("--lr")),
        Case(fam, "train_hook_unknown", cli(["train", "--hook", "nope"]), usage("--hook")),
        Case(fam, "train_optimizer_unknown", cli(["train", "--optimizer", "sgd"]), usage("--optimizer")),
        Case(fam, "train_resume_without_dir", cli(["train", "--resume"]), usage("--resume")),
        Case(fam, "train_unknown_flag", cli(["train", "--bogus"]), usage("--bogus")),
        Case(fam, "train_shard_unknown", cli(["train", "--shard", "zero3"]), usage("--shard")),
        Case(fam, "train_shard_fsdp_with_hook", cli(["train", "--shard", "fsdp", "--hook", "topk"]), usage("--hook")),
        Case(fam, "train_shard_fsdp_fp16", cli(["train", "--shard", "fsdp", "--precision", "fp16"]),
             usage("--precision")),
        Case(fam, "train_no_reshard_without_fsdp", cli(["train", "--no-reshard-after-forward"]),
             usage("--no-reshard-after-forward")),
        Case(fam, "train_tp_without_fsdp", cli(["train", "--tp", "2"]), usage("--tp")),
        Case(fam, "train_tp_not_dividing_heads", cli(["train", "--shard", "fsdp", "--tp", "4", "--nproc", "4",
                                                      "--heads", "6"]), usage("--tp")),
        Case(fam, "train_dropout_one", cli(["train", "--dropout", "1"]), usage("--dropout")),
    ]
    for flag, value in (("--checkpoint-every", "-1"), ("--checkpoint-every", "0"), ("--keep-last", "0"),
                        ("--eval-every", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--weight-decay", "-1"),
                        ("--max-grad-norm", "0"), ("--warmup", "-1"), ("--patience", "0"), ("--layers", "0"),
                        ("--seq", "0"), ("--batch", "0"), ("--tp", "0"), ("--dropout", "-0.5")):
        out.append(Case(fam, f"train{flag.replace('-', '_')}_{value.replace('-', 'neg')}",
                        cli(["train", flag, value], parse_only=True), usage(flag)))
    for cmd in ("cost", "plan"):
        out += [
            Case(fam, f"{cmd}_nodes_zero", cli([cmd, "--nodes", "0"]), usage("nodes")),
            Case(fam, f"{cmd}_params_negative", cli([cmd, "--params", "-1"]), usage("params")),
            Case(fam, f"{cmd}_batch_zero", cli([cmd, "--batch", "0"]), usage("batch")),
            Case(fam, f"{cmd}_layers_str", cli([cmd, "--layers", "x"]), usage("--layers")),
            Case(fam, f"{cmd}_cluster_unknown", cli([cmd, "--cluster", "nope"]), usage("--cluster")),
        ]
    out.append(Case(fam, "plan_top_negative", cli(["plan", "--top", "-1"]), usage("--top")))
    out.append(Case(fam, "cost_tp_zero", cli(["cost", "--tp", "0"]), usage("tp")))

    def entry_point():
        """The installed entry point, end to end: ``python -m pytrain train --steps -1``."""
        proc = subprocess.run([sys.executable, "-m", "pytrain", "train", "--steps", "-1"], capture_output=True,
                              text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            raise CliError(f"exit {proc.returncode}: {' '.join((proc.stdout + proc.stderr).split())}")
        return "exit 0"
    out.append(Case(fam, "python_m_pytrain_steps_negative", entry_point, usage("--steps"), isolate=False))
    return out


def cases() -> List[Case]:
    return cost_cases() + cli_cases()

