"""``pytrain cost`` and ``pytrain plan``: the cost model of a described transformer on a described cluster.

    pytrain cost --params 7e9 --layers 32 --hidden 4096 --seq 4096 --batch 512 --cluster 8xH100-400G \\
                 --nodes 4 --dp 16 --pp 2 --tp 1 --micro-batch 1
        one configuration: step time and its parts, bubble, memory per device by kind
    pytrain plan --params 7e9 --layers 32 --hidden 4096 --seq 4096 --batch 512 --cluster 8xH100-400G --nodes 4
        every valid configuration that fits, ranked by predicted step time (--top N rows)
    pytrain cost --collective 25e6 --cluster 8xH100-400G --nodes 4
        the collectives' alpha-beta times for one message size on the cluster's links
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import collectives
from .clusters import PRESETS, get_cluster
from .plan import PlanConfig, plan

GIB = 2**30


def _parser(command: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"pytrain {command}", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default="8xH100-400G", choices=sorted(PRESETS), help="cluster preset (one node type)")
    ap.add_argument("--nodes", type=int, default=1, help="number of nodes")
    ap.add_argument("--params", type=float, default=7e9, help="model parameters")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=None, help="attention heads (default hidden / 128)")
    ap.add_argument("--seq", type=int, default=4096, help="sequence length (tokens)")
    ap.add_argument("--batch", type=int, default=512, help="global batch (sequences per step)")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "lamb", "lars", "sgd_momentum", "sgd"))
    ap.add_argument("--state-dtype", default="fp32", choices=("fp32", "bf16", "int8"), help="optimizer state storage")
    if command == "plan":
        ap.add_argument("--top", type=int, default=10, help="rows to print")
    else:
        ap.add_argument("--dp", type=int, help="data-parallel degree (default: the best plan's)")
        ap.add_argument("--pp", type=int, help="pipeline stages")
        ap.add_argument("--tp", type=int, help="tensor-parallel degree")
        ap.add_argument("--micro-batch", type=int, help="micro-batch size")
        ap.add_argument("--collective", type=float, help="print collective times for this many bytes instead")
    return ap


def _row(c: PlanConfig) -> str:
    return (f"| {c.dp} | {c.pp} | {c.tp} | {c.micro_batch} | {c.microbatches} | {c.recompute} | {c.zero_stage} | "
            f"{c.compression:g} | {c.step_s:.3f} | {c.tokens_per_s:,.0f} | {c.bubble:.1%} | "
            f"{c.memory.total / GIB:.1f} |")


HEADER = ("| dp | pp | tp | micro-batch | micro-batches | recompute | ZeRO | compression | step s | tokens/s | bubble "
          "| GiB/device |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


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
    fits = "fits" if mem.total <= cluster.memory_bytes else "DOES NOT FIT"
    return "\n".join([
        f"{c.describe()} on {cluster.name} x {cluster.nodes} nodes", "",
        f"step time            {c.step_s:.4f} s   ({c.tokens_per_s:,.0f} tokens/s)",
        f"  compute (+bubble)  {c.compute_s:.4f} s   bubble {c.bubble:.1%}",
        f"  tensor parallel    {c.tp_comm_s:.4f} s",
        f"  pipeline p2p       {c.pp_comm_s:.4f} s",
        f"  data parallel      {c.dp_exposed_s:.4f} s exposed",
        f"memory per device    {mem.total / GIB:.2f} GiB of {cluster.memory_bytes / GIB:.0f} ({fits})",
        f"  params {mem.params / GIB:.2f}  grads {mem.grads / GIB:.2f}  optimizer {mem.optimizer / GIB:.2f}  "
        f"activations {mem.activations / GIB:.2f} GiB"])


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
        cluster = get_cluster(args.cluster, args.nodes)
        if command == "cost" and args.collective is not None:
            print(_collectives(args.collective, cluster))
            return 0
        configs = plan(args.params, args.layers, args.hidden, args.seq, args.batch, cluster, heads=args.heads,
                       optimizer=args.optimizer, state_dtype=args.state_dtype, include_oom=command == "cost")
    except ValueError as exc:
        print(f"pytrain {command}: {exc}")
        return 2
    if command == "plan":
        fitting = configs[:args.top]
        print(f"{len(configs)} configurations fit; the {len(fitting)} fastest:\n\n{HEADER}")
        print("\n".join(_row(c) for c in fitting) if fitting else "(none fits in device memory)")
        return 0
    chosen = [c for c in configs if all(want is None or want == got for want, got in
              ((args.dp, c.dp), (args.pp, c.pp), (args.tp, c.tp), (args.micro_batch, c.micro_batch)))]
    if not chosen:
        print(f"pytrain cost: no valid configuration with dp={args.dp} pp={args.pp} tp={args.tp} "
              f"micro_batch={args.micro_batch} on {cluster.devices} devices")
        return 2
    print(_detail(chosen[0], cluster))
    return 0
