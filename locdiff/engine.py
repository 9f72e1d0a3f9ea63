"""The one training loop, used by `locdiff train`, by every Ray Train worker and by the trained baselines.

The method supplies a `Task`: the network (`build`) and its loss on a batch (`loss`). The engine owns the rest:
the batch stream (bounded memory, split by rank, resumable at the exact row), the optimizer (AdamW), the LR
schedule (linear warm-up, cosine decay), gradient clipping, bfloat16 autocast on CUDA, the EMA of the weights,
validation, logging and checkpoints. Losses stay on the device between log steps (one transfer per log step).

Where checkpoints and logs go is a `CheckpointStore`: the run folder for a single process (`RunStore`), Ray
Train's storage for its workers (`locdiff.orchestration.ray_worker.RayStore`). Both hold the same state, so a
run trained on Ray is resumed or finished by a single process and the other way round. A watcher of the
training (an experiment tracker) is a `Callback`: the engine knows nothing of it.

    result = train(task, source, settings, store=RunStore(run), val=val_rows)
"""

from __future__ import annotations

import copy
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from tqdm.auto import tqdm

from locdiff.data.stream import BatchStream, DataSource, Rows
from locdiff.errors import UserError
from locdiff.geo import check_coordinates
from locdiff.runs import CHECKPOINT, RunFolder, check_checkpoint
from locdiff.throughput import Throughput, peak_flops

log = logging.getLogger(__name__)


# -- what the method supplies ----------------------------------------------------------------------------------

class Task(ABC):
    """A trainable network and its objective. `name` is checked when a checkpoint is resumed."""

    name: str = ""

    @abstractmethod
    def build(self, embed_dim: int, stats: tuple[np.ndarray, np.ndarray]) -> nn.Module:
        """The untrained network for embeddings of size embed_dim (stats: their mean and std)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(scalar loss, named parts as detached 0-d tensors) on a batch (see `to_batch`)."""

    def describe(self) -> dict[str, Any]:
        """What must match when a checkpoint is resumed (besides the weights' shapes)."""
        return {"task": self.name}

    def validation_metrics(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, float]:
        """Optional: accuracy-type metrics of the model on held-out rows, logged beside the validation loss
        at every checkpoint (the learning curve); names without the "val_" prefix."""
        return {}

    def flops_per_sample(self, model: nn.Module) -> float | None:
        """Optional: floating-point operations of one training sample (forward and backward), for the MFU."""
        return None


@dataclass
class Settings:
    """The loop's hyper-parameters (from the run config's `train` section or a baseline's options)."""

    steps: int
    batch_size: int  # global: split across ranks
    lr: float = 1e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    ema_decay: float = 0.0  # 0: no EMA (the trained weights are the result)
    checkpoint_every: int = 500
    log_every: int = 50
    validate_every: int = 0  # 0: validate at checkpoints and at the end
    seed: int = 0
    amp: bool = True  # bfloat16 autocast, CUDA only
    peak_tflops: float = 0.0  # the device's peak for MFU; 0: PEAK_TFLOPS by the device's name
    device: str = "auto"
    window_rows: int = 16_384  # shuffle buffer of the stream
    prefetch_windows: int = 2  # windows read ahead of the one training (memory: prefetch + threads + 1)
    loader_threads: int = 1  # CPU threads reading and decoding windows per worker (raise it for a GPU)
    threads: int = 0  # torch CPU threads of the training maths per worker; 0: `cpu_threads` chooses
    stats_rows: int = 65_536  # rows sampled for the embedding standardisation


def cpu_threads(requested: int = 0, loader_threads: int = 1) -> int:
    """The torch CPU threads a training worker computes with: `requested` when > 0, else OMP_NUM_THREADS
    when set (Ray sets it to a worker's CPU share), else the CPUs this process may run on minus the loader
    threads, at least 1. More compute threads than free cores make every step wait for a descheduled
    thread (measured 5x-6x slower on 2 busy cores, docs/results.md)."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus - loader_threads)


def resolve_device(name: str = "auto", *, setting: str = "train.device") -> torch.device:
    """"auto" (CUDA when present, else the CPU) or a device name; a CUDA or MPS device this machine does not
    have is a UserError naming what exists (and `setting`, where the name came from)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"{setting}={name}: not a device name ({str(err).splitlines()[0]}); use auto, cpu, "
                        "cuda or cuda:N") from None
    if device.type == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have == 0 or (device.index or 0) >= have:
            exists = f"its CUDA devices are cuda:0..cuda:{have - 1}" if have else "it has no CUDA GPU"
            raise UserError(f"{setting}={name}: this machine has no such device ({exists}); use "
                            f"{setting}=auto or one that exists")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{setting}={name}: this machine has no such device (it has no MPS device, Apple "
                        f"silicon's GPU); use {setting}=auto or one that exists")
    return device


def to_batch(rows: Rows, device: torch.device) -> dict[str, Any]:
    """A chunk of rows as tensors on the device: embedding (B, d) float32, lat/lon (B,) float64, and the
    stored SHDD codes (B, D) when the source has them. `ids` stays a NumPy array. On CUDA the host copies
    are pinned, so the transfers are asynchronous (the step's kernels queue behind them, no host wait)."""
    pin = device.type == "cuda"

    def put(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return (t.pin_memory() if pin else t).to(device, non_blocking=True)

    b: dict[str, Any] = {"embedding": put(np.ascontiguousarray(rows.emb)), "ids": rows.ids}
    if rows.lat is not None:
        lat, lon = np.ascontiguousarray(rows.lat, np.float64), np.ascontiguousarray(rows.lon, np.float64)
        check_coordinates(lat, lon, name=f"{len(lat)} training rows")  # here on the host, not on the device
        b["lat"], b["lon"], b["coordinates_checked"] = put(lat), put(lon), True
    if rows.shdd is not None:
        b["shdd"] = put(np.ascontiguousarray(rows.shdd))
    return b


# -- EMA and the LR schedule -----------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """Exponential moving average of a model's weights (buffers copied), with the usual warm-up."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        src = unwrap(model)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in src.parameters()], 1 - d)
        for e, b in zip(self.module.buffers(), src.buffers(), strict=True):
            e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]


def lr_factor(settings: Settings) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to min_lr_ratio, as a LambdaLR factor of the step."""

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / max(1, settings.warmup_steps)
        progress = min(1.0, (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps))
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- where checkpoints and logs go ------------------------------------------------------------------------------

class CheckpointStore(ABC):
    """Checkpoints and the metrics log of one training."""

    @abstractmethod
    def load(self, map_location: torch.device) -> dict[str, Any] | None:
        """The last checkpoint's state, or None for a fresh run (the log is cut back to its step)."""

    @abstractmethod
    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        """Store a checkpoint (only rank 0's state is kept; every rank calls it)."""

    @abstractmethod
    def log(self, rows: list[dict[str, Any]]) -> None:
        """Append metrics rows (rank 0)."""


class RunStore(CheckpointStore):
    """A single process: checkpoint.pt and metrics.jsonl of the run folder."""

    def __init__(self, run: RunFolder) -> None:
        self.run = run
        self.where = run.file(CHECKPOINT)  # named in errors about the checkpoint

    def load(self, map_location: torch.device) -> dict[str, Any] | None:
        state = self.run.load_checkpoint(map_location)
        self.run.truncate_metrics(int(state["step"]) if state is not None else 0)
        return state

    def save(self, state: dict[str, Any], metrics: dict[str, float]) -> None:
        self.run.save_checkpoint(state)

    def log(self, rows: list[dict[str, Any]]) -> None:
        self.run.append_metrics(rows)


class Callback:
    """Hooks on rank 0, no-ops unless overridden: `on_log` gets the metrics rows the store logs, `on_checkpoint`
    a checkpoint about to be stored (it may add entries), `on_resume` the one resumed from (with them)."""

    def on_resume(self, state: Mapping[str, Any]) -> None: ...
    def on_log(self, rows: list[dict[str, Any]]) -> None: ...
    def on_checkpoint(self, state: dict[str, Any]) -> None: ...


# -- the loop ---------------------------------------------------------------------------------------------------

@dataclass
class Result:
    model: nn.Module  # the EMA weights (or the trained ones without EMA), unwrapped, eval mode
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    restored_from_step: int = 0
    samples_per_s: float = 0.0
    stats: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class Distributed:
    """How a Ray Train (or torchrun) worker joins: its rank, the world, and the DDP wrapper."""

    rank: int
    world_size: int
    wrap: Callable[[nn.Module], nn.Module]  # e.g. ray.train.torch.prepare_model
    device: torch.device | None = None

    def gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1 or not (torch_dist.is_available() and torch_dist.is_initialized()):
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out


class _Autocast(nn.Module):
    """The network's forward under bfloat16 autocast (CUDA), its output back in float32: the loss that
    follows (SHDD-KL's grid product, MSE) stays in float32."""

    def __init__(self, inner: nn.Module, device: torch.device, enabled: bool) -> None:
        super().__init__()
        self.inner, self.device_type, self.enabled = inner, device.type, enabled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16, enabled=self.enabled):
            out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.float() if isinstance(o, torch.Tensor) else o for o in out)
        return out.float() if isinstance(out, torch.Tensor) else out


def _rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """This process's random state as CPU tensors (a checkpoint never holds a device tensor): the global
    CPU stream, the training generator and, on CUDA, the device's default generator (dropout, randn_like)."""
    state = {"torch": torch.get_rng_state().cpu(), "generator": generator.get_state().cpu()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _fits(saved: Any, current: torch.Tensor) -> bool:
    return isinstance(saved, torch.Tensor) and saved.dtype == torch.uint8 and saved.shape == current.shape


def _restore_rng(rng: Mapping[str, Any], generator: torch.Generator, device: torch.device, *, seed: int,
                 step: int, where: Any) -> None:
    """Set the random state saved by `_rng_state`, per device. A state that does not fit this device (a
    CUDA generator's 16 bytes on a CPU, or the other way round: a run trained on a GPU resumed on a CPU) is
    skipped with a logged note, and that stream is reseeded from the seed and the step instead (the
    resumption is then deterministic, though not the stream the other device would have drawn)."""
    skipped = []
    saved = rng.get("torch")
    if _fits(saved, torch.get_rng_state()):
        torch.set_rng_state(saved)
    else:
        skipped.append(f"the CPU stream ({_size(saved)})")
        torch.manual_seed(seed + 7919 * step)
    saved = rng.get("generator")
    if _fits(saved, generator.get_state()):
        generator.set_state(saved)
    else:
        skipped.append(f"the {device.type} training generator ({_size(saved)})")
        generator.manual_seed(seed + 1 + 104729 * step)
    if device.type == "cuda":
        saved = rng.get("cuda")
        if _fits(saved, torch.cuda.get_rng_state(device)):
            torch.cuda.set_rng_state(saved, device)
        else:
            skipped.append(f"the CUDA stream ({_size(saved)})")
            torch.cuda.manual_seed(seed + 7919 * step)
    if skipped:
        log.info("%s: the saved random state of %s does not fit this %s device; reseeded from the seed "
                 "and step %d instead (the resumption is deterministic, not bit-exact with the other "
                 "device)", where, ", ".join(skipped), device.type, step)


def _size(saved: Any) -> str:
    return f"{saved.numel()} bytes" if isinstance(saved, torch.Tensor) else "absent"


def _check_resume(state: Mapping[str, Any], task: Task, source: DataSource, where: Any) -> None:
    check_checkpoint(dict(state), where, embed_dim=source.dim, data=source.location or "the data")
    if state.get("task") != task.describe():
        raise UserError(f"{where}: checkpoint of {state.get('task')}, not {task.describe()}; use another run "
                        "folder (--out)")


def train(task: Task, source: DataSource, settings: Settings, *, store: CheckpointStore,
          val: DataSource | None = None, val_rows: int = 4096, dist: Distributed | None = None,
          progress: bool = True, max_steps_this_run: int | None = None,
          on_step: Callable[[int, Rows], None] | None = None, callbacks: Sequence[Callback] = ()) -> Result:
    """Train `task` on `source` for settings.steps steps (resuming from the store's checkpoint).

    Args:
        val: held-out rows; their loss (fixed timesteps and noise) is logged at checkpoints and at the end.
        dist: a distributed worker's rank and DDP wrapper; None for a single process.
        max_steps_this_run: stop after this many steps (with a checkpoint), as an interruption would.
        on_step: called after every step with the global step and the batch's rows (fault injection and
            the exactly-once test use it).
        callbacks: rank 0's watchers of the logged rows and the checkpoints (an experiment tracker).
    """

    s = settings
    if s.steps < 1 or s.batch_size < 1:
        raise ValueError(f"train.steps and train.batch_size must be >= 1; got {s.steps} and {s.batch_size}")
    rank, world = (dist.rank, dist.world_size) if dist else (0, 1)
    device = dist.device if dist and dist.device is not None else resolve_device(s.device)
    torch.manual_seed(s.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    generator = torch.Generator(device=device).manual_seed(s.seed + 1 + rank)
    per_rank = max(1, s.batch_size // world)
    stream = BatchStream(source, per_rank, rank=rank, world_size=world, seed=s.seed, window_rows=s.window_rows,
                         prefetch=s.prefetch_windows, workers=s.loader_threads)

    stats = source.embedding_stats(s.stats_rows, seed=s.seed)
    model = task.build(source.dim, stats).to(device)
    if dist is not None:
        model = dist.wrap(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(s))
    ema = EMA(model, s.ema_decay) if s.ema_decay > 0 else None

    step = restored = 0
    last: dict[str, float] = {}
    callbacks = list(callbacks) if rank == 0 else []

    def log_rows(rows: list[dict[str, Any]]) -> None:  # rank 0: the store's log and the callbacks
        for log_to in (store.log, *(cb.on_log for cb in callbacks)):
            log_to(rows)

    if rank:  # each rank its own stream for dropout and the embedding noise (rank 0's is the seed's)
        torch.manual_seed(s.seed + 1_000_003 * rank)
    state = store.load(torch.device("cpu"))  # device-independent: the tensors are copied to the device below
    if state is not None:
        where = getattr(store, "where", None) or "the checkpoint"
        _check_resume(state, task, source, where)
        try:
            unwrap(model).load_state_dict(state["model"])
            if ema is not None:
                ema.load_state_dict(state["ema"])
        except (RuntimeError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{where}: does not fit this model and data ({str(err).splitlines()[0]}); use the "
                            "same config and data, or another run folder (--out)") from None
        try:
            optimizer.load_state_dict(state["optimizer"])
            lr_sched.load_state_dict(state["lr_scheduler"])
            step = restored = int(state["step"])
            last = {k: float(v) for k, v in dict(state.get("metrics") or {}).items()}
            ranks = state.get("rank_rng")
            if not isinstance(ranks, list) or len(ranks) != world:  # a checkpoint of another world size
                ranks = [state["rng"]] * world
            rng = dict(ranks[rank])
            if rank and not isinstance(state.get("rank_rng"), list):
                rng.pop("torch", None)  # rank 0's global stream is not this rank's
                rng.pop("cuda", None)
            gens = state.get("rank_generators")
            if isinstance(gens, list) and len(gens) == world:
                rng["generator"] = gens[rank]
            _restore_rng(rng, generator, device, seed=s.seed + 1_000_003 * rank, step=step, where=where)
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise UserError(f"{where}: a damaged training state ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); delete it to train from scratch"
                            ) from None
        for cb in callbacks:
            cb.on_resume(state)
        log.info("resuming at step %d (%s)", step, stream.position(step))

    val_batch = None
    if val is not None and val.count:
        val_batch = to_batch(Rows.concat(list(_take(val, val_rows)), val.dim), device)

    def checkpoint_state() -> dict[str, Any]:
        rng = _rng_state(generator, device)
        ranks = dist.gather(rng) if dist else [rng]  # CPU tensors: gathered as objects over any backend
        return {"task": task.describe(), "model": unwrap(model).state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_sched.state_dict(), "step": step, "rng": rng, "rank_rng": ranks,
                "rank_generators": [r["generator"] for r in ranks], "position": stream.position(step),
                "embed_dim": source.dim,
                "metrics": {k: float(v) for k, v in last.items()},
                "stats": {"mean": torch.from_numpy(stats[0]), "std": torch.from_numpy(stats[1])}}

    end = s.steps if max_steps_this_run is None else min(s.steps, step + max_steps_this_run)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    amp = s.amp and device.type == "cuda"
    forward = _Autocast(model, device, amp)
    meter = Throughput(device, s.batch_size, world, flops=task.flops_per_sample(unwrap(model)),
                       peak_flops=peak_flops(device, amp, s.peak_tflops), start_step=step)
    bar = tqdm(total=s.steps, initial=step, disable=not progress or rank != 0, desc=f"train {task.name}",
               dynamic_ncols=True)
    batches = stream.batches(step)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(s.threads, s.loader_threads))
    log.info("training on %s with %d torch thread(s)", device, torch.get_num_threads())
    try:
        while step < end:
            rows = next(batches)
            batch = to_batch(rows, device)
            forward.train()
            loss, parts = task.loss(forward, batch, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip > 0:
                parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip).detach()
            optimizer.step()
            lr_sched.step()
            if ema is not None:
                ema.update(model)
            step += 1
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums[k] + v.float() if k in sums else v.float().clone()
            count += 1
            bar.update(1)
            if on_step is not None:
                on_step(step, rows)
            if step == restored + 3:  # throughput after the first steps (allocations, DDP set-up)
                meter.restart(step)
            if step % max(1, s.log_every) == 0 or step == s.steps:
                values = torch.stack(list(sums.values())).cpu().tolist()  # the one transfer per log step
                last = {k: v / count for k, v in zip(sums, values, strict=True)}
                sums, count = {}, 0
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"non-finite loss {last['loss']} before step {step}; lower the "
                                             "learning rate (train.lr) or check the inputs")
                bar.set_postfix(loss=f"{last['loss']:.4f}")
                if rank == 0:
                    log_rows([{"step": step, **last, "lr": lr_sched.get_last_lr()[0],
                                "elapsed_s": round(meter.elapsed(), 3)}])
            validate = s.validate_every and step % s.validate_every == 0
            if step % max(1, s.checkpoint_every) == 0 or step == end or validate:
                meter.pause()  # validation and checkpoints do not count as training time
                if val_batch is not None and (validate or not s.validate_every):
                    v = validation_loss(task, _Autocast(ema.module if ema else unwrap(model), device, amp),
                                        val_batch, seed=s.seed)
                    last.update(v)
                    if rank == 0:
                        log_rows([{"step": step, **v}])
                if step % max(1, s.checkpoint_every) == 0 or step == end:
                    last.update(meter.report(step))
                    saved = checkpoint_state()
                    for cb in callbacks:
                        cb.on_checkpoint(saved)
                    store.save(saved, {"step": step, **last, "restored_from_step": restored})
                meter.resume()
    finally:
        bar.close()
        batches.close()
        torch.set_num_threads(threads)
    result_model = (ema.module if ema is not None else unwrap(model)).eval()
    if state is not None and step == restored and val_batch is not None:  # nothing left to train
        last.update(validation_loss(task, _Autocast(result_model, device, amp), val_batch, seed=s.seed))
    return Result(model=result_model, step=step, metrics=last, restored_from_step=restored,
                  samples_per_s=float(last.get("samples_per_s", 0.0)), stats=stats)


def _take(source: DataSource, n: int):
    got = 0
    for rows in source.iter_rows():
        yield rows.take(slice(0, n - got))
        got += min(len(rows), n - got)
        if got >= n:
            return


@torch.no_grad()
def validation_loss(task: Task, model: nn.Module, batch: dict[str, Any], *, seed: int = 0,
                    chunk: int = 1024) -> dict[str, float]:
    """The task's loss on held-out rows with a fixed generator (comparable across steps and runs)."""
    was = model.training
    model.eval()
    device = batch["embedding"].device
    g = torch.Generator(device=device).manual_seed(seed + 12345)
    totals: dict[str, float] = {}
    n = len(batch["embedding"])
    for i in range(0, n, chunk):
        part = {k: (v[i:i + chunk] if hasattr(v, "__getitem__") else v) for k, v in batch.items()}
        loss, parts = task.loss(model, part, g)
        m = len(part["embedding"])
        for k, v in {"loss": loss, **parts}.items():
            totals[k] = totals.get(k, 0.0) + float(v) * m
    out = {f"val_{k}": v / max(n, 1) for k, v in totals.items()}
    out.update({f"val_{k}": float(v) for k, v in task.validation_metrics(model, batch).items()})
    model.train(was)
    return out
