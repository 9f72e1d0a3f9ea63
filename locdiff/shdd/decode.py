"""Learning-free mode seeking: the argmax of f_c(y) = sum_k c_k Y_k(y) over the sphere.

1. Grid stage. f_c on an equiangular grid of (2L+2) x (4L+4) nodes, computed as a separable spherical
   harmonic synthesis: a Legendre stage (one batched matrix product per order m against a cached
   table Pbar_lm(theta_i)) and a Fourier stage (one matrix product against cached cos/sin(m phi_j)).
   That costs O(B L^3) instead of the O(B L^4) of a matrix product against a full grid basis.
2. Candidates. The `candidates` largest local maxima of the grid (8-neighbourhood, wrapping in lon).
3. Refinement. Newton ascent on the sphere from each candidate: gradient and Hessian from a 9-point
   stencil in the tangent plane, the stencil shrinking each iteration; steps clipped to a trust radius.
   Sub-kilometre for every L (float64 to metres).
4. The refined candidate with the largest f_c wins.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from locdiff.geo import latlon_to_unit, unit_to_latlon
from locdiff.shdd.basis import degree_from_dim, legendre_table, spherical_harmonics
from locdiff.shdd.grid import equiangular_grid


@lru_cache(maxsize=16)
def _synthesis_tables(degree: int, dtype: torch.dtype, device: str):
    """Cached grid tables: Legendre (L+1 orders, L+1 degrees, n_lat), Fourier (2L+1, n_lon), and the
    gather index from flat coefficients to the (order, degree) layout."""
    n_lat, n_lon = equiangular_grid(degree)
    theta = (torch.arange(n_lat, dtype=torch.float64) + 0.5) * math.pi / n_lat  # colatitude
    table = legendre_table(torch.cos(theta), torch.sin(theta), degree)  # (T, n_lat)
    leg = torch.zeros(degree + 1, degree + 1, n_lat, dtype=torch.float64)  # [m, l, i]
    for l in range(degree + 1):
        leg[: l + 1, l] = table[l * (l + 1) // 2 : l * (l + 1) // 2 + l + 1]
    phi = torch.arange(n_lon, dtype=torch.float64) * 2 * math.pi / n_lon - math.pi
    m = torch.arange(1, degree + 1, dtype=torch.float64)[:, None]
    fourier = torch.cat([torch.ones(1, n_lon, dtype=torch.float64), math.sqrt(2) * torch.cos(m * phi),
                         math.sqrt(2) * torch.sin(m * phi)])  # (2L+1, n_lon)
    # coefficient gather: cos part [m, l] -> flat l*l+l+m ; sin part [m, l] -> l*l+l-m (m >= 1).
    # Entries with l < m point at a zero slot appended at the end.
    d = (degree + 1) ** 2
    cos_idx = torch.full((degree + 1, degree + 1), d, dtype=torch.long)
    sin_idx = torch.full((degree, degree + 1), d, dtype=torch.long)
    for l in range(degree + 1):
        for mm in range(l + 1):
            cos_idx[mm, l] = l * l + l + mm
            if mm:
                sin_idx[mm - 1, l] = l * l + l - mm
    # values below 1e-30 are far below float32 resolution of the sum; as float32 denormals they would make
    # every matrix product against the table many times slower on x86
    leg[leg.abs() < 1e-30] = 0.0
    lat = 90.0 - torch.rad2deg(theta)
    lon = torch.rad2deg(phi)
    return (leg.to(dtype=dtype, device=device), fourier.to(dtype=dtype, device=device),
            cos_idx.to(device), sin_idx.to(device), lat.to(dtype=dtype, device=device),
            lon.to(dtype=dtype, device=device))


def grid_values(coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f_c on the decoder grid.

    Args:
        coeffs: (B, D).
    Returns:
        values (B, n_lat, n_lon), node latitudes (n_lat,), node longitudes (n_lon,), degrees.
    """
    b, d = coeffs.shape
    degree = degree_from_dim(d)
    leg, fourier, cos_idx, sin_idx, lat, lon = _synthesis_tables(degree, coeffs.dtype, str(coeffs.device))
    padded = torch.cat([coeffs, coeffs.new_zeros(b, 1)], dim=1)
    c_cos = padded[:, cos_idx]  # (B, L+1, L+1) [b, m, l]
    c_sin = padded[:, sin_idx]  # (B, L, L+1)
    # Legendre stage, batched over orders m: (m, B, l) @ (m, l, i) -> (m, B, i)
    a_cos = torch.bmm(c_cos.transpose(0, 1), leg)
    a_sin = torch.bmm(c_sin.transpose(0, 1), leg[1:])
    a = torch.cat([a_cos, a_sin], dim=0)  # (2L+1, B, n_lat)
    # Fourier stage: (B * n_lat, 2L+1) @ (2L+1, n_lon)
    n_lat = leg.shape[2]
    f = a.permute(1, 2, 0).reshape(b * n_lat, -1) @ fourier
    return f.reshape(b, n_lat, -1), lat, lon


def _local_maxima(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (B, k) into the flattened grid of the k largest local maxima (value, flat index)."""
    b, n_lat, n_lon = values.shape
    v = values[:, None]
    padded = F.pad(v, (1, 1, 0, 0), mode="circular")  # wrap in longitude
    padded = F.pad(padded, (0, 0, 1, 1), mode="replicate")
    pooled = F.max_pool2d(padded, kernel_size=3, stride=1)[:, 0]
    is_max = values >= pooled
    masked = torch.where(is_max, values, torch.full_like(values, -torch.inf)).reshape(b, -1)
    k = min(k, masked.shape[1])
    top, idx = masked.topk(k, dim=1)
    # where fewer than k local maxima exist, fall back to the global best for the empty slots
    idx = torch.where(torch.isfinite(top), idx, idx[:, :1].expand_as(idx))
    return top, idx


def _tangent_frame(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two orthonormal tangent vectors at unit vectors p (..., 3), well defined everywhere (poles too)."""
    ez = torch.zeros_like(p)
    ez[..., 2] = 1.0
    ex = torch.zeros_like(p)
    ex[..., 0] = 1.0
    ref = torch.where((p[..., 2:3].abs() < 0.9), ez, ex)
    e1 = torch.linalg.cross(ref, p)
    e1 = e1 / e1.norm(dim=-1, keepdim=True)
    e2 = torch.linalg.cross(p, e1)
    return e1, e2


# 9-point stencil offsets (u, v) in units of h
_STENCIL = torch.tensor([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [1, 1], [1, -1], [-1, 1], [-1, -1]],
                        dtype=torch.float64)


def _values_at(coeffs: torch.Tensor, points: torch.Tensor, degree: int) -> torch.Tensor:
    """f_c at unit vectors points (B, P, 3) -> (B, P)."""
    lat, lon = unit_to_latlon(points)
    y = spherical_harmonics(lat, lon, degree, chunk=2048)  # (B, P, D)
    return torch.einsum("bpd,bd->bp", y, coeffs)


def refine(coeffs_rep: torch.Tensor, p: torch.Tensor, degree: int, *, iterations: int = 3
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton ascent of f_c from unit vectors p (P, 3), coeffs_rep (P, D) the code of each start point.
    Returns refined points (P, 3) and their values (P,)."""
    dt = coeffs_rep.dtype
    h = 0.5 / (degree + 1)  # radians; the kernel's main lobe has radius ~3.8/L
    h_min = (1e-3 if dt == torch.float64 else 0.1) / (degree + 1)
    trust = 1.5 / (degree + 1)
    stencil = _STENCIL.to(dtype=dt, device=coeffs_rep.device)
    for _ in range(iterations):
        e1, e2 = _tangent_frame(p)
        offs = stencil * h  # (9, 2)
        pts = p[:, None] + offs[None, :, :1] * e1[:, None] + offs[None, :, 1:] * e2[:, None]
        pts = pts / pts.norm(dim=-1, keepdim=True)
        f = _values_at(coeffs_rep, pts, degree)  # (BC, 9)
        # tangent-plane retraction x = normalize(p + u e1 + v e2) gives u = tan(angle); with h << 1
        # the central differences below are second-order accurate.
        gu = (f[:, 1] - f[:, 2]) / (2 * h)
        gv = (f[:, 3] - f[:, 4]) / (2 * h)
        huu = (f[:, 1] - 2 * f[:, 0] + f[:, 2]) / h**2
        hvv = (f[:, 3] - 2 * f[:, 0] + f[:, 4]) / h**2
        huv = (f[:, 5] - f[:, 6] - f[:, 7] + f[:, 8]) / (4 * h * h)
        det = huu * hvv - huv * huv
        concave = (huu < 0) & (det > 0)
        safe_det = torch.where(concave, det, torch.ones_like(det))
        su = torch.where(concave, -(hvv * gu - huv * gv) / safe_det, gu)
        sv = torch.where(concave, -(-huv * gu + huu * gv) / safe_det, gv)
        # not concave: a gradient step of length h
        gnorm = torch.sqrt(su * su + sv * sv).clamp_min(torch.finfo(dt).tiny)
        scale = torch.where(concave, torch.ones_like(gnorm), h / gnorm)
        su, sv = su * scale, sv * scale
        step = torch.sqrt(su * su + sv * sv)
        clip = torch.clamp(trust / step.clamp_min(torch.finfo(dt).tiny), max=1.0)
        su, sv = su * clip, sv * clip
        new = p + su[:, None] * e1 + sv[:, None] * e2
        p = new / new.norm(dim=-1, keepdim=True)
        h = max(h * 0.25, h_min)
        trust = max(trust * 0.5, 4 * h_min)
    lat, lon = unit_to_latlon(p)
    value = (spherical_harmonics(lat, lon, degree) * coeffs_rep).sum(-1)
    return p, value


@torch.no_grad()
def decode(coeffs: torch.Tensor, *, candidates: int = 3, iterations: int = 3, gate: float = 0.5,
           batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mode of f_c for each coefficient vector.

    Args:
        coeffs: (..., D) with D = (L+1)**2; float32 or float64.
        candidates: local maxima of the grid refined per vector.
        iterations: Newton iterations per candidate.
        gate: refine only local maxima whose grid value is >= best - gate * |best|.
    Returns:
        lat, lon (degrees) and f_c at the mode, each of shape (...).
    """
    coeffs = torch.as_tensor(coeffs)
    if not coeffs.is_floating_point():
        coeffs = coeffs.to(torch.get_default_dtype())
    degree = degree_from_dim(coeffs.shape[-1])
    if not torch.isfinite(coeffs).all():
        raise ValueError("coeffs contains NaN or inf")
    shape = coeffs.shape[:-1]
    flat = coeffs.reshape(-1, coeffs.shape[-1])
    out_lat, out_lon, out_val = [], [], []
    for i in range(0, flat.shape[0], batch_size):
        c = flat[i : i + batch_size]
        values, glat, glon = grid_values(c)
        top, idx = _local_maxima(values, candidates)
        # Refine only candidates whose grid value is within `gate` of the best: the grid's
        # discretisation error is at most ~25 % of a peak, so lower maxima cannot win.
        best_grid = top[:, :1]
        keep = top >= best_grid - gate * best_grid.abs()
        keep[:, 0] = True
        rows, cols = keep.nonzero(as_tuple=True)
        n_lon = glon.shape[0]
        flat_idx = idx[rows, cols]
        start = latlon_to_unit(glat[flat_idx // n_lon], glon[flat_idx % n_lon])  # (P, 3)
        p_ref, v_ref = refine(c[rows], start, degree, iterations=iterations)
        val = torch.full(top.shape, -torch.inf, dtype=c.dtype, device=c.device)
        val[rows, cols] = v_ref
        p = torch.zeros(*top.shape, 3, dtype=c.dtype, device=c.device)
        p[rows, cols] = p_ref
        best = val.argmax(dim=1)
        pb = p[torch.arange(p.shape[0]), best]
        lat, lon = unit_to_latlon(pb)
        out_lat.append(lat)
        out_lon.append(lon)
        out_val.append(val[torch.arange(p.shape[0]), best])
    return (torch.cat(out_lat).reshape(shape), torch.cat(out_lon).reshape(shape),
            torch.cat(out_val).reshape(shape))
