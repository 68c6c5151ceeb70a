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
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .comm.hooks import HOOK_NAMES
from .data import default_corpus
from .ops import flash_attention
from .optim import FusedAdamW, FusedLAMB, FusedLARS

SIZES = {"tiny": dict(layers=2, hidden=128, heads=4, seq=64),
         "small": dict(layers=3, hidden=192, heads=6, seq=64),
         "base": dict(layers=6, hidden=384, heads=6, seq=128)}
HOOKS = (*HOOK_NAMES, "none")  # --hook: pytrain.comm's hook names, or none (DDP's own all-reduce)
EPILOG = """checkpoints and resume:
  --checkpoint-dir DIR     write step-<step>.pt there at the end of the run (and every --checkpoint-every
                           steps; 0 or absent: only at the end), keeping the last --keep-last; the job owns DIR
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


@dataclass
class TrainConfig:
    size: str = "small"  # tiny | small | base (layers/hidden/heads/seq below override it)
    layers: Optional[int] = None
    hidden: Optional[int] = None
    heads: Optional[int] = None
    seq: Optional[int] = None
    nproc: int = 2  # processes spawned on this machine (ignored under torchrun)
    steps: int = 200
    batch: int = 32  # global batch (sequences per optimizer step, all ranks)
    grad_accum: int = 1
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | onecycle | constant
    warmup: Optional[int] = None  # LR warmup steps (default: 10% of --steps)
    weight_decay: float = 0.01
    max_grad_norm: Optional[float] = 1.0
    optimizer: str = "adamw"  # adamw | lamb | lars | torch-adamw
    state_dtype: str = "float32"  # float32 | bfloat16 | int8 (FusedAdamW)
    hook: str = "powersgd"  # powersgd | topk | int8 | allreduce | none
    precision: str = "fp32"  # fp32 | bf16 | fp16
    eval_every: int = 50
    patience: Optional[int] = None  # early stopping after this many evaluations without improvement
    checkpoint_dir: Optional[str] = None
    checkpoint_every: Optional[int] = None  # 0 or None: only at the end
    keep_last: int = 3
    resume: bool = False
    log_file: Optional[str] = None  # JSON lines: one record per step and per evaluation
    seed: int = 0
    progress: bool = True
    watchdog_timeout: float = 120.0  # seconds without progress before the job ends (0: off)

    @classmethod
    def from_args(cls, argv: Optional[List[str]] = None) -> "TrainConfig":
        parser = argparse.ArgumentParser(prog="pytrain train", description=__doc__.splitlines()[0], epilog=EPILOG,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in fields(cls):
            flag = f"--{f.name.replace('_', '-')}"
            if isinstance(f.default, bool):
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
                continue
            kind = {int: int, float: float}.get(type(f.default), str)
            if f.name in ("layers", "hidden", "heads", "seq", "warmup", "patience", "checkpoint_every"):
                kind = int
            elif f.name == "max_grad_norm":
                kind = float
            choices = {"size": list(SIZES), "hook": list(HOOKS), "precision": ["fp32", "bf16", "fp16"],
                       "schedule": ["cosine", "onecycle", "constant"],
                       "optimizer": ["adamw", "lamb", "lars", "torch-adamw"],
                       "state_dtype": ["float32", "bfloat16", "int8"]}.get(f.name)
            parser.add_argument(flag, type=kind, default=f.default, choices=choices)
        cfg = cls(**vars(parser.parse_args(argv)))
        for key, value in SIZES[cfg.size].items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.warmup is None:
            cfg.warmup = cfg.steps // 10
        if cfg.hidden % cfg.heads:
            parser.error(f"--hidden {cfg.hidden} is not divisible by --heads {cfg.heads}")
        world = int(os.environ.get("WORLD_SIZE", cfg.nproc))
        if cfg.steps < 1 or world < 1 or cfg.grad_accum < 1:
            parser.error("--steps, --nproc and --grad-accum must be >= 1")
        if cfg.batch % (world * cfg.grad_accum):
            parser.error(f"--batch {cfg.batch} is not divisible by {world} processes x --grad-accum "
                         f"{cfg.grad_accum} = {world * cfg.grad_accum}")
        if cfg.resume and cfg.checkpoint_dir is None:
            parser.error("--resume needs --checkpoint-dir")
        if cfg.resume and "WORLD_SIZE" not in os.environ and not os.path.isdir(cfg.checkpoint_dir):
            # under torchrun rank 0 decides, with the same check, for every rank (node-local disks may differ)
            parser.error(f"--resume: checkpoint directory {cfg.checkpoint_dir} does not exist (nothing to resume; "
                         "without --resume a new run starts there)")
        if cfg.checkpoint_every is not None and cfg.checkpoint_every < 0:
            parser.error(f"--checkpoint-every must be >= 0 (0: only at the end), got {cfg.checkpoint_every}")
        if cfg.checkpoint_every and cfg.checkpoint_dir is None:
            parser.error("--checkpoint-every needs --checkpoint-dir")
        if cfg.keep_last < 1:
            parser.error(f"--keep-last must be >= 1, got {cfg.keep_last}")
        if not cfg.watchdog_timeout >= 0:
            parser.error(f"--watchdog-timeout must be >= 0 seconds (0: off), got {cfg.watchdog_timeout}")
        return cfg


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        att = flash_attention(q, k, v, causal=True)  # (b, heads, s, h/heads)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Character LM: (batch, seq) int64 tokens -> (batch, seq, vocab) logits."""

    def __init__(self, vocab: int, layers: int, hidden: int, heads: int, seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(torch.zeros(seq, hidden))
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied output: small logits, loss starts near log(vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()


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


def corpus_splits(seq: int):
    """(train, val) windows over the corpus (last 10% held out) and the vocabulary size."""
    text = default_corpus()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    return CharWindows(ids[:cut], seq), CharWindows(ids[cut:], seq), len(vocab)


def _steady_compression(history: List[dict]) -> float:
    """Bytes sent / uncompressed per step, median over the steps (hooks may start with plain all-reduces)."""
    ratios = [(b["bytes_sent"] - a["bytes_sent"]) / (b["bytes_uncompressed"] - a["bytes_uncompressed"])
              for a, b in zip(history, history[1:]) if b.get("bytes_uncompressed", 0) > a.get("bytes_uncompressed", 0)]
    return statistics.median(ratios) if ratios else 1.0


def _predicted_step(trainer, summary: dict) -> dict:
    """The cost model's DDP step time for this run, from a calibration on the run's own process group."""
    from .cost import calibrate, ddp_step

    if trainer.world_size < 2:
        return {"cost_model": "needs >= 2 processes (nothing is communicated on one)"}
    calibration = calibrate()
    compute = torch.tensor(trainer.measure_compute(repeats=10))
    dist.all_reduce(compute, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
    ratio = _steady_compression(trainer.history)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    estimate = ddp_step(n_params, compute_s=float(compute), optimizer_s=summary["median_opt_s"],
                        world_size=trainer.world_size, link=calibration.link, compression_ratio=ratio)
    return {"predicted_step_s": estimate.step_s, "predicted_compute_s": estimate.compute_s,
            "predicted_comm_s": estimate.comm_s, "predicted_exposed_comm_s": estimate.exposed_comm_s,
            "steady_compression": ratio, "link_alpha_s": calibration.link.alpha,
            "link_beta_s_per_byte": calibration.link.beta}


def run(cfg: TrainConfig) -> dict:
    """One rank of the main job (inside an initialised process group); returns the run's summary."""
    from .trainers import DDPTrainer, init_distributed

    info = init_distributed()
    torch.manual_seed(cfg.seed)  # same initial model on every rank (DDP also broadcasts rank 0's)
    train_data, val_data, vocab = corpus_splits(cfg.seq)
    model = GPT(vocab, cfg.layers, cfg.hidden, cfg.heads, cfg.seq)
    torch.manual_seed(cfg.seed + 1 + info.rank)  # per-rank streams for anything random during training
    trainer = DDPTrainer(model, make_optimizer(cfg, model.parameters()), lm_loss, train_data,
                         batch_size=cfg.batch, val_data=val_data, comm_hook=None if cfg.hook == "none" else cfg.hook,
                         precision=cfg.precision, grad_accum=cfg.grad_accum, max_grad_norm=cfg.max_grad_norm,
                         lr_schedule=cfg.schedule, warmup_steps=cfg.warmup, max_steps=cfg.steps,
                         checkpoint_dir=cfg.checkpoint_dir, checkpoint_every=cfg.checkpoint_every,
                         keep_last=cfg.keep_last, resume=cfg.resume, eval_every=cfg.eval_every,
                         patience=cfg.patience, log_file=cfg.log_file, progress=cfg.progress, seed=cfg.seed,
                         watchdog_timeout=cfg.watchdog_timeout or None)
    start_step = trainer.step
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"pytrain train: GPT {cfg.layers}x{cfg.hidden} ({n_params / 1e6:.2f}M params, vocab {vocab}, "
              f"seq {cfg.seq}), {info.world_size} x {info.device.type} ({dist.get_backend()}), "
              f"{type(trainer.optimizer).__name__}, hook {cfg.hook}, {cfg.precision}, batch {cfg.batch}, "
              f"{trainer.total_steps} steps from step {trainer.step}", flush=True)
    start = time.perf_counter()
    summary = trainer.fit()
    summary["seconds"] = time.perf_counter() - start
    if summary.get("median_opt_s") is not None:
        summary.update(_predicted_step(trainer, summary))
    summary.update(config=asdict(cfg), uniform_loss=math.log(vocab), start_step=start_step)
    return summary


def format_summary(s: dict) -> str:
    lines = [f"summary: {s['steps']} steps on {s['world_size']} processes in {s['seconds']:.1f} s; "
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
        lines.append(f"  step time       measured {s['median_step_s'] * 1e3:.1f} ms, predicted "
                     f"{s['predicted_step_s'] * 1e3:.1f} ms ({err:+.0%}; compute {s['predicted_compute_s'] * 1e3:.1f} ms"
                     f" + exposed comm {s['predicted_exposed_comm_s'] * 1e3:.2f} ms of {s['predicted_comm_s'] * 1e3:.2f};"
                     f" link alpha {s['link_alpha_s'] * 1e6:.0f} us, {1e-9 / max(s['link_beta_s_per_byte'], 1e-15):.2f} GB/s;"
                     f" {s['steady_compression']:.3f} of the bytes sent per step)")
    elif "cost_model" in s:
        lines.append(f"  step time       measured {s['median_step_s'] * 1e3:.1f} ms; cost model {s['cost_model']}")
    return "\n".join(lines)


def verdict(s: dict) -> Tuple[int, Optional[str]]:
    """The exit status of a finished run and why (None: nothing to say); see ``EPILOG``."""
    first, last = s.get("first_loss"), s.get("final_loss")
    if first is None:
        return 0, f"note: no step was trained (the run was already at step {s['steps']})"
    trained = s["steps"] - s["start_step"]
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
    from .trainers import CheckpointError, RankFailure, SpawnError, spawn

    cfg = TrainConfig.from_args(argv)
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
            summary = spawn(run, cfg.nproc, cfg)[0]
    except (SpawnError, CheckpointError, RankFailure) as exc:
        print(f"pytrain train: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    print("summary: " + json.dumps({k: v for k, v in summary.items() if k != "config"}))
    status, why = verdict(summary)
    if why is not None:
        print(f"pytrain train: {why}", file=sys.stderr)
    return status
