"""What the trained baselines share: the residual MLP, and the base class that trains any of them with the
engine (locdiff.engine) and keeps its weights in the run folder (locdiff.runs, safetensors).

A baseline's `epochs` become engine steps (epochs x ceil(N / batch_size)); the LR schedule is the engine's
(linear warm-up, cosine to 5 %), gradients are clipped at 1, there is no EMA, and a checkpoint is kept
after every epoch, so an interrupted baseline resumes where it stopped and ends with the same weights.
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from locdiff.baselines.options import MLPOptions, parse_options
from locdiff.data.datasource import DataSource
from locdiff.engine import Result, Settings, Task, resolve_device
from locdiff.errors import ConfigError
from locdiff.methods import GeoMethod
from locdiff.model.config import Config, LimitsConfig, config_to_dict
from locdiff.runs import RunFolder
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)


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


def batched(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, batch: int = 4096) -> list[Any]:
    """Apply fn to consecutive slices of x under no_grad."""
    with torch.no_grad():
        return [fn(x[i:i + batch]) for i in range(0, len(x), batch)]


class _BaselineTask(Task):
    def __init__(self, method: TrainedBaseline) -> None:
        self.method = method
        self.name = method.name

    def describe(self) -> dict[str, Any]:
        o = self.method.options
        return {"task": self.name, "hidden": o.hidden, "depth": o.depth}

    def build(self, embed_dim: int, stats: tuple[np.ndarray, np.ndarray]) -> nn.Module:
        with torch.device("meta"):  # counted before anything is allocated
            count = sum(p.numel() for p in self.method.build_net(embed_dim).parameters())
        budget, o = self.method.max_parameters, self.method.options
        if count > budget:
            raise ConfigError("the config", "limits.max_parameters",
                              f"the {self.name} network would have {count:,} parameters (baselines.{self.name}: "
                              f"hidden {o.hidden}, depth {o.depth}; {embed_dim}-d embeddings), above the budget of "
                              f"{budget:,}; choose a smaller network or raise limits.max_parameters on a larger "
                              "machine")
        torch.manual_seed(self.method.options.seed)
        return self.method.build_net(embed_dim)

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator):
        return self.method.loss(model, batch, generator)


class TrainedBaseline(GeoMethod):
    """A baseline trained by the engine. Subclasses set `options_cls` and implement `build_net`, `loss`
    and `predict`; `prepare` (before training) and `extra_tensors` / `load_extra` (what besides the
    network's weights the predictor needs) are optional."""

    options_cls: type[MLPOptions] = MLPOptions

    def __init__(self, options: MLPOptions):
        self.options = options
        self.max_parameters = LimitsConfig().max_parameters  # the run config's, set by from_config
        self.device = resolve_device(options.device)
        self.net: nn.Module | None = None
        self.embed_dim: int | None = None

    @classmethod
    def from_config(cls, config: Config | dict[str, Any]) -> TrainedBaseline:
        if not isinstance(config, dict):
            config = config_to_dict(config)
        limits = config.get("limits")
        budget = limits.get("max_parameters") if isinstance(limits, dict) else None
        method = cls(parse_options(cls.options_cls, config, cls.name))
        if isinstance(budget, int):
            method.max_parameters = budget
        return method

    @abstractmethod
    def build_net(self, embed_dim: int) -> nn.Module:
        """The untrained network."""

    @abstractmethod
    def loss(self, net: nn.Module, batch: dict[str, Any], generator: torch.Generator
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss on a batch (see locdiff.engine.to_batch)."""

    def prepare(self, source: DataSource) -> None:
        """Work before training that needs the data (e.g. geocells)."""

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def extra_meta(self) -> dict[str, Any]:
        return {}

    def load_extra(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what extra_tensors saved."""

    # -- training ----------------------------------------------------------------------------------------
    def task(self, source: DataSource) -> Task:
        if not source.labelled:
            raise ValueError(f"{source.location}: {self.name} needs a labelled training table (columns lat, lon)")
        self.embed_dim = source.dim
        self.prepare(source)
        return _BaselineTask(self)

    def settings(self, source: DataSource) -> Settings:
        o = self.options
        per_epoch = max(1, math.ceil(source.count / o.batch_size))
        return Settings(steps=o.epochs * per_epoch, batch_size=o.batch_size, lr=o.lr, min_lr_ratio=0.05,
                        warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, grad_clip=1.0, ema_decay=0.0,
                        checkpoint_every=per_epoch, log_every=min(per_epoch, 50), seed=o.seed, amp=False,
                        device=o.device)

    def finalize(self, result: Result | None, source: DataSource, val: DataSource | None, run: RunFolder, *,
                 progress: bool = True) -> dict[str, float]:
        self.net = result.model.to(self.device).eval()
        self.save(run.path)
        return {**result.metrics, **self.validation_metrics(val)}

    # -- persistence -------------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> None:
        if self.net is None:
            raise ValueError(f"{self.name}: nothing to save, the method is not fitted")
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors.update({f"extra.{k}": v for k, v in self.extra_tensors().items()})
        RunFolder(run_dir).save_model(tensors, {"method": self.name, "embed_dim": self.embed_dim,
                                                "options": asdict(self.options), **self.extra_meta()})

    @classmethod
    def load(cls, run_dir: Path, config: Config | dict[str, Any]) -> TrainedBaseline:
        tensors, meta = RunFolder(run_dir).load_model()
        if meta.get("method") != cls.name:
            raise ValueError(f"{run_dir}: a {meta.get('method')!r} model, not {cls.name!r}")
        m = cls.from_config(config)
        m.embed_dim = int(meta["embed_dim"])
        m.load_extra({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}, meta)
        m.run_dir = Path(run_dir)
        torch.manual_seed(m.options.seed)
        m.net = m.build_net(m.embed_dim).to(m.device)
        try:
            m.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        except RuntimeError as err:
            raise ValueError(f"{run_dir}: the model weights do not fit the config ({str(err).splitlines()[0]})"
                             ) from None
        m.net.eval()
        return m

    def check_dim(self, table: EmbeddingTable) -> None:
        if self.net is None:
            raise ValueError(f"{self.name}: predict before fit/load")
        if table.dim != self.embed_dim:
            raise ValueError(f"{table.source}: embeddings have dimension {table.dim}, the model expects "
                             f"{self.embed_dim}")
