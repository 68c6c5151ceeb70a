"""``pytrain distill``: distil a trained GPT into a smaller one with the fused distillation loss, and measure it.

The teacher is a checkpoint of the main job (``pytrain train --checkpoint-dir DIR``: the latest ``step-*.pt`` in
DIR, or one file).  Two students of the same size, seed (so the same initial weights) and batches are trained for
the same steps on the embedded corpus, in this process, with FusedAdamW:

* ``distilled``: ``pytrain.ops.linear_distillation_loss`` of the student's final hidden states and tied head
  against the teacher's (temperature, kind, beta and hard_label_weight as the flags say), so neither the
  student's nor the teacher's (tokens, vocabulary) logits are built;
* ``baseline``: the same student with cross-entropy on the next tokens only
  (``pytrain.ops.linear_cross_entropy``).

The report gives each model's validation loss (cross-entropy on held-out windows of the corpus, the same for all)
and the difference ``distilled - baseline``.  Exit status: 0 when every loss is finite, 1 otherwise (the reason is
printed), 2 for bad flags or a teacher that cannot be read.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .ops import linear_cross_entropy, linear_distillation_loss
from .ops.linear_distillation_loss import KINDS, check_options
from .optim import FusedAdamW
from .train import GPT, SIZES, corpus_splits
from .trainers.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def parser() -> argparse.ArgumentParser:
    """``pytrain distill``'s flags; --help shows each default and the module docstring as the epilog."""
    head, _, rest = __doc__.partition("\n")
    p = argparse.ArgumentParser(prog="pytrain distill", description=head.removeprefix("``pytrain distill``: "),
                                epilog=rest.strip().replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)

    def flag(name, help, **kw):
        default = kw.get("default")
        shown = kw.pop("default_text", default)
        p.add_argument(name, help=f"{help} (default: {shown})" if "required" not in kw else help, **kw)

    flag("--teacher", "a pytrain train checkpoint directory (its latest step-*.pt) or checkpoint file",
         required=True, metavar="PATH")
    flag("--teacher-heads", "the teacher's attention heads", type=int, default=None,
         default_text="those of the --size preset of its width and depth")
    flag("--size", "the student's size preset", choices=list(SIZES), default="tiny")
    flag("--layers", "student blocks", type=int, default=None, default_text="from --size")
    flag("--hidden", "student width", type=int, default=None, default_text="from --size")
    flag("--heads", "student attention heads", type=int, default=None, default_text="from --size")
    flag("--steps", "optimizer steps of each student", type=int, default=100)
    flag("--batch", "sequences per step", type=int, default=16)
    flag("--lr", "FusedAdamW's learning rate (constant)", type=float, default=3e-3)
    flag("--kind", "the divergence (pytrain.ops.linear_distillation_loss)", choices=KINDS, default="kl")
    flag("--temperature", "softmax temperature T (the divergence is scaled by T^2)", type=float, default=2.0)
    flag("--beta", "the JSD's mixing weight (--kind jsd)", type=float, default=0.5)
    flag("--hard-label-weight", "weight a of the next-token cross-entropy: loss = (1 - a) T^2 D + a CE",
         type=float, default=0.5)
    flag("--eval-batches", "held-out batches of --batch windows for the validation loss", type=int, default=8)
    flag("--seed", "seed of the students' initialisation and the batch order", type=int, default=0)
    flag("--device", "where the models run", choices=["cpu", "cuda"], default=None,
         default_text="cuda when available, else cpu")
    return p


def teacher_checkpoint(path: str) -> Path:
    """The checkpoint file ``path`` names (a directory: its latest); CheckpointError when there is none."""
    p = Path(path)
    if p.is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise CheckpointError(f"{p} holds no checkpoint (step-*.pt); write one with pytrain train "
                                  f"--checkpoint-dir {p}")
        return latest
    return p


def teacher_shape(model_state: Dict[str, torch.Tensor], heads: Optional[int]) -> Dict[str, int]:
    """GPT(vocab, layers, hidden, heads, seq) arguments of a checkpoint's model state (heads are not in the
    weights: ``heads`` or the size preset of the same width and depth); ValueError when it is no GPT of train.py."""
    missing = [k for k in ("embed.weight", "pos") if k not in model_state]
    if missing:
        raise ValueError(f"the checkpoint's model is not pytrain train's GPT (no {', '.join(missing)})")
    vocab, hidden = model_state["embed.weight"].shape
    layers = len({int(m.group(1)) for k in model_state for m in [BLOCK_KEY.match(k)] if m})
    if heads is None:
        presets = [p["heads"] for p in SIZES.values() if (p["hidden"], p["layers"]) == (hidden, layers)]
        if not presets:
            raise ValueError(f"the teacher ({layers} blocks of width {hidden}) matches no --size preset; give "
                             f"--teacher-heads")
        heads = presets[0]
    if heads < 1 or hidden % heads:
        raise ValueError(f"--teacher-heads {heads} does not divide the teacher's width {hidden}")
    return dict(vocab=vocab, layers=layers, hidden=hidden, heads=heads, seq=model_state["pos"].shape[0])


def _batches(data, steps: int, batch: int, seed: int, device: str) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g).tolist()
        xs, ys = zip(*(data[i] for i in idx))
        out.append((torch.stack(xs).to(device), torch.stack(ys).to(device)))
    return out


@torch.no_grad()
def validation_loss(model: GPT, batches) -> float:
    """Mean next-token cross-entropy over ``batches``."""
    model.eval()
    total = sum(float(linear_cross_entropy(model.hidden_states(x).flatten(0, 1), model.embed.weight, y.flatten()))
                for x, y in batches)
    model.train()
    return total / len(batches)


def train_student(args, shape: Dict[str, int], batches, teacher: Optional[GPT]) -> Tuple[GPT, List[float]]:
    """A student trained on ``batches``: distilled from ``teacher``, or on the next tokens alone without one."""
    torch.manual_seed(args.seed)
    student = GPT(shape["vocab"], args.layers, args.hidden, args.heads, shape["seq"]).to(args.device)
    optimizer = FusedAdamW(student.parameters(), lr=args.lr, weight_decay=0.01)
    losses = []
    for x, y in batches:
        h = student.hidden_states(x).flatten(0, 1)
        if teacher is None:
            loss = linear_cross_entropy(h, student.embed.weight, y.flatten())
        else:
            with torch.no_grad():
                t = teacher.hidden_states(x).flatten(0, 1)
            loss = linear_distillation_loss(h, student.embed.weight, t, teacher.embed.weight, y.flatten(),
                                            kind=args.kind, temperature=args.temperature, beta=args.beta,
                                            hard_label_weight=args.hard_label_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return student, losses


def run(args) -> dict:
    """Both students against the teacher; the summary (see the module docstring)."""
    path = teacher_checkpoint(args.teacher)
    state = load_checkpoint(path)
    if "model" not in state:
        raise CheckpointError(f"{path} holds no model state (keys: {', '.join(sorted(state))})")
    shape = teacher_shape(state["model"], args.teacher_heads)
    train_data, val_data, vocab = corpus_splits(shape["seq"])
    if vocab != shape["vocab"]:
        raise ValueError(f"the teacher's vocabulary has {shape['vocab']} characters, the corpus {vocab}")
    teacher = GPT(shape["vocab"], shape["layers"], shape["hidden"], shape["heads"], shape["seq"])
    teacher.load_state_dict(state["model"])
    teacher.to(args.device)
    teacher.eval().requires_grad_(False)
    batches = _batches(train_data, args.steps, args.batch, args.seed, args.device)
    stride = max(1, len(val_data) // (args.eval_batches * args.batch))
    val_idx = list(range(0, len(val_data), stride))[: args.eval_batches * args.batch]
    val = [(torch.stack([val_data[i][0] for i in chunk]).to(args.device),
            torch.stack([val_data[i][1] for i in chunk]).to(args.device))
           for chunk in (val_idx[k:k + args.batch] for k in range(0, len(val_idx), args.batch))]
    out = {"teacher": str(path), "teacher_shape": shape, "teacher_val_loss": validation_loss(teacher, val),
           "uniform_loss": math.log(vocab)}
    for name, t in (("baseline", None), ("distilled", teacher)):
        start = time.perf_counter()
        student, losses = train_student(args, shape, batches, t)
        out[name] = {"val_loss": validation_loss(student, val), "first_loss": losses[0], "final_loss": losses[-1],
                     "seconds": time.perf_counter() - start}
    out["student_params"] = sum(p.numel() for p in student.parameters())
    out["teacher_params"] = sum(p.numel() for p in teacher.parameters())
    out["val_gain"] = out["baseline"]["val_loss"] - out["distilled"]["val_loss"]
    out["config"] = vars(args)
    return out


def format_summary(s: dict) -> str:
    c = s["config"]
    mix = f", beta {c['beta']}" if c["kind"] == "jsd" else ""
    lines = [f"pytrain distill: teacher {s['teacher_shape']['layers']}x{s['teacher_shape']['hidden']} "
             f"({s['teacher_params'] / 1e6:.2f}M params) -> student {c['layers']}x{c['hidden']} "
             f"({s['student_params'] / 1e6:.2f}M), {c['steps']} steps of batch {c['batch']}, {c['kind']} at T = "
             f"{c['temperature']}{mix}, hard-label weight {c['hard_label_weight']}",
             f"  validation loss   teacher {s['teacher_val_loss']:.3f} | student distilled "
             f"{s['distilled']['val_loss']:.3f} | student without teacher {s['baseline']['val_loss']:.3f} "
             f"(uniform {s['uniform_loss']:.3f})",
             f"  distillation      {s['val_gain']:+.3f} validation loss against the same student, seed and steps "
             f"without a teacher ({'better' if s['val_gain'] > 0 else 'not better'})"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    for flag in ("steps", "batch", "eval_batches"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (math.isfinite(args.lr) and args.lr >= 0):
        p.error(f"--lr must be a finite number >= 0, got {args.lr}")
    try:
        check_options(args.kind, args.temperature, args.beta, args.hard_label_weight, -100, "mean", True)
    except (TypeError, ValueError) as exc:
        message = str(exc).removeprefix("linear_distillation_loss: ")  # "<option> must be ...": name the flag
        p.error(re.sub(r"^\w+", lambda m: "--" + m.group(0).replace("_", "-"), message))
    for key, value in SIZES[args.size].items():
        if key != "seq" and getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    try:
        summary = run(args)
    except (CheckpointError, ValueError) as exc:
        print(f"pytrain distill: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print("summary: " + json.dumps({k: v for k, v in summary.items() if k != "config"}))
    losses = [summary["teacher_val_loss"]] + [summary[n][k] for n in ("baseline", "distilled")
                                              for k in ("val_loss", "final_loss")]
    if not all(math.isfinite(x) for x in losses):
        print("pytrain distill: error: a loss is not finite", file=sys.stderr)
        return 1
    return 0
