"""The main job: train a small character-level transformer on the embedded corpus.

``pytrain train`` (or ``python -m pytrain train``) runs it with no downloads and
reports what it measured: loss curve, tokens/s, and the time of the optimizer step
next to the same step of ``torch.optim.AdamW(fused=True)`` on the same model.

The model is a pre-norm decoder-only transformer (causal self-attention + GELU MLP,
tied input/output embeddings), small enough to learn visibly in a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import List, Optional

import torch
from torch import nn

from .data import default_corpus
from .optim import FusedAdamW, FusedLAMB, FusedLARS


@dataclass
class TrainConfig:
    steps: int = 200
    batch: int = 16
    seq: int = 64
    layers: int = 3
    hidden: int = 192
    heads: int = 6
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    max_grad_norm: Optional[float] = 1.0
    optimizer: str = "adamw"  # adamw | lamb | lars | torch-adamw
    state_dtype: str = "float32"  # float32 | bfloat16 | int8 (FusedAdamW)
    device: str = "cpu"
    seed: int = 0
    log_every: int = 25
    log_file: Optional[str] = None  # JSON lines, one record per logged step

    @classmethod
    def from_args(cls, argv: Optional[List[str]] = None) -> "TrainConfig":
        parser = argparse.ArgumentParser(prog="pytrain train", description=__doc__.splitlines()[0])
        for f in fields(cls):
            kind = {int: int, float: float}.get(type(f.default), str)
            if f.name == "max_grad_norm":
                kind = float
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
        return cls(**vars(parser.parse_args(argv)))


class Block(nn.Module):
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
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, h))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Character LM: (batch, seq) int64 tokens -> (batch, seq, vocab) logits."""

    def __init__(self, vocab: int, cfg: TrainConfig):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.hidden)
        self.pos = nn.Parameter(torch.zeros(cfg.seq, cfg.hidden))
        self.blocks = nn.ModuleList(Block(cfg.hidden, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied output: small logits, loss starts near log(vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.t()


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        state = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": "int8"}[cfg.state_dtype]
        return FusedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
                          state_dtype=state)
    if cfg.optimizer == "lamb":
        return FusedLAMB(params, lr=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    if cfg.optimizer == "lars":
        return FusedLARS(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "torch-adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw, lamb, lars, torch-adamw)")


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def time_optimizer_step(opt: torch.optim.Optimizer, repeats: int = 5) -> float:
    """Median seconds of ``opt.step()`` with the gradients currently set (changes the params)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def train(cfg: TrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    text = default_corpus()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    model = TinyLM(len(vocab), cfg).to(cfg.device)
    opt = make_optimizer(cfg, model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.warmup, cfg.steps))
    log = open(cfg.log_file, "w") if cfg.log_file else None
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pytrain train: {n_params / 1e6:.2f}M params, vocab {len(vocab)}, {len(data)} chars, "
          f"optimizer {type(opt).__name__}, device {cfg.device}")
    first_loss = None
    tokens_seen, start = 0, time.perf_counter()
    for step in range(cfg.steps):
        starts = torch.randint(0, len(data) - cfg.seq - 1, (cfg.batch,))
        batch = torch.stack([data[s: s + cfg.seq + 1] for s in starts.tolist()]).to(cfg.device)
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tokens_seen += cfg.batch * cfg.seq
        loss_value = float(loss.detach())
        first_loss = loss_value if first_loss is None else first_loss
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            record = {"step": step, "loss": round(loss_value, 4), "lr": sched.get_last_lr()[0],
                      "tokens_per_s": round(tokens_seen / elapsed, 1)}
            print(json.dumps(record))
            if log:
                log.write(json.dumps(record) + "\n")
    elapsed = time.perf_counter() - start
    if log:
        log.close()
    ours = time_optimizer_step(opt)
    baseline = time_optimizer_step(torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True))
    summary = {"config": asdict(cfg), "params": n_params, "first_loss": round(first_loss, 4),
               "final_loss": round(loss_value, 4), "uniform_loss": round(math.log(len(vocab)), 4),
               "tokens_per_s": round(tokens_seen / elapsed, 1), "seconds": round(elapsed, 2),
               "optimizer_step_ms": round(ours * 1e3, 3), "torch_fused_adamw_step_ms": round(baseline * 1e3, 3)}
    print("summary: " + json.dumps(summary))
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    summary = train(TrainConfig.from_args(argv))
    return 0 if summary["final_loss"] < summary["first_loss"] else 1
