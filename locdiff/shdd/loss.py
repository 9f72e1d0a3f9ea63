"""SHDD-KL and the coefficient-space MSE, the two objectives compared in the model's ablation.

SHDD-KL turns a coefficient vector into a distribution over a fixed grid G (a Fibonacci lattice: equal
cell weights) by p_c(g) = softmax_g(f_c(g) / tau) and returns KL(p_target || p_pred). One matrix product
per batch. tau defaults to a quarter of the peak value of a clean code, (L+1)^2 / (4 pi) / 4, which makes
the target distribution a bump about 0.7/L radians wide, resolved by the default grid of 8 (L+1)^2 points.

Note (LOCDIFF.md, measured): KL alone does not see the l = 0 coefficient (softmax is shift invariant) and
rewards inflating the scale through the temperature; train with KL plus MSE, or pin those otherwise.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch

from locdiff.shdd.basis import spherical_harmonics
from locdiff.shdd.codec import SHDD
from locdiff.shdd.grid import fibonacci_lattice

Reduction = Literal["mean", "sum", "none"]


@lru_cache(maxsize=8)
def _grid_basis(degree: int, n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    lat, lon = fibonacci_lattice(n)
    return spherical_harmonics(lat, lon, degree).to(dtype=dtype, device=device)  # (n, D)


def default_tau(degree: int) -> float:
    return (degree + 1) ** 2 / (4 * math.pi) / 4


def _reduce(x: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> int:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape; got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    return SHDD.from_dim(pred.shape[-1], name="pred").degree


def kl_loss(pred: torch.Tensor, target: torch.Tensor, *, tau: float | None = None,
            grid_size: int | None = None, reduction: Reduction = "mean") -> torch.Tensor:
    """SHDD-KL: KL(p_target || p_pred) over a Fibonacci grid; pred and target are (..., D) raw SHDD codes.

    Args:
        tau: temperature in units of f (default `default_tau(L)`).
        grid_size: grid points (default 8 (L+1)^2).
    """
    degree = _check_pair(pred, target)
    tau = default_tau(degree) if tau is None else float(tau)
    if tau <= 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    n = grid_size or 8 * (degree + 1) ** 2
    basis = _grid_basis(degree, n, pred.dtype, str(pred.device))  # (G, D)
    log_p_pred = torch.log_softmax(pred @ basis.T / tau, dim=-1)  # (..., G)
    with torch.no_grad():
        log_p_tgt = torch.log_softmax(target.to(pred.dtype) @ basis.T / tau, dim=-1)
    kl = (log_p_tgt.exp() * (log_p_tgt - log_p_pred)).sum(-1)
    return _reduce(kl, reduction)


def mse_loss(pred: torch.Tensor, target: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Mean squared error per coefficient, averaged over the D coefficients of each vector."""
    _check_pair(pred, target)
    return _reduce(((pred - target.to(pred.dtype)) ** 2).mean(-1), reduction)
