"""SHDD encode and decode throughput, against scipy / sphericart and the full-grid decoder, same run."""

from __future__ import annotations

import importlib
import math
import time

import numpy as np
import torch

from benchmarks.common import no_options, print_table, save, timeit
from locdiff import shdd
from locdiff.geo import haversine_km, latlon_to_unit, random_points

dec = importlib.import_module("locdiff.shdd.decode")


def scipy_encode(lat: np.ndarray, lon: np.ndarray, L: int) -> np.ndarray:
    from scipy.special import sph_harm_y

    th, ph = np.deg2rad(90 - lat), np.deg2rad(lon)
    out = np.empty((len(lat), (L + 1) ** 2))
    for l in range(L + 1):
        for m in range(0, l + 1):
            c = sph_harm_y(l, m, th, ph)
            out[:, l * l + l + m] = c.real if m == 0 else math.sqrt(2) * (-1) ** m * c.real
            if m:
                out[:, l * l + l - m] = math.sqrt(2) * (-1) ** m * c.imag
    return out


def full_grid_decode(coeffs: torch.Tensor, basis: torch.Tensor, glat, glon, L: int):
    """Reference: one matrix product against ~4 (L+1)^2 Fibonacci points, best node, same refinement."""
    values = coeffs @ basis.T
    best = values.argmax(dim=1)
    start = latlon_to_unit(glat[best], glon[best])
    p, v = dec.refine(coeffs, start, L)
    return p, v


def main() -> None:
    no_options(__doc__)
    rows_enc, rows_dec = [], []
    batch = 65_536
    for L in (16, 64, 256):
        n = batch if L <= 64 else 4_096  # 65,536 x 66,049 float32 would be 17 GB
        lat, lon = random_points(n, seed=L, dtype=torch.float32)
        t = timeit(lambda: shdd.encode(lat, lon, L), repeat=2)
        row = {"L": L, "batch": n, "ours_pts_s": n / t}
        ns = 2_000 if L <= 16 else 200
        t_sc = timeit(lambda: scipy_encode(lat[:ns].double().numpy(), lon[:ns].double().numpy(), L),
                      repeat=1, warmup=0) if L <= 64 else None
        row["scipy_pts_s"] = ns / t_sc if t_sc else None
        try:
            import sphericart.torch as sct

            sh = sct.SphericalHarmonics(L)
            xyz = latlon_to_unit(lat, lon)
            t_sp = timeit(lambda: sh.compute(xyz), repeat=2)
            row["sphericart_pts_s"] = n / t_sp
        except Exception as err:  # optional extra
            row["sphericart_pts_s"] = None
            print(f"sphericart unavailable: {err}")
        row["x_scipy"] = row["ours_pts_s"] / row["scipy_pts_s"] if row["scipy_pts_s"] else None
        row["x_sphericart"] = (row["ours_pts_s"] / row["sphericart_pts_s"]) if row["sphericart_pts_s"] else None
        rows_enc.append(row)
        print_table([row])

    for L in (16, 64, 128):
        n = {16: 10_000, 64: 2_000, 128: 500}[L]
        lat, lon = random_points(n, seed=L + 1, dtype=torch.float32)
        codes = shdd.encode(lat, lon, L)
        t0 = time.perf_counter()
        la, lo, _ = shdd.decode(codes)
        t_ours = time.perf_counter() - t0
        err = haversine_km(lat.double(), lon.double(), la.double(), lo.double())
        glat, glon = shdd.fibonacci_lattice(4 * (L + 1) ** 2, dtype=torch.float32)
        basis = shdd.encode(glat, glon, L)  # precomputed once, not timed (the reference's best case)
        t0 = time.perf_counter()
        p, _ = full_grid_decode(codes, basis, glat, glon, L)
        t_ref = time.perf_counter() - t0
        from locdiff.geo import unit_to_latlon

        rla, rlo = unit_to_latlon(p)
        err_ref = haversine_km(lat.double(), lon.double(), rla.double(), rlo.double())
        rows_dec.append({"L": L, "samples": n, "ours_samples_s": n / t_ours, "ref_samples_s": n / t_ref,
                         "speedup": t_ref / t_ours, "ours_max_err_km": err.max().item(),
                         "ours_median_err_km": err.median().item(), "ref_max_err_km": err_ref.max().item()})
        print_table(rows_dec[-1:])
    print_table(rows_enc, "encode (float32), points/s")
    print_table(rows_dec, "decode (float32), samples/s")
    save("shdd", {"encode": rows_enc, "decode": rows_dec,
                  "targets": {"encode_vs_scipy_L64": ">= 100x", "encode_vs_sphericart_L64": ">= 0.5x",
                              "decode_vs_full_grid_L64": ">= 5x", "decode_L64_samples_s": ">= 1000"}})


if __name__ == "__main__":
    main()
