"""The main job: a small GPT-style character LM on the embedded corpus, data parallel on N processes.

``pytrain train`` (or ``python -m pytrain train``, ``make train``) spawns 2 processes that
train with ``DDPTrainer`` (gloo on CPU, NCCL on GPUs), ``FusedAdamW``, flash attention and
a gradient-compression hook (PowerSGD by default), draws a progress bar, and ends with
a summary: loss before and after, tokens/s, bytes communicated against uncompressed,
and the step time predicted by the cost model (calibrated on the run's own process
group) next to the measured one.  Under ``torchrun`` each process runs one rank instead
of spawning.  No downloads: the corpus ships in ``pytrain/data``.

The model: pre-norm decoder-only transformer (causal flash attention + GELU MLP, learned
positions, tied input/output embeddings), sized by ``--size`` (tiny / small / base) or
``--layers/--hidden/--heads/--seq``.

Checkpoints, resume, faults and exit status: see ``EPILOG`` (``pytrain train --help``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from .comm.hooks import HOOK_NAMES
from .cost.collectives import format_rate, parse_rate
from .data import default_corpus
from .ops import flash_attention
from .optim import FusedAdamW, FusedLAMB, FusedLARS
from .trainers.schedules import SCHEDULES

SIZES = {"tiny": dict(layers=2, hidden=128, heads=4, seq=64),
         "small": dict(layers=3, hidden=192, heads=6, seq=64),
         "base": dict(layers=6, hidden=384, heads=6, seq=128)}
HOOKS = (*HOOK_NAMES, "none")  # --hook: pytrain.comm's hook names, or none (DDP's own all-reduce)
EPILOG = """checkpoints and resume:
  --checkpoint-dir DIR     write step-<step>.pt there at the end of the run (and every --checkpoint-every
                           steps; 0 or absent: only at the end), keeping the last --keep-last (--shard fsdp:
                           step-<step>.dcp directories of torch.distributed.checkpoint, which resume on any
                           number of processes); the job owns DIR
                           while it runs (a second job on DIR fails at once, naming the holder's pid)
  --resume                 continue from the latest checkpoint in --checkpoint-dir, which must exist (else
                           exit 2); if it holds no checkpoint yet, start from step 0 (with a note); --steps is
                           the total, counted from step 0.  Every rank must be able to read the checkpoint
                           rank 0 picks (checksum, finite values, same model, optimizer and settings), else
                           every rank stops with an error naming the rank and the cause.
faults:
  --watchdog-timeout S     a rank that makes no progress (or disappears) for S seconds ends the job, every rank
                           naming the rank that failed first (default 120; 0: off)
exit status:
  0  the run finished (a run from step 0 also had to lower the loss: last < first)
  1  the run failed: a rank failed or stalled, a checkpoint could not be read or written, the final loss is
     not finite, or a run from step 0 of at least 2 steps did not lower the loss; the reason is printed
     (a resumed run whose loss did not fall only gets a note: a short stretch need not lower it)
  2  bad flags
"""


def _out_of_bounds(value, meta) -> Optional[str]:
    """Why ``value`` breaks its field's bounds (``_opt``), or None when it keeps them (None values always do)."""
    low = meta["low"]
    if low is None or value is None:
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{meta['note']}, got {value}"
    if value < low or (meta["strict"] and value == low):
        return f"must be {'>' if meta['strict'] else '>='} {low:g}{meta['note']}, got {value}"
    return None


def _opt(default, help: str, *, low: Optional[float] = None, strict: bool = False, kind: Optional[type] = None,
         choices: Optional[List[str]] = None, note: str = "", default_text: Optional[str] = None):
    """A ``TrainConfig`` field that is also a ``pytrain train`` flag: its help text, how its default reads in
    ``--help`` (``default_text``; else the value), its type and choices, and its bounds: values below ``low``
    (at ``low`` too when ``strict``) and non-finite floats are usage errors (``note``: what the bound means)."""
    if default_text is None:
        default_text = ("on" if default else "off") if isinstance(default, bool) else str(default)
    meta = dict(help=help, low=low, strict=strict, kind=kind or type(default), choices=choices, note=note,
                default_text=default_text)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    size: str = _opt("small", "model size (--layers/--hidden/--heads/--seq override its parts)", choices=list(SIZES))
    layers: Optional[int] = _opt(None, "transformer blocks", kind=int, low=1, default_text="from --size")
    hidden: Optional[int] = _opt(None, "model width", kind=int, low=1, default_text="from --size")
    heads: Optional[int] = _opt(None, "attention heads (must divide --hidden)", kind=int, low=1,
                                default_text="from --size")
    seq: Optional[int] = _opt(None, "sequence length in characters", kind=int, low=1, default_text="from --size")
    nproc: int = _opt(2, "processes spawned on this machine (ignored under torchrun)", low=1)
    emulate_link: Optional[str] = _opt(None, "run the --nproc ranks in network namespaces joined by a link of this "
                                             "rate, e.g. 1gbit or 500mbit (root and iproute2's tc; "
                                             "pytrain.trainers.emulated_link)", kind=str,
                                       default_text="off: loopback")
    steps: int = _opt(200, "optimizer steps in all, counted from step 0 (a resumed run does the rest)", low=1)
    batch: int = _opt(32, "global batch: sequences per optimizer step over all ranks (a multiple of processes x "
                          "--grad-accum)", low=1)
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step", low=1)
    lr: float = _opt(3e-3, "peak learning rate", low=0.0)
    schedule: str = _opt("cosine", "learning-rate schedule (pytrain.trainers.schedules)", choices=list(SCHEDULES))
    warmup: Optional[int] = _opt(None, "learning-rate warmup steps", kind=int, low=0,
                                 default_text="10%% of --steps; 0 for plateau")
    weight_decay: float = _opt(0.01, "decoupled weight decay", low=0.0)
    max_grad_norm: Optional[float] = _opt(1.0, "clip the global gradient norm to this", kind=float, low=0.0,
                                          strict=True)
    optimizer: str = _opt("adamw", "optimizer (torch-adamw: torch.optim.AdamW, for comparison)",
                          choices=["adamw", "lamb", "lars", "torch-adamw"])
    state_dtype: str = _opt("float32", "FusedAdamW's moment storage", choices=["float32", "bfloat16", "int8"])
    shard: str = _opt("none", "fsdp: shard parameters, gradients and optimizer states over the processes (FSDP2, "
                              "per transformer block); none: DDP replicas", choices=["none", "fsdp"])
    tp: int = _opt(1, "tensor-parallel degree (with --shard fsdp): attention heads and MLP columns split over "
                      "this many processes; FSDP over the rest (a 2-D mesh)", low=1)
    reshard_after_forward: bool = _opt(True, "with --shard fsdp: free each block's gathered parameters after its "
                                             "forward (gather again for backward)")
    activation_checkpointing: bool = _opt(False, "recompute each block's activations in backward instead of "
                                                 "storing them")
    dropout: float = _opt(0.0, "attention-weight dropout probability (below 1)", low=0.0)
    hook: Optional[str] = _opt(None, "DDP gradient-communication hook (none: DDP's own all-reduce)", kind=str,
                               choices=list(HOOKS), default_text="powersgd; none with --shard fsdp")
    hook_rank: Optional[int] = _opt(None, "PowerSGD's rank (needs --hook powersgd)", kind=int, low=1,
                                    default_text="the hook's own, 4")
    precision: str = _opt("fp32", "fp32, or autocast to bf16 / fp16 (fp16 adds a gradient scaler)",
                          choices=["fp32", "bf16", "fp16"])
    eval_every: int = _opt(50, "validation loss every this many steps", low=1)
    patience: Optional[int] = _opt(None, "stop early after this many evaluations without improvement", kind=int,
                                   low=1, default_text="off")
    checkpoint_dir: Optional[str] = _opt(None, "write checkpoints here (see below)", kind=str, default_text="none")
    checkpoint_every: Optional[int] = _opt(None, "checkpoint every this many steps, and at the end (needs "
                                                 "--checkpoint-dir)", kind=int, low=0, note=" (0: only at the end)",
                                           default_text="only at the end")
    keep_last: int = _opt(3, "checkpoints kept in --checkpoint-dir", low=1)
    resume: bool = _opt(False, "continue from the latest checkpoint in --checkpoint-dir (see below)")
    log_file: Optional[str] = _opt(None, "JSON lines: one record per step and per evaluation", kind=str,
                                   default_text="none")
    tensorboard: Optional[str] = _opt(None, "write TensorBoard event files of the same records to this directory",
                                      kind=str, default_text="none")
    seed: int = _opt(0, "seed of the model's initialisation and the data order")
    progress: bool = _opt(True, "progress bar on rank 0 (only when stderr is a terminal)")
    watchdog_timeout: float = _opt(120.0, "seconds a rank may make no progress before the job ends", low=0.0,
                                   note=" seconds (0: off)")

    @classmethod
    def parser(cls) -> argparse.ArgumentParser:
        """``pytrain train``'s flags, one per field, with their help text and defaults."""
        parser = argparse.ArgumentParser(prog="pytrain train", description=__doc__.splitlines()[0], epilog=EPILOG,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", metavar="FILE", help="JSON object of these settings (keys as the flags, "
                                                             "with _ for -, e.g. from pytrain tune); flags override it")
        for f in fields(cls):
            meta = f.metadata
            flag = f"--{f.name.replace('_', '-')}"
            help_text = f"{meta['help']} (default: {meta['default_text']})"
            if meta["kind"] is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            else:
                parser.add_argument(flag, type=meta["kind"], default=f.default, choices=meta["choices"],
                                    help=help_text)
        return parser

    @classmethod
    def from_args(cls, argv: Optional[List[str]] = None) -> "TrainConfig":
        parser = cls.parser()
        args = vars(parser.parse_args(argv))
        config = args.pop("config")
        if config is not None:
            parser.set_defaults(**_read_config(config, parser))
            args = vars(parser.parse_args(argv))
            args.pop("config")
        cfg = cls(**args)
        for f in fields(cls):
            problem = _out_of_bounds(getattr(cfg, f.name), f.metadata)
            if problem:
                parser.error(f"--{f.name.replace('_', '-')} {problem}")
        for key, value in SIZES[cfg.size].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.warmup is None:
            cfg.warmup = 0 if cfg.schedule == "plateau" else cfg.steps // 10
        if cfg.warmup and cfg.schedule == "plateau":
            parser.error(f"--warmup {cfg.warmup}: the plateau schedule takes no warmup (it follows the validation loss)")
        if cfg.shard == "fsdp":
            if cfg.hook not in (None, "none"):
                parser.error(f"--hook {cfg.hook} is a DDP gradient-communication hook; --shard fsdp reduce-scatters "
                             "gradients itself (leave --hook out, or --hook none)")
            if cfg.precision == "fp16":
                parser.error("--precision fp16 is not supported with --shard fsdp (its gradient scaler is not "
                             "shard-aware); use --precision bf16")
        elif not cfg.reshard_after_forward:
            parser.error("--no-reshard-after-forward needs --shard fsdp")
        elif cfg.tp > 1:
            parser.error(f"--tp {cfg.tp} needs --shard fsdp (data parallelism over the other mesh dim)")
        if cfg.hook is None:
            cfg.hook = "none" if cfg.shard == "fsdp" else "powersgd"
        if cfg.dropout >= 1:
            parser.error(f"--dropout must be below 1, got {cfg.dropout}")
        if cfg.hook_rank is not None and cfg.hook != "powersgd":
            parser.error(f"--hook-rank {cfg.hook_rank} needs --hook powersgd, got --hook {cfg.hook}")
        if cfg.hidden % cfg.heads:
            parser.error(f"--hidden {cfg.hidden} is not divisible by --heads {cfg.heads}")
        if cfg.warmup >= cfg.steps and cfg.schedule not in ("constant", "plateau"):
            parser.error(f"--warmup {cfg.warmup} must be below --steps {cfg.steps} for the {cfg.schedule} schedule")
        held_out = len(default_corpus()) - _train_chars(len(default_corpus()))
        if cfg.seq >= held_out:
            parser.error(f"--seq {cfg.seq} is too long for the corpus: the held-out {held_out} characters need "
                         f"--seq < {held_out}")
        world = int(os.environ.get("WORLD_SIZE", cfg.nproc))
        if world % cfg.tp or cfg.heads % cfg.tp:
            parser.error(f"--tp {cfg.tp} must divide the {world} processes and --heads {cfg.heads}")
        data = world // cfg.tp
        if cfg.batch % (data * cfg.grad_accum):
            what = f"{world} processes" if cfg.tp == 1 else f"{data} data-parallel groups (--tp {cfg.tp})"
            parser.error(f"--batch {cfg.batch} is not divisible by {what} x --grad-accum "
                         f"{cfg.grad_accum} = {data * cfg.grad_accum}")
        if cfg.emulate_link is not None:
            try:
                parse_rate(cfg.emulate_link)
            except ValueError as exc:
                parser.error(f"--emulate-link: {exc}")
            if "WORLD_SIZE" in os.environ or cfg.nproc < 2:
                parser.error(f"--emulate-link joins the processes pytrain train spawns: it needs --nproc >= 2 "
                             f"(got {cfg.nproc}) and no torchrun")
        if cfg.resume and cfg.checkpoint_dir is None:
            parser.error("--resume needs --checkpoint-dir")
        if cfg.resume and "WORLD_SIZE" not in os.environ and not os.path.isdir(cfg.checkpoint_dir):
            # under torchrun rank 0 decides, with the same check, for every rank (node-local disks may differ)
            parser.error(f"--resume: checkpoint directory {cfg.checkpoint_dir} does not exist (nothing to resume; "
                         "without --resume a new run starts there)")
        if cfg.checkpoint_every is not None and cfg.checkpoint_dir is None:  # 0 too: "at the end" of nothing
            parser.error("--checkpoint-every needs --checkpoint-dir")
        return cfg


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """The settings of a ``--config`` file, checked against the fields' kinds and choices (bounds are checked with
    the flags')."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        parser.error(f"--config {path}: cannot read it ({exc.strerror})")
    except json.JSONDecodeError as exc:
        parser.error(f"--config {path}: not JSON ({exc.msg} at line {exc.lineno})")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: expected a JSON object of settings, got {type(data).__name__}")
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        parser.error(f"--config {path}: unknown settings {', '.join(unknown)} (known: {', '.join(known)})")
    for key, value in data.items():
        meta = known[key].metadata
        kind = meta["kind"]
        fits = value is None if kind is not bool else isinstance(value, bool)
        fits = fits or (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or \
            (kind in (int, str) and type(value) is kind)
        if value is None and known[key].default is not None:
            fits = False
        if not fits:
            parser.error(f"--config {path}: {key} must be {kind.__name__}, got {value!r}")
        if meta["choices"] is not None and value not in meta["choices"]:
            parser.error(f"--config {path}: {key} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if kind is float and value is not None:
            data[key] = float(value)
    return data


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden: int, heads: int, dropout: float = 0.0, checkpointing: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.heads, self.dropout, self.checkpointing = heads, dropout, checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing and torch.is_grad_enabled():
            # the recompute restores the RNG state the forward started from (preserve_rng_state), so flash
            # attention draws the same dropout seed, hence the same mask, again
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        # qkv's features are head-major (head, q|k|v, head dim), so a column split (tensor parallelism) gives each
        # rank whole heads: -1 is the heads this rank holds (all, without tensor parallelism)
        q, k, v = self.qkv(self.norm1(x)).view(b, s, -1, 3, h // self.heads).permute(3, 0, 2, 1, 4)
        dropout = self.dropout if self.training else 0.0
        att = flash_attention(q, k, v, causal=True, dropout_p=dropout)  # (b, local heads, s, h/heads)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Character LM: (batch, seq) int64 tokens -> (batch, seq, vocab) logits.  ``dropout``: attention-weight dropout
    in training; ``activation_checkpointing``: each block recomputes its activations in backward
    (``torch.utils.checkpoint``, non-reentrant)."""

    def __init__(self, vocab: int, layers: int, hidden: int, heads: int, seq: int, dropout: float = 0.0,
                 activation_checkpointing: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.zeros(seq, hidden))
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout, activation_checkpointing) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied output: small logits, loss starts near log(vocab)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden): the final normed states, which the tied head ``embed.weight`` maps to logits (a
        fused loss such as ``pytrain.ops.linear_cross_entropy`` takes them and the head without the logits)."""
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hidden_states(tokens) @ self.embed.weight.t()


class CharWindows(torch.utils.data.Dataset):
    """Every window of ``seq + 1`` characters of ``ids``: item i = (ids[i:i+seq], ids[i+1:i+seq+1])."""

    def __init__(self, ids: torch.Tensor, seq: int):
        if len(ids) <= seq:
            raise ValueError(f"text of {len(ids)} characters is too short for --seq {seq}")
        self.ids, self.seq = ids, seq

    def __len__(self) -> int:
        return len(self.ids) - self.seq

    def __getitem__(self, i: int):
        return self.ids[i: i + self.seq], self.ids[i + 1: i + self.seq + 1]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def tensor_parallel(model: GPT, mesh) -> GPT:
    """Megatron-style tensor parallelism of each block over the 1-D ``mesh``: qkv and the MLP's first linear split
    by output columns (each rank holds heads/N whole heads and computes their attention locally), proj and the
    MLP's second linear by input rows (their outputs all-reduced); norms and embeddings replicated."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"qkv": ColwiseParallel(), "proj": RowwiseParallel(), "mlp.0": ColwiseParallel(),
            "mlp.2": RowwiseParallel()}
    for block in model.blocks:
        parallelize_module(block, mesh, plan)
    return model


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        state = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}[cfg.state_dtype]
        return FusedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, state_dtype=state)
    if cfg.optimizer == "lamb":
        return FusedLAMB(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "lars":
        return FusedLARS(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "torch-adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, lamb, lars, torch-adamw)")


def _train_chars(n: int) -> int:
    """Characters of an ``n``-character corpus that are trained on (the first 90%; the rest is held out)."""
    return int(n * 0.9)


def corpus_splits(seq: int):
    """(train, val) windows over the corpus (last 10% held out) and the vocabulary size."""
    text = default_corpus()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    cut = _train_chars(len(ids))
    return CharWindows(ids[:cut], seq), CharWindows(ids[cut:], seq), len(vocab)


def _steady_compression(history: List[dict]) -> float:
    """Bytes sent / uncompressed per step, median over the steps (hooks may start with plain all-reduces)."""
    ratios = [(b["bytes_sent"] - a["bytes_sent"]) / (b["bytes_uncompressed"] - a["bytes_uncompressed"])
              for a, b in zip(history, history[1:]) if b.get("bytes_uncompressed", 0) > a.get("bytes_uncompressed", 0)]
    return statistics.median(ratios) if ratios else 1.0


def _predicted_step(trainer, summary: dict) -> dict:
    """The cost model's DDP step time for this run, from a calibration on the run's own process group."""
    from .cost import calibrate, ddp_step
    from .cost.calibrate import DEFAULT_SIZES

    if trainer.world_size < 2:
        return {"cost_model": "needs >= 2 processes (nothing is communicated on one)"}
    n_params = sum(p.numel() for p in trainer.model.parameters())
    # message sizes up to the step's gradient bytes, not beyond (8 MiB would take minutes on a slow link)
    grad_bytes = max(64 * 2**10, 4 * n_params)
    calibration = calibrate(sizes=sorted({min(n, grad_bytes) for n in DEFAULT_SIZES}))
    compute = torch.tensor(trainer.measure_compute(repeats=10))
    dist.all_reduce(compute, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
    ratio = _steady_compression(trainer.history)
    estimate = ddp_step(n_params, compute_s=float(compute), optimizer_s=summary["median_opt_s"],
                        world_size=trainer.world_size, link=calibration.link, compression_ratio=ratio,
                        host_s_per_byte=calibration.host_s_per_byte)
    return {"predicted_step_s": estimate.step_s, "predicted_compute_s": estimate.compute_s,
            "predicted_comm_s": estimate.comm_s, "predicted_exposed_comm_s": estimate.exposed_comm_s,
            "steady_compression": ratio, "link_alpha_s": calibration.link.alpha,
            "link_beta_s_per_byte": calibration.link.beta, "link_host_s_per_byte": calibration.host_s_per_byte}


def _warn_once_per_job(rank: int) -> None:
    """Deprecation notices come from the code, not the data, so every rank would print the same ones: only rank 0
    shows them (other warnings still show on every rank)."""
    if rank != 0:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)


def _comm_hook(cfg: TrainConfig):
    """The trainer's ``comm_hook``: None, a hook name, or a PowerSGD (state, hook) pair of ``--hook-rank``."""
    if cfg.hook == "none":
        return None
    if cfg.hook_rank is not None:
        from .comm.hooks import PowerSGDState, powersgd_hook

        return PowerSGDState(None, rank=cfg.hook_rank), powersgd_hook
    return cfg.hook


def run(cfg: TrainConfig) -> dict:
    """One rank of the main job (inside an initialised process group); returns the run's summary."""
    from .trainers import DDPTrainer, FSDPTrainer, init_distributed, shard_model

    info = init_distributed()
    _warn_once_per_job(info.rank)
    torch.manual_seed(cfg.seed)  # same initial model on every rank (DDP also broadcasts rank 0's)
    train_data, val_data, vocab = corpus_splits(cfg.seq)
    model = GPT(vocab, cfg.layers, cfg.hidden, cfg.heads, cfg.seq, dropout=cfg.dropout,
                activation_checkpointing=cfg.activation_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.shard == "fsdp":  # the optimizer is built on the sharded (DTensor) parameters
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(info.device.type, (info.world_size // cfg.tp, cfg.tp), mesh_dim_names=("dp", "tp"))
        if cfg.tp > 1:
            tensor_parallel(model.to(info.device), mesh["tp"])
        shard_model(model.to(info.device), model.blocks, reshard_after_forward=cfg.reshard_after_forward,
                    mesh=mesh["dp"])
        trainer_class, kwargs = FSDPTrainer, {"data_mesh": mesh["dp"]}
    else:
        trainer_class, kwargs = DDPTrainer, {"comm_hook": _comm_hook(cfg)}
    torch.manual_seed(cfg.seed + 1 + info.rank)  # per-rank streams for anything random during training
    trainer = trainer_class(model, make_optimizer(cfg, model.parameters()), lm_loss, train_data,
                            batch_size=cfg.batch, val_data=val_data, precision=cfg.precision,
                            grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                            lr_schedule=cfg.schedule, warmup_steps=cfg.warmup, max_steps=cfg.steps,
                            checkpoint_dir=cfg.checkpoint_dir, checkpoint_every=cfg.checkpoint_every,
                            keep_last=cfg.keep_last, resume=cfg.resume, eval_every=cfg.eval_every,
                            patience=cfg.patience, log_file=cfg.log_file,
                            tensorboard=cfg.tensorboard, progress=cfg.progress, seed=cfg.seed,
                            watchdog_timeout=cfg.watchdog_timeout or None, **kwargs)
    if info.is_main:
        comm = f"FSDP x TP {cfg.tp}" if cfg.tp > 1 else "FSDP" if cfg.shard == "fsdp" else f"hook {cfg.hook}"
        print(f"pytrain train: GPT {cfg.layers}x{cfg.hidden} ({n_params / 1e6:.2f}M params, vocab {vocab}, "
              f"seq {cfg.seq}), {info.world_size} x {info.device.type} ({dist.get_backend()}), "
              f"{type(trainer.optimizer).__name__}, {comm}, {cfg.precision}, batch {cfg.batch}, "
              f"{trainer.total_steps} steps from step {trainer.step}", flush=True)
    start = time.perf_counter()
    summary = dict(trainer.fit())  # extended below: a plain dict of this run (steps_run from start_step)
    summary["seconds"] = time.perf_counter() - start
    if cfg.shard == "fsdp":
        summary["cost_model"] = "models DDP steps, not --shard fsdp"
    elif summary.get("median_opt_s") is not None:
        summary.update(_predicted_step(trainer, summary))
        if "predicted_step_s" in summary:
            trainer.log.log(step=trainer.step, predicted_step_s=summary["predicted_step_s"])
    trainer.log.close()
    summary.update(config=asdict(cfg), uniform_loss=math.log(vocab))
    return summary


def format_summary(s: dict) -> str:
    stretch = (f" (steps {s['start_step'] + 1}-{s['steps']} of {s['config']['steps']}, resumed from step "
               f"{s['start_step']})") if s["start_step"] else ""
    lines = [f"summary: {s['steps_run']} steps{stretch} on {s['world_size']} processes in {s['seconds']:.1f} s; "
             f"loss {s.get('first_loss', float('nan')):.3f} -> {s.get('final_loss', float('nan')):.3f} "
             f"(uniform {s['uniform_loss']:.3f}"
             + (f", best val {s['best_val_loss']:.3f})" if "best_val_loss" in s else ")")]
    if "tokens_per_s" in s:
        lines.append(f"  throughput      {s['tokens_per_s']:,.0f} tokens/s, step {s['median_step_s'] * 1e3:.1f} ms "
                     f"(median; optimizer {s['median_opt_s'] * 1e3:.2f} ms)")
    if s.get("bytes_uncompressed"):
        lines.append(f"  communication   {s['bytes_sent'] / 1e6:.2f} MB sent vs {s['bytes_uncompressed'] / 1e6:.2f} MB "
                     f"uncompressed ({s['bytes_uncompressed'] / max(1, s['bytes_sent']):.1f}x less, "
                     f"hook {s['config']['hook']}; all ranks)")
    if "predicted_step_s" in s:
        err = s["predicted_step_s"] / s["median_step_s"] - 1
        rate = format_rate(float(f"{8 / max(s['link_beta_s_per_byte'], 1e-15):.3g}"))
        lines.append(f"  step time       measured {s['median_step_s'] * 1e3:.1f} ms, predicted "
                     f"{s['predicted_step_s'] * 1e3:.1f} ms ({err:+.0%}; compute {s['predicted_compute_s'] * 1e3:.1f} ms"
                     f" + exposed comm {s['predicted_exposed_comm_s'] * 1e3:.2f} ms of {s['predicted_comm_s'] * 1e3:.2f};"
                     f" link alpha {s['link_alpha_s'] * 1e6:.0f} us, {rate};"
                     f" {s['steady_compression']:.3f} of the bytes sent per step)")
    elif "cost_model" in s:
        lines.append(f"  step time       measured {s['median_step_s'] * 1e3:.1f} ms; cost model {s['cost_model']}")
    return "\n".join(lines)


def verdict(s: dict) -> Tuple[int, Optional[str]]:
    """The exit status of a finished run and why (None: nothing to say); see ``EPILOG``."""
    first, last = s.get("first_loss"), s.get("final_loss")
    if first is None:
        return 0, f"note: no step was trained (the run was already at step {s['steps']})"
    trained = s["steps_run"]
    losses = f"first loss {first:.4f} (step {s['start_step'] + 1}), last {last:.4f} (step {s['steps']})"
    if not math.isfinite(last):
        return 1, f"error: the final loss is not finite ({losses})"
    if last < first:
        return 0, None
    if s["start_step"] > 0:
        return 0, (f"note: the loss did not fall in this resumed stretch of {trained} steps ({losses}); "
                   "not an error for a resumed run")
    if trained < 2:
        return 0, f"note: one step trained, nothing to compare ({losses})"
    return 1, f"error: the loss did not fall over {trained} steps from step 0 ({losses})"


def main(argv: Optional[List[str]] = None) -> int:
    from .trainers import CheckpointError, RankFailure, SpawnError, spawn_on_link
    from .trainers.emulated_link import unavailable

    cfg = TrainConfig.from_args(argv)
    if cfg.emulate_link is not None:
        why = unavailable()
        if why is not None:
            print(f"pytrain train: error: --emulate-link {cfg.emulate_link}: {why}", file=sys.stderr)
            return 2
        rate = format_rate(parse_rate(cfg.emulate_link))
        print(f"pytrain train: {cfg.nproc} ranks in network namespaces joined at {rate} "
              "(pytrain.trainers.emulated_link)", flush=True)
    try:
        if "WORLD_SIZE" in os.environ or cfg.nproc == 1:  # torchrun (or one process): this process is a rank
            try:
                summary = run(cfg)
                rank = dist.get_rank()
            finally:
                if dist.is_initialized():
                    dist.destroy_process_group()
            if rank != 0:
                return 0
        else:
            summary = spawn_on_link(run, cfg.nproc, cfg.emulate_link, cfg)[0]
    except (SpawnError, CheckpointError, RankFailure) as exc:
        print(f"pytrain train: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print("summary: " + json.dumps({k: v for k, v in summary.items() if k != "config"}))
    status, why = verdict(summary)
    if why is not None:
        print(f"pytrain train: {why}", file=sys.stderr)
    return status
