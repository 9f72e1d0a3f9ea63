"""Calibrated confidence: a monotone map from a raw score to the observed frequency of being right.

`IsotonicCalibrator.fit(score, hit)` fits the isotonic (non-decreasing) regression of hit (0/1) on score
by pool-adjacent-violators; applying it is constant on each fitted block and linear between blocks. Among images
given confidence p, about p of them are then right, on data like the data it was fitted on. It is stored
as plain JSON (`to_json` / `from_json`), never pickled.

`reliability(confidence, hit)` bins confidences and gives each bin's mean confidence and accuracy, and
the expected calibration error ECE = sum_b (n_b / N) |accuracy_b - confidence_b|.

`LogisticModel.fit(features, hit)` fits P(hit | features) by L2-regularised logistic regression on standardised
features (the objective of scikit-learn's default `LogisticRegression`, C = 1); also plain JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize
from scipy.special import expit, log_expit


@dataclass
class IsotonicCalibrator:
    """Knots (x, y) of a non-decreasing piecewise-linear map; constant beyond the first and last knot."""

    x: np.ndarray = field(default_factory=lambda: np.zeros(0))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n: int = 0  # fitted rows

    @classmethod
    def fit(cls, score: ArrayLike, hit: ArrayLike) -> IsotonicCalibrator:
        """Fit on scores (N,) and outcomes (N,) in {0, 1} (or frequencies in [0, 1])."""
        s = np.asarray(score, np.float64).reshape(-1)
        h = np.asarray(hit, np.float64).reshape(-1)
        if s.shape != h.shape:
            raise ValueError(f"score and hit must have the same length; got {s.size} and {h.size}")
        ok = np.isfinite(s) & np.isfinite(h)
        s, h = s[ok], h[ok]
        if s.size == 0:
            raise ValueError("no finite scores to calibrate on")
        order = np.argsort(s, kind="stable")
        s, h = s[order], h[order]
        # equal scores form one block from the start
        xs, first = np.unique(s, return_index=True)
        counts = np.diff(np.append(first, s.size)).astype(np.float64)
        sums = np.add.reduceat(h, first)
        # pool adjacent violators on (sum, count); a block spans the scores [lo, hi]
        lo, hi, bs, bn = [], [], [], []
        for x, sm, c in zip(xs, sums, counts, strict=True):
            lo.append(x)
            hi.append(x)
            bs.append(sm)
            bn.append(c)
            while len(bs) > 1 and bs[-2] / bn[-2] >= bs[-1] / bn[-1]:
                sm2, c2, h2 = bs.pop(), bn.pop(), hi.pop()
                lo.pop()
                bs[-1] += sm2
                bn[-1] += c2
                hi[-1] = h2
        y = np.asarray(bs) / np.asarray(bn)
        # knots at both ends of every block: constant on a block, linear between blocks (as scikit-learn)
        x_knots = np.column_stack([lo, hi]).reshape(-1)
        return cls(x=x_knots, y=np.repeat(y, 2), n=int(s.size))

    def __call__(self, score: ArrayLike) -> np.ndarray:
        s = np.asarray(score, np.float64)
        if self.x.size == 0:
            return np.clip(s, 0.0, 1.0)
        return np.clip(np.interp(s, self.x, self.y), 0.0, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "isotonic", "x": [float(v) for v in self.x], "y": [float(v) for v in self.y],
                "n": self.n}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> IsotonicCalibrator:
        if data.get("kind") != "isotonic":
            raise ValueError(f"unknown calibrator kind {data.get('kind')!r}")
        x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"], np.float64)
        if x.shape != y.shape or x.ndim != 1 or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
            raise ValueError("calibration knots must be two non-decreasing lists of the same length")
        if not (np.isfinite(x).all() and np.isfinite(y).all() and ((y >= 0) & (y <= 1)).all()):
            raise ValueError("calibration knots must be finite, with probabilities y in [0, 1]")
        return cls(x=x, y=y, n=int(data.get("n", 0)))


def reliability(confidence: ArrayLike, hit: ArrayLike, bins: int = 10) -> dict[str, Any]:
    """Equal-width confidence bins: per bin the count, mean confidence and accuracy; and the ECE.

    Returns {"bins": [{"lo", "hi", "count", "confidence", "accuracy"}...], "ece": float, "n": int}
    (empty bins are listed with count 0 and NaN means)."""
    p = np.asarray(confidence, np.float64).reshape(-1)
    h = np.asarray(hit, np.float64).reshape(-1)
    if p.shape != h.shape:
        raise ValueError(f"confidence and hit must have the same length; got {p.size} and {h.size}")
    ok = np.isfinite(p) & np.isfinite(h)
    p, h = np.clip(p[ok], 0.0, 1.0), h[ok]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    out, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        k = int(sel.sum())
        conf = float(p[sel].mean()) if k else float("nan")
        acc = float(h[sel].mean()) if k else float("nan")
        if k:
            ece += k / p.size * abs(acc - conf)
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": k, "confidence": conf,
                    "accuracy": acc})
    return {"bins": out, "ece": float(ece) if p.size else float("nan"), "n": int(p.size)}


def expected_calibration_error(confidence: ArrayLike, hit: ArrayLike, bins: int = 10) -> float:
    """ECE over `bins` equal-width bins (see `reliability`)."""
    return reliability(confidence, hit, bins)["ece"]


def cross_fitted(score: ArrayLike, hit: ArrayLike, folds: int = 2) -> np.ndarray:
    """Calibrated confidences where each row's calibrator was fitted on the other folds (rows dealt to
    folds by index): an honest in-sample estimate of how well the calibration generalises."""
    s = np.asarray(score, np.float64).reshape(-1)
    h = np.asarray(hit, np.float64).reshape(-1)
    out = np.full(s.shape, np.nan)
    fold = np.arange(s.size) % folds
    for f in range(folds):
        train = fold != f
        if train.sum() and (~train).sum():
            out[~train] = IsotonicCalibrator.fit(s[train], h[train])(s[~train])
    return out


@dataclass
class LogisticModel:
    """P(hit | x) = sigmoid(coef . (x - mean) / scale + intercept), from several raw features per row."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    n: int = 0  # fitted rows

    @classmethod
    def fit(cls, features: ArrayLike, hit: ArrayLike, *, c: float = 1.0) -> LogisticModel:
        """Minimise 0.5 |coef|^2 + c * sum of the log losses (the intercept is not penalised), on features
        (N, F) standardised by their mean and standard deviation, and outcomes (N,) in {0, 1}."""
        x = np.asarray(features, np.float64)
        y = np.asarray(hit, np.float64).reshape(-1)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"features must be (N, F) with N = {len(y)} outcomes; got {x.shape}")
        if not (np.isfinite(x).all() and np.isin(y, (0.0, 1.0)).all()):
            raise ValueError("features must be finite and outcomes 0 or 1")
        if len(y) == 0 or y.min() == y.max():
            raise ValueError("the outcomes need both classes to fit a logistic model")
        mean, scale = x.mean(0), x.std(0)
        scale = np.where(scale > 1e-12, scale, 1.0)
        z = (x - mean) / scale
        sign = 2.0 * y - 1.0

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            margin = sign * (z @ w[:-1] + w[-1])
            loss = 0.5 * float(w[:-1] @ w[:-1]) - c * float(log_expit(margin).sum())
            r = -c * sign * expit(-margin)  # d loss / d (z @ w + b)
            return loss, np.append(w[:-1] + z.T @ r, r.sum())

        w = minimize(objective, np.zeros(z.shape[1] + 1), jac=True, method="L-BFGS-B",
                     options={"maxiter": 1000, "gtol": 1e-10}).x
        return cls(mean=mean, scale=scale, coef=w[:-1], intercept=float(w[-1]), n=int(len(y)))

    def logit(self, features: ArrayLike) -> np.ndarray:
        """log P / (1 - P) per row of features (N, F)."""
        return ((np.asarray(features, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def __call__(self, features: ArrayLike) -> np.ndarray:
        return expit(self.logit(features))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "logistic", "mean": [float(v) for v in self.mean], "scale": [float(v) for v in self.scale],
                "coef": [float(v) for v in self.coef], "intercept": float(self.intercept), "n": self.n}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LogisticModel:
        """The model from `to_json`'s dict, checked (the file is untrusted): ValueError when damaged."""
        if not isinstance(data, dict) or data.get("kind") != "logistic":
            raise ValueError(f"unknown model kind {data.get('kind') if isinstance(data, dict) else data!r}")
        mean, scale, coef = (_numbers(data.get(k), k) for k in ("mean", "scale", "coef"))
        intercept = data.get("intercept")
        if not (isinstance(intercept, (int, float)) and not isinstance(intercept, bool)):
            raise ValueError("intercept must be a number")
        intercept = _numbers([intercept], "intercept")[0]
        n = data.get("n", 0)
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= 10**12):
            raise ValueError("n must be a whole number of fitted rows")
        if not (len(mean) == len(scale) == len(coef) and np.all(scale > 0)):
            raise ValueError("mean, scale and coef must be lists of one length, scale > 0")
        return cls(mean=mean, scale=scale, coef=coef, intercept=float(intercept), n=n)


LOGISTIC_MAX_FEATURES = 256  # a stored model with more is refused (the file is untrusted)


def _numbers(values: Any, name: str) -> np.ndarray:
    """A stored list of finite numbers (not strings, not booleans) as float64; ValueError otherwise."""
    if not (isinstance(values, list) and 0 < len(values) <= LOGISTIC_MAX_FEATURES
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise ValueError(f"{name} must be a list of 1 to {LOGISTIC_MAX_FEATURES} numbers")
    try:
        out = np.asarray(values, np.float64)
    except OverflowError:
        raise ValueError(f"{name} holds a number too large") from None
    if not np.isfinite(out).all():
        raise ValueError(f"{name} must be finite")
    return out
