"""LocDiffMethod: LocDiff and LocDiff-H behind the GeoMethod interface of `locdiff train/predict`.

Training is the engine's (locdiff.engine) on `LocDiffTask`; after it, `finalize` chooses the aggregation
and the LocDiff-H blend on validation rows, calibrates the confidence there, records the retrieval gallery
of the training data and saves the predictor (the EMA denoiser as safetensors) into the run folder
(layout: locdiff.runs).

Confidence: the raw score of an answer is the share of the predicted density (the mean sampled code,
locdiff.shdd.modes) within `predict.confidence_radius_km` of it; an isotonic map fitted on the validation
rows (locdiff.calibration) turns it into the probability that the truth lies within that radius. The map
is stored, per prediction method, in selection.json; a run without validation rows reports the raw score.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from locdiff import engine
from locdiff.calibration import IsotonicCalibrator, LogisticModel, cross_fitted, expected_calibration_error
from locdiff.data.datasource import DataSource
from locdiff.engine import resolve_device
from locdiff.errors import CorruptFileError
from locdiff.gallery import Gallery, gallery_for_run
from locdiff.geo import haversine_km
from locdiff.hashing import stable_hash
from locdiff.io import MAX_EMBED_ABS
from locdiff.methods import GeoMethod, Prediction
from locdiff.metrics import geo_metrics
from locdiff.model.config import HALF_EARTH_KM, Config, check_predict_options, config_from_dict, config_to_dict
from locdiff.model.csunet import CSUNet
from locdiff.model.hybrid import (
    CONSENSUS_TOP,
    NOVELTY_FEATURES,
    POE_DEFAULT,
    SELECTION_RULE,
    PoECandidates,
    choose_blend,
    choose_poe,
    concat_candidates,
    hybrid_candidates,
    hybrid_select,
    poe_candidates,
    poe_select,
)
from locdiff.model.objective import LocDiffTask, build_model, engine_settings
from locdiff.model.predict import LocDiffOutput, locdiff_predict
from locdiff.runs import SELECTION, WEIGHTS, RunFolder
from locdiff.shdd.modes import mass_within
from locdiff.tables import EmbeddingTable

log = logging.getLogger(__name__)

PREDICT_METHODS = ("locdiff", "locdiff-h")


def _check_embedding_stats(tensors: dict[str, Any], path: Path) -> None:
    """CorruptFileError naming `path` and the tensor unless the embedding standardisation the weights carry can
    work (their finiteness is `RunFolder.load_model`'s): emb_mean within +-MAX_EMBED_ABS (the embeddings' own
    bound), emb_std at least 1e-6 (what training writes, `CSUNet.set_embedding_stats`); else every answer is
    NaN (a zero std) or the network overflows."""
    floor = torch.tensor(1e-6, dtype=torch.float32)
    for name, ok, what in (("emb_mean", lambda t: t.double().abs() <= MAX_EMBED_ABS, f"within +-{MAX_EMBED_ABS:g}"),
                           ("emb_std", lambda t: t.float() >= floor, ">= 1e-6")):
        t = tensors.get(name)
        if t is not None and not bool(ok(t).all()):
            raise CorruptFileError(path, f"{path}: tensor {name} is not {what} everywhere; the file is damaged: "
                                         "train again into a new --out")


def _score(m: dict[str, float]) -> float:
    """One number to choose settings on validation: the sum of the accuracies at all thresholds."""
    return float(sum(v for k, v in m.items() if k.startswith("acc_")))


class LocDiffMethod(GeoMethod):
    name = "locdiff"

    def __init__(self, config: Config) -> None:
        self.config = config
        self.model: CSUNet | None = None
        self.gallery: Gallery | None = None
        self.gallery_ref: dict[str, Any] | None = None
        self.selection: dict[str, Any] = {}
        self._run: RunFolder | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any] | Config) -> LocDiffMethod:
        return cls(config if isinstance(config, Config) else config_from_dict(config))

    # -- training --------------------------------------------------------------------------------------
    def task(self, source: DataSource) -> LocDiffTask:
        return LocDiffTask(self.config, getattr(source, "shdd_degree", None))

    def settings(self, source: DataSource) -> engine.Settings:
        return engine_settings(self.config)

    def finalize(self, result: engine.Result | None, source: DataSource, val: DataSource | None, run: RunFolder,
                 *, progress: bool = True) -> dict[str, float]:
        self.model = result.model
        self._run = run
        self.gallery, self.gallery_ref = gallery_for_run(source, run.path, self.config.gallery, progress=progress)
        metrics = dict(result.metrics)
        old = run.read_json(SELECTION, default={}) if run.file(SELECTION).exists() else {}
        # what the choices depend on besides the weights and the validation rows: a resumable change of these
        # (train.val_samples, predict.*, hybrid.*) chooses again
        settings = stable_hash({"val_samples": self.config.train.val_samples, "rule": SELECTION_RULE,
                                **{k: v for k, v in config_to_dict(self.config).items() if k in ("predict", "hybrid")}})
        unseen = self.val_unseen if val is not None and val.count else None
        unseen_id = unseen.identity() if unseen is not None else None
        if (old.get("step") == result.step and old.get("val") == (val.identity() if val is not None else None)
                and old.get("val_unseen") == unseen_id
                and old.get("settings") == settings and (val is None or "calibration" in old)):
            self.selection = old  # already chosen for these weights (a re-run after completion)
        else:
            self.selection = {"step": result.step, "aggregation": "mean",
                              "hybrid_mode": self.config.hybrid.mode, "hybrid_poe": dict(POE_DEFAULT),
                              "hybrid_weight": self.config.hybrid.weight,
                              "hybrid_radius_km": self.config.hybrid.radius_km,
                              "val": val.identity() if val is not None else None, "val_unseen": unseen_id,
                              "settings": settings}
            if val is not None and val.count:
                limit = self.config.train.val_samples
                self._select_on_validation(val.read_all(limit=limit), progress=progress,
                                           unseen=unseen.read_all(limit=limit) if unseen is not None else None)
        metrics.update({k: v for k, v in self.selection.items() if isinstance(v, float) and k.startswith("val_")})
        self.save(run.path)
        return metrics

    def _select_on_validation(self, val: EmbeddingTable, *, progress: bool,
                              unseen: EmbeddingTable | None = None) -> None:
        """The aggregation, LocDiff-H's parameters (the product of experts on `val` and `unseen` together,
        each weighing half) and the confidence maps, chosen on validation rows."""
        self.selection["val_rows"] = int(len(val.lat))
        out = locdiff_predict(self.model, val.embedding, self.config, seed=self.config.train.seed,
                              progress=progress)
        truth = (val.lat, val.lon)
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
            cand = hybrid_candidates(self.gallery, val.embedding, out.mean_code, mlat, mlon, out.mean_value,
                                     hc.top_k)
            blend = choose_blend(cand, mlat, mlon, *truth)
            alat, alon, _ = out.choose(agg)
            parts = [self._poe_candidates(out, val.embedding, alat, alon)]
            plat, plon, groups = [val.lat], [val.lon], [np.zeros(len(val.lat))]
            if unseen is not None and len(unseen.lat):
                parts.append(self.candidates(unseen, progress=progress))
                plat, plon, groups = [*plat, unseen.lat], [*plon, unseen.lon], [*groups, np.ones(len(unseen.lat))]
                self.selection["val_unseen_rows"] = int(len(unseen.lat))
            poe = choose_poe(concat_candidates(parts), np.concatenate(plat), np.concatenate(plon),
                             np.concatenate(groups), tolerance=hc.poe_tolerance)
            self.selection.update({"hybrid_weight": blend["weight"], "hybrid_radius_km": blend["radius_km"],
                                   "hybrid_poe": {k: poe[k] for k in POE_DEFAULT},
                                   "hybrid_signal": "learned" if poe["novelty"] else "s_top",
                                   "hybrid_novelty": poe["novelty"].to_json() if poe["novelty"] else None,
                                   "val_hybrid_score": blend["score"], "val_poe_score": poe["score"],
                                   "val_poe_shortfall": poe["shortfall"],
                                   "val_locdiff_score": poe["locdiff_score"],
                                   "val_poe_retrieval_score": poe["retrieval_score"],
                                   "val_retrieval_score": blend["retrieval_score"]})
        self._calibrate(out, val)
        log.info("validation choices: %s", {k: v for k, v in self.selection.items() if k != "calibration"})

    def _calibrate(self, out: LocDiffOutput, val: EmbeddingTable) -> None:
        """Fit the confidence map of each prediction method on the validation rows (module docstring).
        Also records the ECE of the raw score and a cross-fitted (2-fold) ECE of the calibrated one."""
        radius = self.config.predict.confidence_radius_km
        cal: dict[str, Any] = {"radius_km": radius, "score": "density mass within radius_km of the answer",
                               "methods": {}}
        for name in PREDICT_METHODS:
            lat, lon = self._answers(out, val.embedding, name)
            score = mass_within(out.mean_code, lat, lon, radius)
            hit = (np.asarray(haversine_km(lat, lon, val.lat, val.lon)) <= radius).astype(np.float64)
            fitted = IsotonicCalibrator.fit(score, hit)
            cal["methods"][name] = {**fitted.to_json(), "base_rate": float(hit.mean()),
                                    "ece_raw": expected_calibration_error(score, hit),
                                    "ece_crossfit": expected_calibration_error(cross_fitted(score, hit), hit)}
        self.selection["calibration"] = cal
        self.selection["val_ece"] = cal["methods"]["locdiff"]["ece_crossfit"]

    @property
    def confidence_radius_km(self) -> float:
        """The radius the confidence refers to (the calibration's, else the config's)."""
        cal = self.selection.get("calibration") or {}
        radius = cal.get("radius_km", self.config.predict.confidence_radius_km) if isinstance(cal, dict) else None
        if type(radius) not in (int, float) or not 0 < radius <= HALF_EARTH_KM:
            where = self._run.file(SELECTION) if self._run else SELECTION
            raise ValueError(f"{where}: calibration.radius_km is damaged (not a number of km in (0, "
                             f"{HALF_EARTH_KM:g}]); train again into a new --out")
        return float(radius)

    def calibrator(self, method: str = "locdiff") -> IsotonicCalibrator | None:
        """The validation-fitted confidence map of a prediction method; None when the run has none."""
        try:
            entry = ((self.selection.get("calibration") or {}).get("methods") or {}).get(method)
            if not entry:
                return None
            return IsotonicCalibrator.from_json(entry)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            where = self._run.file(SELECTION) if self._run else SELECTION
            raise ValueError(f"{where}: the confidence calibration of {method!r} is damaged ({err}); train "
                             "again into a new --out") from None

    def _aggregation(self, aggregation: str | None = None) -> str:
        agg = aggregation or self.selection.get("aggregation", "mean")
        return self.selection.get("aggregation", "mean") if agg == "auto" else agg

    def _answers(self, out: LocDiffOutput, emb: np.ndarray, method: str, aggregation: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """The answer of each image for "locdiff" (the chosen aggregation) or "locdiff-h" (the gallery
        candidate LocDiff's density prefers, else the LocDiff answer)."""
        lat, lon, _ = out.choose(self._aggregation(aggregation))
        if method == "locdiff-h" and self._hybrid_mode() == "poe":
            lat, lon = self.place_hybrid(self._poe_candidates(out, emb, lat, lon))
        elif method == "locdiff-h":  # the blend; runs trained before the product of experts have no mode
            hc = self.config.hybrid
            weight, radius_km = self._blend_parameters()
            mlat, mlon, _ = out.choose("mean")
            cand = hybrid_candidates(self.get_gallery(), emb, out.mean_code, mlat, mlon, out.mean_value, hc.top_k)
            lat, lon, _ = hybrid_select(cand, lat, lon, weight=weight, radius_km=radius_km)
        return np.asarray(lat, np.float64), np.asarray(lon, np.float64)

    def _poe_candidates(self, out: LocDiffOutput, emb: np.ndarray, lat: np.ndarray, lon: np.ndarray
                        ) -> PoECandidates:
        """LocDiff-H's candidates: LocDiff's answer (lat, lon) and the gallery's top-k neighbours."""
        return poe_candidates(self.get_gallery(), emb, out.mean_code, lat, lon, self.config.hybrid.top_k)

    def candidates(self, table: EmbeddingTable, *, progress: bool = False) -> PoECandidates:
        """The product of experts' candidates for `table`'s images, as validation computes them (the network
        seeded with the training seed, the chosen aggregation): what `choose_poe` chooses on, for checking
        that choice elsewhere (benchmarks/bench_heldout.py)."""
        out = locdiff_predict(self.model, table.embedding, self.config, seed=self.config.train.seed,
                              progress=progress)
        lat, lon, _ = out.choose(self._aggregation())
        return self._poe_candidates(out, table.embedding, lat, lon)

    def place_hybrid(self, c: PoECandidates) -> tuple[np.ndarray, np.ndarray]:
        """LocDiff-H's answers (lat, lon) on product-of-experts candidates, with the parameters chosen on
        validation (selection.json)."""
        lat, lon, _ = poe_select(c, **self._poe_parameters(), novelty=self._novelty_model())
        return lat, lon

    def _hybrid_mode(self) -> str:
        """LocDiff-H's mode (selection.json `hybrid_mode`; "blend" in runs chosen before the product of experts),
        checked."""
        mode = self.selection.get("hybrid_mode", "blend")
        if not isinstance(mode, str) or mode not in ("poe", "blend"):
            where = self._run.file(SELECTION) if self._run else SELECTION
            raise ValueError(f"{where}: hybrid_mode is damaged (not \"poe\" or \"blend\"); train again into a new "
                             "--out")
        return mode

    def _blend_parameters(self) -> tuple[float, float]:
        """The blend's weight and radius chosen on validation (selection.json), checked: weight in [0, 1], radius
        > 0 km (inf: no radius, plain retrieval)."""
        hc = self.config.hybrid
        weight = self.selection.get("hybrid_weight", hc.weight)
        radius = self.selection.get("hybrid_radius_km", hc.radius_km)
        for key, value, ok, span in (("hybrid_weight", weight, lambda v: 0 <= v <= 1, "[0, 1]"),
                                     ("hybrid_radius_km", radius, lambda v: v > 0, "(0, inf] km")):
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok(value):  # NaN fails `ok`
                where = self._run.file(SELECTION) if self._run else SELECTION
                raise ValueError(f"{where}: {key} is damaged ({str(value)[:40]!r} is not a number in {span}); "
                                 "train again into a new --out")
        return float(weight), float(radius)

    def _poe_parameters(self) -> dict[str, float]:
        """The product-of-experts parameters chosen on validation (selection.json), checked."""
        got = self.selection.get("hybrid_poe") or POE_DEFAULT
        try:
            later = {"core": 0.0, "snap_km": 0.0, "consensus": 0.0, "consensus_density": 1.0,  # runs chosen before
                     "margin": float("inf")}
            prm = {k: float(got[k]) for k in POE_DEFAULT if k not in later}
            prm.update({k: float(got.get(k, v)) for k, v in later.items()})
            if not (prm["bandwidth_km"] > 0 and prm["slope"] > 0 and prm["strength"] >= 0
                    and 0 <= prm["floor"] <= 1 and 0 <= prm["core"] <= 1 and not np.isnan(prm["threshold"])
                    and 0 <= prm["snap_km"] <= HALF_EARTH_KM and 0 <= prm["consensus"] < CONSENSUS_TOP
                    and 0 <= prm["consensus_density"] <= 1 and prm["margin"] >= 0):
                raise ValueError("bandwidth_km and slope must be > 0, strength >= 0, floor, core and "
                                 "consensus_density in [0, 1], threshold a number, snap_km in [0, half the Earth], "
                                 f"consensus in [0, {CONSENSUS_TOP}), margin >= 0 (inf: off)")
        except (ValueError, KeyError, TypeError, OverflowError) as err:
            where = self._run.file(SELECTION) if self._run else SELECTION
            raise ValueError(f"{where}: hybrid_poe is damaged ({err}); train again into a new --out") from None
        return prm

    def _novelty_model(self) -> LogisticModel | None:
        """LocDiff-H's learned novelty signal (selection.json `hybrid_signal` "learned" and its `hybrid_novelty`),
        None where s_top is the signal (also in runs chosen before the learned one existed)."""
        signal, got = self.selection.get("hybrid_signal", "s_top"), self.selection.get("hybrid_novelty")
        try:
            if signal not in ("s_top", "learned") or (signal == "learned") != (got is not None):
                raise ValueError(f"hybrid_signal {signal!r} with {'a' if got is not None else 'no'} model")
            if got is None:
                return None
            model = LogisticModel.from_json(got)
            if len(model.coef) != len(NOVELTY_FEATURES):
                raise ValueError(f"{len(model.coef)} coefficients for {len(NOVELTY_FEATURES)} features")
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as err:
            where = self._run.file(SELECTION) if self._run else SELECTION
            raise ValueError(f"{where}: hybrid_novelty is damaged ({err}); train again into a new --out") from None
        return model

    # -- persistence -----------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> None:
        if self.model is None:
            raise ValueError("nothing to save: the method is not trained")
        run = RunFolder(run_dir)
        run.save_model(self.model.state_dict(), {"method": self.name, "dim": self.model.dim,
                                                 "embed_dim": self.model.embed_dim,
                                                 "config": config_to_dict(self.config),
                                                 "gallery": self.gallery_ref}, selection=self.selection)

    @classmethod
    def load(cls, run_dir: Path, config: dict[str, Any] | Config) -> LocDiffMethod:
        run = RunFolder(run_dir)
        self = cls.from_config(config)
        tensors, meta = run.load_model()
        _check_embedding_stats(tensors, run.file(WEIGHTS))
        # sizes and shapes are checked on the meta device before the model is allocated
        model = build_model(self.config, meta["embed_dim"], weights=tensors, source=str(run.path))
        model.load_state_dict(tensors)
        self.model = model.to(resolve_device(self.config.train.device)).eval()
        self.selection = run.read_selection()
        self.gallery_ref = meta.get("gallery")  # resolved by load_model: inside the folder or local, never a URL
        self._run = run
        return self

    def get_gallery(self) -> Gallery:
        """The run's retrieval gallery (LocDiff-H's neighbours), loaded on first use."""
        if self.gallery is None:
            if not self.gallery_ref:
                raise FileNotFoundError(f"{self._run.path if self._run else 'the run'}: no retrieval gallery is "
                                        "recorded; LocDiff-H needs one (train again)")
            self.gallery = Gallery.load(self.gallery_ref, nprobe=self.config.gallery.nprobe)
        return self.gallery

    # -- prediction ------------------------------------------------------------------------------------
    def predict(self, table: EmbeddingTable, *, method: str = "locdiff", samples: int | None = None,
                steps: int | None = None, aggregation: str | None = None, seed: int = 0,
                guidance_scale: float | None = None, progress: bool = False, **options: Any) -> Prediction:
        """Predict with LocDiff ("locdiff") or LocDiff-H ("locdiff-h"), K samples and S DDIM steps."""
        if options:
            raise ValueError(f"unknown predict options for locdiff: {', '.join(options)}")
        if method not in PREDICT_METHODS:
            raise ValueError(f"method must be one of {', '.join(PREDICT_METHODS)}; got {method!r}")
        if self.model is None:
            raise ValueError("the method is not trained; fit or load it first")
        check_predict_options(self.config, samples=samples, steps=steps, seed=seed)
        if table.dim != self.model.embed_dim:
            raise ValueError(f"{table.source or 'table'}: column 'embedding' has dimension {table.dim}; the "
                             f"model was trained on dimension {self.model.embed_dim}")
        out = locdiff_predict(self.model, table.embedding, self.config, samples=samples, steps=steps, seed=seed,
                              guidance_scale=guidance_scale, progress=progress)
        lat, lon = self._answers(out, table.embedding, method, aggregation)
        score = mass_within(out.mean_code, lat, lon, self.confidence_radius_km)
        calibrate = self.calibrator(method)
        conf = calibrate(score) if calibrate is not None else score
        return Prediction(lat=lat, lon=lon, confidence=np.asarray(conf, np.float64),
                          density_code=out.mean_code.numpy())
