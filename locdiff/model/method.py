"""LocDiffMethod: LocDiff and LocDiff-H behind the GeoMethod interface of `locdiff train/predict`.

Run directory layout (besides config.yaml, written by the CLI):
    checkpoint.pt     training state (model, EMA, optimizer, step, RNG) - resumable
    metrics.jsonl     training log
    model.pt          the EMA denoiser for prediction (state dict, dimensions)
    gallery.npz       training embeddings and locations, the LocDiff-H retrieval gallery
    selection.json    choices made on validation: aggregation, LocDiff-H weight and radius, and scores
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locdiff.methods import GeoMethod, Prediction
from locdiff.metrics import geo_metrics
from locdiff.model.config import Config, config_from_dict, config_to_dict
from locdiff.model.csunet import CSUNet
from locdiff.model.hybrid import Gallery, hybrid_candidates, hybrid_select
from locdiff.model.predict import locdiff_predict
from locdiff.model.train import build_model, fit, resolve_device
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)

PREDICT_METHODS = ("locdiff", "locdiff-h")


def _score(m: dict[str, float]) -> float:
    """One number to choose settings on validation: the sum of the accuracies at all thresholds."""
    return float(sum(v for k, v in m.items() if k.startswith("acc_")))


class LocDiffMethod(GeoMethod):
    name = "locdiff"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.model: CSUNet | None = None
        self.gallery: Gallery | None = None
        self.selection: dict[str, Any] = {}
        self._gallery_path: Path | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | Config) -> LocDiffMethod:
        return cls(config if isinstance(config, Config) else config_from_dict(config))

    # -- training --------------------------------------------------------------------------------------
    def fit(
        self, train: EmbeddingTable, val: EmbeddingTable | None, run_dir: Path, *, progress: bool = True
    ) -> dict[str, float]:
        run_dir = Path(run_dir)
        result = fit(self.config, train, val, run_dir, progress=progress)
        self.model = result.model
        self.gallery = Gallery(train.embedding, train.lat, train.lon)
        metrics = dict(result.metrics)
        sel_path = run_dir / "selection.json"
        old = json.loads(sel_path.read_text()) if sel_path.exists() else {}
        if old.get("step") == result.step:
            self.selection = old  # already chosen for these weights (a re-run after completion)
        else:
            self.selection = {
                "step": result.step,
                "aggregation": "mean",
                "hybrid_weight": self.config.hybrid.weight,
                "hybrid_radius_km": self.config.hybrid.radius_km,
            }
            if val is not None and val.labelled and len(val):
                self._select_on_validation(val, progress=progress)
        metrics.update(
            {k: v for k, v in self.selection.items() if isinstance(v, float) and k.startswith("val_")}
        )
        self.save(run_dir)
        return metrics

    def _select_on_validation(self, val: EmbeddingTable, *, progress: bool) -> None:
        n = min(len(val), self.config.train.val_samples)
        out = locdiff_predict(
            self.model, val.embedding[:n], self.config, seed=self.config.train.seed, progress=progress
        )
        truth = (val.lat[:n], val.lon[:n])
        scores = {}
        for agg in ("mean", "support"):
            lat, lon, _ = out.choose(agg)
            m = geo_metrics(lat, lon, *truth)
            scores[agg] = m
            self.selection[f"val_{agg}_score"] = _score(m)
            self.selection[f"val_{agg}_median_km"] = m["median_km"]
        cfg_agg = self.config.predict.aggregation
        agg = cfg_agg if cfg_agg != "auto" else max(scores, key=lambda a: _score(scores[a]))
        self.selection["aggregation"] = agg
        hc = self.config.hybrid
        if hc.tune_on_val:
            mlat, mlon, _ = out.choose("mean")
            cand = hybrid_candidates(
                self.gallery, val.embedding[:n], out.mean_code, mlat, mlon, out.mean_value, hc.top_k
            )
            best = (-np.inf, hc.weight, hc.radius_km)
            for w in (0.0, 0.25, 0.5, 0.75, 0.9):
                for r in (250.0, 500.0, 1000.0, 2500.0):
                    lat, lon, _ = hybrid_select(cand, mlat, mlon, weight=w, radius_km=r)
                    s = _score(geo_metrics(lat, lon, *truth))
                    if s > best[0]:
                        best = (s, w, r)
            self.selection.update(
                {"hybrid_weight": best[1], "hybrid_radius_km": best[2], "val_hybrid_score": best[0]}
            )
        log.info("validation choices: %s", self.selection)

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> None:
        if self.model is None:
            raise ValueError("nothing to save: the method is not trained")
        run_dir = Path(run_dir)
        tmp = run_dir / "model.pt.tmp"
        torch.save(
            {
                "state_dict": self.model.state_dict(),
                "dim": self.model.dim,
                "embed_dim": self.model.embed_dim,
                "config": config_to_dict(self.config),
            },
            tmp,
        )
        tmp.replace(run_dir / "model.pt")
        if self.gallery is not None:
            with open(run_dir / "gallery.npz.tmp", "wb") as f:
                np.savez(f, embedding=self.gallery.embedding, lat=self.gallery.lat, lon=self.gallery.lon)
            (run_dir / "gallery.npz.tmp").replace(run_dir / "gallery.npz")
        (run_dir / "selection.json").write_text(json.dumps(self.selection, indent=2))

    @classmethod
    def load(cls, run_dir: Path, config: dict[str, Any] | Config) -> LocDiffMethod:
        run_dir = Path(run_dir)
        self = cls.from_config(config)
        path = run_dir / "model.pt"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir}: no model.pt; the LocDiff run has not finished training")
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model = build_model(self.config, int(blob["embed_dim"]))
        model.load_state_dict(blob["state_dict"])
        self.model = model.to(resolve_device(self.config.train.device)).eval()
        sel = run_dir / "selection.json"
        self.selection = json.loads(sel.read_text()) if sel.exists() else {}
        self._gallery_path = run_dir / "gallery.npz"
        return self

    def _get_gallery(self) -> Gallery:
        if self.gallery is None:
            if self._gallery_path is None or not self._gallery_path.is_file():
                raise FileNotFoundError("no retrieval gallery (gallery.npz) in the run; LocDiff-H needs it")
            with np.load(self._gallery_path) as z:
                self.gallery = Gallery(z["embedding"], z["lat"], z["lon"])
        return self.gallery

    # -- prediction ------------------------------------------------------------------------------------
    def predict(
        self,
        table: EmbeddingTable,
        *,
        method: str = "locdiff",
        samples: int | None = None,
        steps: int | None = None,
        aggregation: str | None = None,
        seed: int = 0,
        guidance_scale: float | None = None,
        progress: bool = False,
        **options: Any,
    ) -> Prediction:
        """Predict with LocDiff ("locdiff") or LocDiff-H ("locdiff-h"), K samples and S DDIM steps."""
        if options:
            raise ValueError(f"unknown predict options for locdiff: {', '.join(options)}")
        if method not in PREDICT_METHODS:
            raise ValueError(f"method must be one of {', '.join(PREDICT_METHODS)}; got {method!r}")
        if self.model is None:
            raise ValueError("the method is not trained; fit or load it first")
        if table.dim != self.model.embed_dim:
            raise ValueError(
                f"{table.source or 'table'}: column 'embedding' has dimension {table.dim}; the "
                f"model was trained on dimension {self.model.embed_dim}"
            )
        agg = aggregation or self.selection.get("aggregation", "mean")
        if agg == "auto":
            agg = self.selection.get("aggregation", "mean")
        out = locdiff_predict(
            self.model,
            table.embedding,
            self.config,
            samples=samples,
            steps=steps,
            seed=seed,
            guidance_scale=guidance_scale,
            progress=progress,
        )
        lat, lon, conf = out.choose(agg)
        if method == "locdiff-h":
            hc = self.config.hybrid
            mlat, mlon, _ = out.choose("mean")
            cand = hybrid_candidates(
                self._get_gallery(), table.embedding, out.mean_code, mlat, mlon, out.mean_value, hc.top_k
            )
            lat, lon, _ = hybrid_select(
                cand,
                lat,
                lon,
                weight=self.selection.get("hybrid_weight", hc.weight),
                radius_km=self.selection.get("hybrid_radius_km", hc.radius_km),
            )
        return Prediction(
            lat=np.asarray(lat, np.float64),
            lon=np.asarray(lon, np.float64),
            confidence=np.asarray(conf, np.float64),
        )
