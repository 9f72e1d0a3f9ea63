"""Learning-free mode seeking: the argmax of f_c(y) = sum_k c_k Y_k(y) over the sphere.

1. Grid stage. f_c on an equiangular grid of (2L+2) x (4L+4) nodes, computed as a separable spherical
   harmonic synthesis: a Legendre stage (one batched matrix product per order m against a cached
   table Pbar_lm(theta_i)) and a Fourier stage (one matrix product against cached cos/sin(m phi_j)).
   That costs O(B L^3) instead of the O(B L^4) of a matrix product against a full grid basis.
2. Candidates. The `candidates` largest local maxima of the grid (8-neighbourhood, wrapping in lon).
3. Refinement. A first Newton step fitted to the candidate's 3x3 grid neighbourhood (no extra
   evaluation), then Newton ascent on the sphere: gradient and Hessian from a 6-point stencil in the
   tangent plane, the stencil shrinking each iteration, steps clipped to a trust radius, iterations
   past the second only for candidates still moving. Sub-kilometre for every L (float64 to metres).
4. The refined candidate with the largest f_c wins.

With `smoothing` s > 0 the peak is chosen on a smoothed code and placed on the raw one: steps 1-4 run on
c damped by the Gaussian taper exp(-l(l+1) / (2 (L/s)^2)) (`gaussian_taper`), which favours the peak
with the most mass around it over a narrower but higher one; one more refinement from that point on the
raw c puts the answer back at the raw peak (its full resolution) and returns the raw f_c there.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from locdiff.geo import latlon_to_unit, unit_to_latlon
from locdiff.shdd.basis import degree_from_dim, legendre_table, spherical_harmonics
from locdiff.shdd.grid import equiangular_grid


@lru_cache(maxsize=16)
def gaussian_taper(degree: int, smoothing: float) -> torch.Tensor:
    """(D,) float64 damping exp(-l(l+1) / (2 (L/smoothing)^2)) of each coefficient: a heat-kernel-like
    smoothing whose width in degree is L / smoothing (larger smoothing, smoother function)."""
    if smoothing <= 0:
        raise ValueError(f"smoothing must be > 0; got {smoothing}")
    l = torch.arange(degree + 1, dtype=torch.float64)
    w = torch.exp(-l * (l + 1) / (2 * (max(degree, 1) / smoothing) ** 2))
    return w.repeat_interleave(2 * torch.arange(degree + 1) + 1)


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
    """Indices (B, k) into the flattened grid of the k largest local maxima (value, flat index).

    A node is a local maximum when no node of its 3x3 neighbourhood (wrapping in longitude) is larger.
    The 3x3 maximum is taken separably with shifted views: much faster on CPU than max_pool2d."""
    b, n_lat, n_lon = values.shape
    vp = torch.cat([values[..., -1:], values, values[..., :1]], dim=-1)  # wrap in longitude
    h = torch.maximum(torch.maximum(vp[..., :-2], vp[..., 1:-1]), vp[..., 2:])
    hp = torch.cat([h[:, :1], h, h[:, -1:]], dim=1)  # replicate at the poles
    pooled = torch.maximum(torch.maximum(hp[:, :-2], hp[:, 1:-1]), hp[:, 2:])
    masked = values.masked_fill(values < pooled, -torch.inf).reshape(b, -1)
    k = min(k, masked.shape[1])
    top, idx = masked.topk(k, dim=1)
    # where fewer than k local maxima exist, fall back to the global best for the empty slots
    idx = torch.where(torch.isfinite(top), idx, idx[:, :1].expand_as(idx))
    return top, idx


def _grid_step(values: torch.Tensor, idx: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A first Newton step from grid nodes, for free: the gradient and Hessian of f_c in (colatitude,
    longitude) from the node's 3x3 neighbourhood on the grid already computed.

    Args:
        values: (B, n_lat, n_lon) grid values; idx: (B, k) flat node indices; lat, lon: node coordinates.
    Returns:
        lat, lon (B, k) in degrees of the stepped points. Nodes on the polar rows, and nodes where the
        fitted quadratic is not concave, stay where they are; steps are clipped to one grid spacing.
    """
    b, n_lat, n_lon = values.shape
    i, j = idx // n_lon, idx % n_lon
    up, down = (i - 1).clamp_min(0), (i + 1).clamp_max(n_lat - 1)
    left, right = (j - 1) % n_lon, (j + 1) % n_lon
    flat = values.reshape(b, -1)

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return flat.gather(1, r * n_lon + c)

    f0 = at(i, j)
    fn, fs, fw, fe = at(up, j), at(down, j), at(i, left), at(i, right)
    dt_, dp_ = math.pi / n_lat, 2 * math.pi / n_lon  # spacing in colatitude and longitude (radians)
    g_t, g_p = (fs - fn) / (2 * dt_), (fe - fw) / (2 * dp_)
    h_tt, h_pp = (fs - 2 * f0 + fn) / dt_**2, (fe - 2 * f0 + fw) / dp_**2
    h_tp = (at(down, right) - at(down, left) - at(up, right) + at(up, left)) / (4 * dt_ * dp_)
    det = h_tt * h_pp - h_tp * h_tp
    ok = (h_tt < 0) & (det > 0) & (i > 0) & (i < n_lat - 1)
    safe = torch.where(ok, det, torch.ones_like(det))
    d_t = torch.where(ok, -(h_pp * g_t - h_tp * g_p) / safe, torch.zeros_like(det)).clamp(-dt_, dt_)
    d_p = torch.where(ok, -(-h_tp * g_t + h_tt * g_p) / safe, torch.zeros_like(det)).clamp(-dp_, dp_)
    new_lat = (lat[i] - torch.rad2deg(d_t)).clamp(-90.0, 90.0)  # colatitude grows southwards
    new_lon = torch.remainder(lon[j] + torch.rad2deg(d_p) + 180.0, 360.0) - 180.0
    return new_lat, new_lon


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


# 6-point stencil offsets (u, v) in units of h: the fewest points that determine a quadratic in 2-D
_STENCIL = torch.tensor([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1], [1, 1]], dtype=torch.float64)


def _values_at(coeffs_t: torch.Tensor, points: torch.Tensor, degree: int) -> torch.Tensor:
    """f_c at unit vectors points (P, S, 3), coeffs_t (D, P) contiguous -> (P, S)."""
    p, s = points.shape[:2]
    lat, lon = unit_to_latlon(points.transpose(0, 1).reshape(-1, 3))  # stencil-major: (S * P,)
    y_t = spherical_harmonics(lat, lon, degree).T  # (D, S * P): the basis's own memory layout
    return (y_t.reshape(-1, s, p) * coeffs_t[:, None]).sum(0).T


def refine(coeffs_rep: torch.Tensor, p: torch.Tensor, degree: int, *, iterations: int = 4
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton ascent of f_c from unit vectors p (P, 3), coeffs_rep (P, D) the code of each start point.
    Returns refined points (P, 3) and their values (P,).

    Each iteration evaluates f_c at 6 points of the tangent plane (spacing h): central differences for
    the gradient, one-sided for the cross term of the Hessian. The gradient's O(h^2) error sets where
    Newton stops, so h shrinks every iteration (to ~1 km at L=64 in float32, ~10 m in float64).
    After two iterations only the points still moving are iterated again, up to `iterations`."""
    dt = coeffs_rep.dtype
    h = 0.2 / (degree + 1)  # radians; the kernel's main lobe has radius ~3.8/L
    h_min = (1e-3 if dt == torch.float64 else 0.1) / (degree + 1)
    trust = 1.0 / (degree + 1)
    stencil = _STENCIL.to(dtype=dt, device=coeffs_rep.device)
    coeffs_t = coeffs_rep.T.contiguous()
    p = p.clone()
    active = torch.arange(p.shape[0], device=p.device)
    for it in range(iterations):
        q, c_t = p[active], coeffs_t[:, active]
        e1, e2 = _tangent_frame(q)
        offs = stencil * h  # (6, 2)
        pts = q[:, None] + offs[None, :, :1] * e1[:, None] + offs[None, :, 1:] * e2[:, None]
        pts = pts / pts.norm(dim=-1, keepdim=True)
        f = _values_at(c_t, pts, degree)  # (A, 6)
        # tangent-plane retraction x = normalize(p + u e1 + v e2) gives u = tan(angle); with h << 1
        # the differences below are accurate to O(h^2) (gradient, diagonal) and O(h) (cross term).
        gu = (f[:, 1] - f[:, 2]) / (2 * h)
        gv = (f[:, 3] - f[:, 4]) / (2 * h)
        huu = (f[:, 1] - 2 * f[:, 0] + f[:, 2]) / h**2
        hvv = (f[:, 3] - 2 * f[:, 0] + f[:, 4]) / h**2
        huv = (f[:, 5] - f[:, 1] - f[:, 3] + f[:, 0]) / (h * h)
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
        new = q + su[:, None] * e1 + sv[:, None] * e2
        p[active] = new / new.norm(dim=-1, keepdim=True)
        h = max(h * 0.1, h_min)
        trust = max(trust * 0.5, 4 * h_min)
        if it >= 1:  # converged: the last step was below the final stencil's resolution
            active = active[(step * clip > h_min) | ~concave]
            if active.numel() == 0:
                break
    value = _values_at(coeffs_t, p[:, None], degree)[:, 0]
    return p, value


@torch.no_grad()
def decode(coeffs: torch.Tensor, *, candidates: int = 3, iterations: int = 4, gate: float = 0.5,
           batch_size: int = 4096, grid_batch: int | None = None, smoothing: float = 0.0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mode of f_c for each coefficient vector.

    Args:
        coeffs: (..., D) with D = (L+1)**2; float32 or float64.
        candidates: local maxima of the grid refined per vector.
        iterations: at most this many Newton iterations per candidate after the grid step; from the
            third on, only candidates that have not converged are iterated.
        gate: refine only local maxima whose grid value is >= best - gate * |best|.
        batch_size: vectors refined together.
        grid_batch: vectors per grid stage; by default as many as keep the (B, n_lat, n_lon) grid near
            a million values, so that it stays in cache.
        smoothing: 0 for the plain argmax; s > 0 chooses the peak on the code smoothed by
            `gaussian_taper(L, s)` and refines it on the raw code (module docstring).
    Returns:
        lat, lon (degrees) and f_c at the mode, each of shape (...).
    """
    coeffs = torch.as_tensor(coeffs)
    if not coeffs.is_floating_point():
        coeffs = coeffs.to(torch.get_default_dtype())
    degree = degree_from_dim(coeffs.shape[-1])
    if not torch.isfinite(coeffs).all():
        raise ValueError("coeffs contains NaN or inf")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0; got {smoothing}")
    shape = coeffs.shape[:-1]
    flat = coeffs.reshape(-1, coeffs.shape[-1])
    if flat.shape[0] == 0:
        empty = flat.new_zeros(shape)
        return empty, empty.clone(), empty.clone()
    if smoothing > 0:
        taper = gaussian_taper(degree, float(smoothing)).to(dtype=coeffs.dtype, device=coeffs.device)
        slat, slon, _ = decode(coeffs * taper, candidates=candidates, iterations=iterations, gate=gate,
                               batch_size=batch_size, grid_batch=grid_batch)
        return _refine_from(coeffs, slat, slon, degree, iterations, batch_size)
    if grid_batch is None:
        grid_batch = max(1, (1 << 20) // math.prod(equiangular_grid(degree)))
    out_lat, out_lon, out_val = [], [], []
    for i in range(0, flat.shape[0], batch_size):
        c = flat[i : i + batch_size]
        # 1-2. grid stage and local maxima, a few vectors at a time
        tops, slat, slon = [], [], []
        for j in range(0, c.shape[0], grid_batch):
            values, glat, glon = grid_values(c[j : j + grid_batch])
            top, idx = _local_maxima(values, candidates)
            tops.append(top)
            la, lo = _grid_step(values, idx, glat, glon)
            slat.append(la)
            slon.append(lo)
        top, slat, slon = torch.cat(tops), torch.cat(slat), torch.cat(slon)
        # Refine only candidates whose grid value is within `gate` of the best: the grid's
        # discretisation error is at most ~25 % of a peak, so lower maxima cannot win.
        best_grid = top[:, :1]
        keep = top >= best_grid - gate * best_grid.abs()
        keep[:, 0] = True
        rows, cols = keep.nonzero(as_tuple=True)
        start = latlon_to_unit(slat[rows, cols], slon[rows, cols])  # (P, 3)
        # 3. refinement of every kept candidate of the batch at once
        p_ref, v_ref = refine(c[rows], start, degree, iterations=iterations)
        val = torch.full(top.shape, -torch.inf, dtype=c.dtype, device=c.device)
        val[rows, cols] = v_ref
        p = torch.zeros(*top.shape, 3, dtype=c.dtype, device=c.device)
        p[rows, cols] = p_ref
        # 4. the best refined candidate
        best = val.argmax(dim=1)
        pb = p[torch.arange(p.shape[0]), best]
        lat, lon = unit_to_latlon(pb)
        out_lat.append(lat)
        out_lon.append(lon)
        out_val.append(val[torch.arange(p.shape[0]), best])
    return (torch.cat(out_lat).reshape(shape), torch.cat(out_lon).reshape(shape),
            torch.cat(out_val).reshape(shape))


def _refine_from(coeffs: torch.Tensor, lat: torch.Tensor, lon: torch.Tensor, degree: int, iterations: int,
                 batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Newton ascent of each raw code from a given start (degrees); lat, lon and f_c at the end."""
    shape = coeffs.shape[:-1]
    flat = coeffs.reshape(-1, coeffs.shape[-1])
    start = latlon_to_unit(lat.reshape(-1).to(flat.dtype), lon.reshape(-1).to(flat.dtype))
    out_p, out_v = [], []
    for i in range(0, flat.shape[0], batch_size):
        p, v = refine(flat[i : i + batch_size], start[i : i + batch_size], degree, iterations=iterations)
        out_p.append(p)
        out_v.append(v)
    rlat, rlon = unit_to_latlon(torch.cat(out_p))
    return rlat.reshape(shape), rlon.reshape(shape), torch.cat(out_v).reshape(shape)
