"""Real orthonormal spherical harmonics by a numerically stable recurrence.

Y_lm is flattened at index l*l + l + m (0 <= l <= L, -l <= m <= l), D = (L+1)**2:

    Y_l0       = Pbar_l0(cos theta)
    Y_lm (m>0) = sqrt(2) Pbar_lm(cos theta) cos(m phi)
    Y_lm (m<0) = sqrt(2) Pbar_l|m|(cos theta) sin(|m| phi)

where theta is the colatitude, phi the longitude, and Pbar_lm the associated Legendre functions
normalised so that the Y_lm are orthonormal on the unit sphere (no Condon-Shortley phase). This equals
scipy's complex `sph_harm_y` turned real the usual way (sqrt(2) (-1)^m Re / Im).

Pbar_lm comes from the standard fully-normalised column recurrence (Holmes & Featherstone 2002):

    Pbar_00 = 1 / sqrt(4 pi)
    Pbar_mm = sqrt((2m+1) / (2m)) sin(theta) Pbar_{m-1,m-1}              (sectoral)
    Pbar_{m+1,m} = sqrt(2m+3) cos(theta) Pbar_mm
    Pbar_lm = a_lm (cos(theta) Pbar_{l-1,m} - Pbar_{l-2,m} / a_{l-1,m}),  a_lm = sqrt((4l^2-1)/(l^2-m^2))

It is evaluated one degree at a time for all orders at once, so there are L Python steps, each a few
vector operations on (l+1, N) blocks; no closed forms, no factorials, no overflow.

Precision: the sectoral seeds behave like sin(theta)^m. Where P_lm is not negligible (m < l sin theta)
the smallest seed is about 10^(-0.16 L), which float32 holds up to L ~ 230 and float64 to L ~ 1900.
So float32 inputs are computed in float32 up to FLOAT32_MAX_DEGREE and in float64 above it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

FLOAT32_MAX_DEGREE = 192  # above this, float32 inputs are computed in float64 (see module docstring)


def num_coefficients(degree: int) -> int:
    """D = (L+1)^2."""
    return (degree + 1) ** 2


def degree_from_dim(dim: int, *, name: str = "coeffs") -> int:
    """L from D = (L+1)^2; ValueError when D is not a positive square."""
    root = math.isqrt(dim) if dim >= 0 else -1
    if dim < 1 or root * root != dim:
        raise ValueError(f"{name}: the last dimension must have length (L+1)**2 for a degree L >= 0; got {dim}")
    return root - 1


@lru_cache(maxsize=64)
def _recurrence_coefficients(degree: int, dtype: torch.dtype, device: str):
    """Per degree l >= 2: (a_lm, a_lm / a_{l-1,m}) for m = 0..l-2, as (l-1, 1) column tensors."""
    out = []
    for l in range(2, degree + 1):
        m = torch.arange(l - 1, dtype=torch.float64)
        a = torch.sqrt((4.0 * l * l - 1) / (l * l - m * m))
        a_prev = torch.sqrt((4.0 * (l - 1) ** 2 - 1) / ((l - 1) ** 2 - m * m))
        out.append(((a).to(dtype=dtype, device=device)[:, None],
                    (a / a_prev).to(dtype=dtype, device=device)[:, None]))
    sect = torch.tensor([math.sqrt((2 * m + 1) / (2 * m)) for m in range(1, degree + 1)], dtype=torch.float64)
    sub = torch.tensor([math.sqrt(2 * m + 3) for m in range(0, degree + 1)], dtype=torch.float64)
    return out, sect.tolist(), sub.tolist()


@lru_cache(maxsize=64)
def _layout(degree: int, device: str):
    """Index maps from the flat (l, m) layout to the triangular Legendre table and the trig table.

    Legendre table rows: l(l+1)/2 + |m|.  Trig table rows: 0 -> 1, m in 1..L -> sqrt2 cos(m phi),
    L + m -> sqrt2 sin(m phi).
    """
    leg, trig = [], []
    for l in range(degree + 1):
        for m in range(-l, l + 1):
            leg.append(l * (l + 1) // 2 + abs(m))
            trig.append(0 if m == 0 else (m if m > 0 else degree - m))
    return (torch.tensor(leg, dtype=torch.long, device=device),
            torch.tensor(trig, dtype=torch.long, device=device))


def legendre_table(cos_theta: torch.Tensor, sin_theta: torch.Tensor, degree: int) -> torch.Tensor:
    """Pbar_lm for 0 <= m <= l <= L as rows l(l+1)/2 + m of a ((L+1)(L+2)/2, N) tensor.

    Args:
        cos_theta, sin_theta: (N,) with sin_theta >= 0.
    """
    dtype, device = cos_theta.dtype, cos_theta.device
    x, s = cos_theta[None, :], sin_theta[None, :]  # (1, N)
    coef, sect, sub = _recurrence_coefficients(degree, dtype, str(device))
    p_prev2 = None
    p_prev = torch.full_like(x, 1.0 / math.sqrt(4 * math.pi))  # degree 0: (1, N)
    rows = [p_prev]
    for l in range(1, degree + 1):
        last = p_prev[l - 1 : l]  # Pbar_{l-1,l-1}
        parts = []
        if l >= 2:
            a, ab = coef[l - 2]
            # Pbar_lm = a_lm x Pbar_{l-1,m} - (a_lm / a_{l-1,m}) Pbar_{l-2,m},  m = 0..l-2
            parts.append(a * x * p_prev[: l - 1] - ab * p_prev2)
        parts.append(sub[l - 1] * x * last)  # m = l-1
        parts.append(sect[l - 1] * s * last)  # m = l
        p_new = torch.cat(parts, dim=0)
        rows.append(p_new)
        p_prev2, p_prev = p_prev, p_new
    return torch.cat(rows, dim=0)


def _trig(lon_rad: torch.Tensor, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt2 cos(m phi), sqrt2 sin(m phi) for m = 1..L as (L, N). Evaluated directly rather than by the
    multiple-angle recurrence: it does not accumulate error with m."""
    m = torch.arange(1, degree + 1, dtype=lon_rad.dtype, device=lon_rad.device)[:, None]
    mphi = m * lon_rad[None, :]
    return math.sqrt(2) * torch.cos(mphi), math.sqrt(2) * torch.sin(mphi)


def _basis_differentiable(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, degree: int) -> torch.Tensor:
    """(N, D) through out-of-place operations only, so autograd can follow it."""
    table = legendre_table(x, s, degree)  # (T, N)
    c, sn = _trig(lo, degree)
    trig = torch.cat([torch.ones_like(lo)[None, :], c, sn], dim=0)  # (2L+1, N)
    leg_idx, trig_idx = _layout(degree, str(lo.device))
    return (table.index_select(0, leg_idx) * trig.index_select(0, trig_idx)).T


@lru_cache(maxsize=64)
def _fast_tables(degree: int, dtype: torch.dtype, device: str):
    """For the chunked path: per l, the (2, 1) factors [sqrt(2l+1), sqrt((2l+1)/(2l))] of the two new
    diagonal terms, -a_lm/a_{l-1,m}, and the row permutation from the working layout (negative orders
    stored as m = 1..l) to the flat layout (m = -l..-1)."""
    _, sect, sub = _recurrence_coefficients(degree, dtype, device)
    diag = [torch.tensor([[sub[l - 1]], [sect[l - 1]]], dtype=dtype, device=device) for l in range(1, degree + 1)]
    perm = []  # flat row l*l + l + m  <-  working row l*l + m (m >= 0) or l*l + l - m (m < 0)
    for l in range(degree + 1):
        perm += [l * l + (m if m >= 0 else l - m) for m in range(-l, l + 1)]
    return diag, torch.tensor(perm, dtype=torch.long, device=device)


def _basis_fast(x: torch.Tensor, s: torch.Tensor, lo: torch.Tensor, degree: int, out: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """(N, D) as the transpose of `out` (D, N), a chunk of points at a time so that the working set stays
    in cache and the output is written once, without a transposing copy (which costs more than the
    whole recurrence on CPU). No autograd.

    Working layout per degree l, rows from l*l: m = 0..l (Pbar_lm sqrt2 cos), then m = 1..l (sin);
    one permutation per chunk puts them in the flat order."""
    d = num_coefficients(degree)
    coef, _, _ = _recurrence_coefficients(degree, x.dtype, str(x.device))
    diag, perm = _fast_tables(degree, x.dtype, str(x.device))
    n_max = min(chunk, x.shape[0])
    buf = torch.empty(d, n_max, dtype=x.dtype, device=x.device)
    buf2 = torch.empty(d, n_max, dtype=x.dtype, device=x.device)
    for i0 in range(0, x.shape[0], chunk):
        lc = lo[i0 : i0 + chunk]
        n = lc.shape[0]
        b, b2 = buf[:, :n], buf2[:, :n]
        xc = x[None, i0 : i0 + n]
        xs = torch.cat([xc, s[None, i0 : i0 + n]], dim=0)  # (2, n)
        c, sn = _trig(lc, degree)
        p_prev2 = None
        p_prev = torch.full_like(xc, 1.0 / math.sqrt(4 * math.pi))
        b[0:1] = p_prev
        for l in range(1, degree + 1):
            p_new = torch.empty(l + 1, n, dtype=x.dtype, device=x.device)
            if l >= 2:
                a, ab = coef[l - 2]
                torch.mul(p_prev2, ab, out=p_new[: l - 1])
                p_new[: l - 1].neg_().addcmul_(p_prev[: l - 1] * a, xc)
            torch.mul(xs, p_prev[l - 1 : l], out=p_new[l - 1 :]).mul_(diag[l - 1])
            base = l * l
            b[base] = p_new[0]
            torch.mul(p_new[1:], c[:l], out=b[base + 1 : base + l + 1])
            torch.mul(p_new[1:], sn[:l], out=b[base + l + 1 : base + 2 * l + 1])
            p_prev2, p_prev = p_prev, p_new
        torch.index_select(b, 0, perm, out=b2)
        out[:, i0 : i0 + n] = b2  # rows of n contiguous values: no transpose
    return out.T


def spherical_harmonics(lat: torch.Tensor, lon: torch.Tensor, degree: int, *, chunk: int | None = None
                        ) -> torch.Tensor:
    """Real orthonormal Y_lm at points given in degrees.

    Args:
        lat, lon: tensors of the same shape (...), degrees. Not validated here (see `encode`).
        degree: L >= 0.
        chunk: points per block in the no-grad path (default: about 32 MB of output per block).

    Returns:
        (..., (L+1)**2) in the dtype of `lat` (float32 or float64), differentiable in lat and lon.
        For 1-D input the no-grad result is a transposed view of a (D, N) buffer (column-major):
        use `.contiguous()` where row-major memory matters; every torch operation accepts it.
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0; got {degree}")
    lat, lon = torch.broadcast_tensors(torch.as_tensor(lat), torch.as_tensor(lon))
    shape = lat.shape
    out_dtype = lat.dtype if lat.dtype in (torch.float32, torch.float64) else torch.float32
    work = torch.float64 if (out_dtype == torch.float64 or degree > FLOAT32_MAX_DEGREE) else torch.float32
    la = torch.deg2rad(lat.reshape(-1).to(work))
    lo = torch.deg2rad(lon.reshape(-1).to(work))
    # cos(theta) = sin(lat), sin(theta) = cos(lat) (abs: cos(pi/2) rounds to a tiny negative in float32)
    x, s = torch.sin(la), torch.cos(la).abs()
    d = num_coefficients(degree)
    if torch.is_grad_enabled() and (lat.requires_grad or lon.requires_grad):
        y = _basis_differentiable(x, s, lo, degree).to(out_dtype)
    else:
        if chunk is None:
            chunk = max(256, (32 << 20) // (d * x.element_size()))
        out = torch.empty(d, x.shape[0], dtype=work, device=x.device)
        with torch.no_grad():
            y = _basis_fast(x, s, lo, degree, out, chunk).to(out_dtype)
    return y.reshape(*shape, d)
