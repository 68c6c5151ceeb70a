"""pytrain cost and pytrain plan: the cost model of a described transformer on a described cluster.

    pytrain cost --params 7e9 --layers 32 --hidden 4096 --seq 4096 --batch 512 --cluster 8xH100-400G \\
                 --nodes 4 --dp 16 --pp 2 --tp 1 --micro-batch 1
        one configuration: step time and its parts, bubble, memory per device by kind
    pytrain plan --params 7e9 --layers 32 --hidden 4096 --seq 4096 --batch 512 --cluster 8xH100-400G --nodes 4
        every valid configuration that fits, ranked by predicted step time (--top N rows)
    pytrain plan --link 1gbit --params 25e6 --hidden 2048 --compute-s 0.05 --nodes 2
        data parallel over a link of that rate: each DDP comm hook's predicted step, the fastest recommended
        (codec times measured on a 2-core CPU, pytrain.cost.hooks; link efficiency from emulated links)
    pytrain cost --collective 25e6 --cluster 8xH100-400G --nodes 4
        the collectives' alpha-beta times for one message size on the cluster's links

Every output states its assumptions: the cluster's peak FLOP/s, the utilisation and its source (a
per-GPU preset, or --utilisation measured on your machine), the device memory (the vendor's figure in
GiB, less a reserve), and for each configuration whether pytrain's trainers run it or it is a model only.
"""
# The module docstring above is the --help text: plain text, no reStructuredText markup.
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import collectives
from ._checks import real
from .clusters import PRESETS, Cluster, Utilisation, get_cluster
from .hooks import hook_steps, link_for_rate
from .plan import PlanConfig, plan, training_flops

GIB = 2**30


def _count(text: str) -> int:
    """argparse type of a count flag: an int >= 1 (argparse names the flag in its usage error, exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}")
    return value


def _parser(command: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"pytrain {command}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default="8xH100-400G", choices=sorted(PRESETS),
                    help="cluster preset, one node type (default: %(default)s)")
    ap.add_argument("--nodes", type=_count, default=1, help="number of nodes (default: %(default)s)")
    ap.add_argument("--utilisation", type=float, default=None,
                    help="fraction of peak FLOP/s a step reaches, e.g. measured on your machine "
                         "(default: the GPU's preset, with its source)")
    ap.add_argument("--params", type=float, default=7e9, help="model parameters (default: %(default)g)")
    ap.add_argument("--layers", type=_count, default=32, help="transformer layers (default: %(default)s)")
    ap.add_argument("--hidden", type=_count, default=4096, help="hidden size (default: %(default)s)")
    ap.add_argument("--heads", type=_count, default=None, help="attention heads (default: hidden / 128)")
    ap.add_argument("--seq", type=_count, default=4096, help="sequence length in tokens (default: %(default)s)")
    ap.add_argument("--batch", type=_count, default=512, help="global batch in sequences per step (default: %(default)s)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "lamb", "lars", "sgd_momentum", "sgd"),
                    help="optimizer, for its state memory (default: %(default)s)")
    ap.add_argument("--state-dtype", default="fp32", choices=("fp32", "bf16", "int8"),
                    help="optimizer state storage (default: %(default)s)")
    if command == "plan":
        ap.add_argument("--top", type=_count, default=10, help="rows to print (default: %(default)s)")
        ap.add_argument("--pytrain-only", action="store_true",
                        help="only configurations pytrain's trainers run today (default: all, each marked)")
        ap.add_argument("--link", default=None,
                        help="rank the DDP comm hooks for data parallel over a link of this rate instead, one rank "
                             "per node (e.g. 1gbit, 500mbit; default: off)")
        ap.add_argument("--compute-s", type=float, default=None,
                        help="with --link: a step's forward + backward + update seconds without communication "
                             "(default: from the cluster's FLOP/s, --seq and --batch)")
    else:
        ap.add_argument("--dp", type=_count, help="data-parallel degree (default: the fastest configuration's)")
        ap.add_argument("--pp", type=_count, help="pipeline stages (default: the fastest configuration's)")
        ap.add_argument("--tp", type=_count, help="tensor-parallel degree (default: the fastest configuration's)")
        ap.add_argument("--micro-batch", type=_count, help="micro-batch size (default: the fastest configuration's)")
        ap.add_argument("--collective", type=float,
                        help="print the collectives' times for this many bytes instead (default: off)")
    return ap


def _row(c: PlanConfig) -> str:
    return (f"| {c.dp} | {c.pp} | {c.tp} | {c.micro_batch} | {c.microbatches} | {c.recompute} | {c.zero_stage} | "
            f"{c.compression:g} | {c.step_s:.3f} | {c.tokens_per_s:,.0f} | {c.bubble:.1%} | "
            f"{c.memory.total / GIB:.1f} | {c.support} |")


HEADER = ("| dp | pp | tp | micro-batch | micro-batches | recompute | ZeRO | compression | step s | tokens/s | bubble "
          "| GiB/device | pytrain |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def assumptions(cluster: Cluster) -> str:
    """The numbers every prediction rests on, with their sources (printed above each output)."""
    return "\n".join([
        f"cluster      {cluster.name} x {cluster.nodes} nodes = {cluster.devices} devices",
        f"compute      {cluster.flops / 1e12:.0f} TFLOP/s peak per device (bf16 dense, vendor datasheet) x "
        f"utilisation {cluster.utilisation}",
        f"memory       {cluster.memory_bytes / GIB:.0f} GiB per device (vendor capacity), "
        f"{cluster.usable_bytes / GIB:.0f} GiB usable ({cluster.reserve_bytes / GIB:.0f} GiB reserved for the "
        f"CUDA context, driver and allocator)",
        f"links        intra-node {1 / cluster.intra.beta / 1e9:.0f} GB/s, alpha {cluster.intra.alpha * 1e6:.0f} us; "
        f"inter-node {1 / cluster.inter.beta / 1e9:.0f} GB/s per device, alpha {cluster.inter.alpha * 1e6:.0f} us",
        "model        bf16 params, grads and activations, fp32 master weights, flash attention; 1F1B pipelines; "
        "DDP buckets overlapped with the backward; ZeRO-3 (FSDP) sends 1.5x DDP's bytes",
        "pytrain      'DDPTrainer' / 'PipelineTrainer' / 'FSDPTrainer' (ZeRO-3, x tensor parallel on a 2-D mesh): "
        "runs with pytrain today; 'model only': ZeRO-1/2, tensor parallel without ZeRO-3 and sharded pipelines are "
        "not in pytrain's trainers yet"])


def _collectives(n_bytes: float, cluster) -> str:
    g, n = cluster.gpus_per_node, cluster.nodes
    lines = [f"{n_bytes:.3g} bytes on {cluster.name} x {n} nodes ({cluster.devices} devices)", "",
             "| collective | ranks | link | seconds |", "|---|---|---|---|"]
    for name in ("ring_allreduce", "tree_allreduce", "rabenseifner_allreduce", "reduce_scatter", "all_gather",
                 "all_to_all"):
        fn = getattr(collectives, name)
        lines.append(f"| {name} | {g} | intra | {fn(n_bytes, g, cluster.intra):.3e} |")
        if n > 1:
            lines.append(f"| {name} | {cluster.devices} | inter | {fn(n_bytes, cluster.devices, cluster.inter):.3e} |")
    if n > 1:
        t = collectives.hierarchical_allreduce(n_bytes, g, n, cluster.intra, cluster.inter)
        lines.append(f"| hierarchical_allreduce | {cluster.devices} | intra + inter | {t:.3e} |")
    return "\n".join(lines)


def _detail(c: PlanConfig, cluster) -> str:
    mem = c.memory
    fits = "fits" if mem.total <= cluster.usable_bytes else "DOES NOT FIT"
    return "\n".join([
        f"{c.describe()} on {cluster.name} x {cluster.nodes} nodes", f"pytrain              {c.support}", "",
        f"step time            {c.step_s:.4f} s   ({c.tokens_per_s:,.0f} tokens/s)",
        f"  compute (+bubble)  {c.compute_s:.4f} s   bubble {c.bubble:.1%}",
        f"  tensor parallel    {c.tp_comm_s:.4f} s",
        f"  pipeline p2p       {c.pp_comm_s:.4f} s",
        f"  data parallel      {c.dp_exposed_s:.4f} s exposed",
        f"memory per device    {mem.total / GIB:.2f} GiB of {cluster.usable_bytes / GIB:.0f} usable ({fits})",
        f"  params {mem.params / GIB:.2f}  grads {mem.grads / GIB:.2f}  optimizer {mem.optimizer / GIB:.2f}  "
        f"activations {mem.activations / GIB:.2f} GiB"])


def _hook_table(args, cluster: Cluster) -> str:
    """``pytrain plan --link RATE``: every hook's predicted DDP step over the link, fastest first."""
    rate = collectives.parse_rate(args.link)
    world = max(2, args.nodes)
    compute = args.compute_s
    if compute is None:
        compute = training_flops(args.params, args.layers, args.hidden, args.seq, args.batch) / world / cluster.rate
    compute = real("--compute-s", compute, strict=True, unit="s")
    link = link_for_rate(rate)
    estimates = hook_steps(int(args.params), args.hidden, compute, link, world)
    plain = next(e for e in estimates if e.hook == "plain")
    lines = [f"data parallel on {world} ranks over a {collectives.format_rate(rate)} link ({link}); "
             f"{args.params:g} params, square weights of width {args.hidden}; compute {compute:.4g} s per step",
             "codec times: pytrain.cost.hooks.CODEC_S_PER_PARAM (measured on an idle 2-core CPU, one thread "
             "per rank: a GPU codes far faster)", "",
             "| hook | predicted step s | x plain | comm s | codec s | bytes vs fp32 |", "|---|---|---|---|---|---|"]
    lines += [f"| {e.hook} | {e.step_s:.4g} | {e.step_s / plain.step_s:.2f}x | {e.comm_s:.4g} | {e.codec_s:.4g} | "
              f"{e.compression_ratio:.4g} |" for e in estimates]
    best = estimates[0]
    advice = ("plain all-reduce: no hook pays here" if best.hook == "plain" else
              f"{best.hook} ({best.step_s / plain.step_s:.2f}x the plain step)")
    return "\n".join(lines + ["", f"recommended: {advice}"])


def main(argv: Optional[List[str]] = None, command: Optional[str] = None) -> int:
    """Entry point of ``pytrain cost`` and ``pytrain plan``: ``main(["plan", "--nodes", "2"])`` or
    ``main(["--nodes", "2"], command="plan")``; without a command word, ``cost``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is None:
        command = argv.pop(0) if argv and argv[0] in ("cost", "plan") else "cost"
    if command not in ("cost", "plan"):
        raise ValueError(f"command must be 'cost' or 'plan', got {command!r}")
    args = _parser(command).parse_args(argv)
    try:
        utilisation = None if args.utilisation is None else Utilisation(args.utilisation, "given with --utilisation")
        cluster = get_cluster(args.cluster, args.nodes, utilisation)
        if command == "cost" and args.collective is not None:
            print(_collectives(args.collective, cluster))
            return 0
        if command == "plan" and args.link is not None:
            print(_hook_table(args, cluster))
            return 0
        configs = plan(args.params, args.layers, args.hidden, args.seq, args.batch, cluster, heads=args.heads,
                       optimizer=args.optimizer, state_dtype=args.state_dtype, include_oom=command == "cost")
    except ValueError as exc:
        print(f"pytrain {command}: {exc}")
        return 2
    if command == "plan":
        if args.pytrain_only:
            configs = [c for c in configs if c.runs_with_pytrain]
        fitting = configs[:args.top]
        runs = sum(c.runs_with_pytrain for c in configs)
        print(f"{assumptions(cluster)}\n\n{len(configs)} configurations fit ({runs} run with pytrain today); "
              f"the {len(fitting)} fastest:\n\n{HEADER}")
        print("\n".join(_row(c) for c in fitting) if fitting else "(none fits in device memory)")
        return 0
    chosen = [c for c in configs if all(want is None or want == got for want, got in
              ((args.dp, c.dp), (args.pp, c.pp), (args.tp, c.tp), (args.micro_batch, c.micro_batch)))]
    if not chosen:
        print(f"pytrain cost: no valid configuration with dp={args.dp} pp={args.pp} tp={args.tp} "
              f"micro_batch={args.micro_batch} on {cluster.devices} devices")
        return 2
    print(f"{assumptions(cluster)}\n\n{_detail(chosen[0], cluster)}")
    return 0
