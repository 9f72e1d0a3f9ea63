"""The small residual MLP and the resumable epoch loop the trained baselines share.

Training state (weights, optimizer, LR schedule, epoch) is checkpointed to RUN_DIR/checkpoint.pt after
every epoch and one JSON line per epoch goes to RUN_DIR/metrics.jsonl. A re-run resumes after the last
finished epoch; because every epoch seeds its own shuffle and noise from (seed, epoch), an interrupted
and resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from locdiff.baselines.options import MLPOptions

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class ResidualMLP(nn.Module):
    """in_dim -> hidden -> depth x [LN, Linear, GELU, Dropout, Linear] residual blocks -> LN -> out_dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, depth: int = 3, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
                          nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _truncate_log(path: Path, epoch: int) -> None:
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= epoch:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(k + "\n" for k in keep))


def train_epochs(net: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, opts: MLPOptions,
                 run_dir: Path, *, name: str, progress: bool = True,
                 epoch_end: Callable[[int], dict[str, float]] | None = None) -> dict[str, float]:
    """Train `net` for opts.epochs epochs over n examples, resuming from run_dir/checkpoint.pt.

    Args:
        net: the network (already on its device); its weights are updated in place.
        loss_fn: maps a batch of example indices (LongTensor, CPU) to a scalar loss.
        n: number of training examples.
        epoch_end: optional; called after each epoch with the epoch number, returns metrics to log.

    Returns:
        The last epoch's logged metrics (empty when there was nothing to train).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    steps_per_epoch = max(1, math.ceil(n / opts.batch_size))
    total = steps_per_epoch * opts.epochs
    opt = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)

    def factor(step: int) -> float:  # linear warmup, cosine decay to 5 %
        if step < opts.warmup_steps:
            return (step + 1) / opts.warmup_steps
        p = min(1.0, (step - opts.warmup_steps) / max(1, total - opts.warmup_steps))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    start = 0
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - a truncated file should say so clearly
            raise ValueError(f"{ckpt_path}: cannot read the checkpoint ({err}); "
                             "delete it to start over") from None
        if ckpt.get("name") != name:
            raise ValueError(f"{ckpt_path}: checkpoint of method {ckpt.get('name')!r}, not {name!r}; "
                             "use another run directory")
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise ValueError(f"{ckpt_path}: the checkpoint does not fit this model and data ({err}); "
                             "use another run directory") from None
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start = int(ckpt["epoch"])
        log.info("%s: resuming from %s after epoch %d", name, ckpt_path, start)
    _truncate_log(run_dir / METRICS, start)
    last: dict[str, float] = {}
    if start >= opts.epochs:
        return last
    bar = tqdm(total=total, initial=start * steps_per_epoch, desc=f"train {name}", disable=not progress,
               dynamic_ncols=True)
    with (run_dir / METRICS).open("a") as metrics_file:
        for epoch in range(start, opts.epochs):
            net.train()
            seed = _epoch_seed(opts.seed, epoch)
            torch.manual_seed(seed)  # dropout and noise of this epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
            total_loss, count = 0.0, 0
            for s in range(0, n, opts.batch_size):
                idx = perm[s:s + opts.batch_size]
                loss = loss_fn(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                opt.step()
                sched.step()
                total_loss += float(loss.detach()) * len(idx)
                count += len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.4f}")
            net.eval()
            last = {"epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "loss": total_loss / count,
                    "lr": sched.get_last_lr()[0]}
            if epoch_end is not None:
                last.update(epoch_end(epoch + 1))
            tmp = ckpt_path.with_suffix(".pt.tmp")
            torch.save({"name": name, "epoch": epoch + 1, "model": net.state_dict(),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp)
            tmp.replace(ckpt_path)
            metrics_file.write(json.dumps(last) + "\n")
            metrics_file.flush()
    bar.close()
    net.eval()
    return last


def batched(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int = 4096) -> list[Any]:
    """Apply fn to consecutive slices of x under no_grad."""
    with torch.no_grad():
        return [fn(x[i:i + batch]) for i in range(0, len(x), batch)]
