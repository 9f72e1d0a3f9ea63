"""`locdiff shdd encode | roundtrip | plot`: the SHDD location code for a person."""

from __future__ import annotations

import argparse
import json
import time

import torch

from locdiff.cli.args import MAX_DEGREE, number_in
from locdiff.errors import UserError
from locdiff.geo import haversine_km, random_points
from locdiff.plots import _background, _pyplot, save_figure
from locdiff.shdd import SHDD

MAX_ROUNDTRIP_FLOATS = 1 << 26  # n x (L+1)^2: the codes and the decoder's work of a round trip are held at once
# the plot evaluates (L+1)^2 harmonics at each of its 361 x 721 grid points: about 15 s at degree 64 on 2 cores,
# growing as L^2 (128: a minute, 512: 20 minutes); a finer kernel than 64's is finer than the 0.5-degree grid anyway
MAX_PLOT_DEGREE = 64


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shdd", help="SHDD location codes: encode, round-trip check, kernel plot")
    s = p.add_subparsers(dest="shdd_command", required=True, metavar="SUBCOMMAND")

    e = s.add_parser("encode", help="print the SHDD code of a point")
    e.add_argument("--lat", type=float, required=True, help="latitude in degrees")
    e.add_argument("--lon", type=float, required=True, help="longitude in degrees")
    e.add_argument("--degree", type=number_in(1, MAX_DEGREE), required=True,
                   help=f"SHDD degree L, at most {MAX_DEGREE}: (L+1)^2 coefficients")
    e.set_defaults(func=_encode)

    r = s.add_parser("roundtrip", help="decode(encode(x)) error and throughput on random points")
    r.add_argument("--degree", type=number_in(1, MAX_DEGREE), required=True,
                   help=f"SHDD degree L, at most {MAX_DEGREE}")
    r.add_argument("--n", type=number_in(1, 10_000_000), default=10_000, help="random points (default 10000)")
    r.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="precision of the points and codes (default float32)")
    r.add_argument("--seed", type=number_in(0, 2**63 - 1), default=0, help="seed of the points (default 0)")
    r.set_defaults(func=_roundtrip)

    pl = s.add_parser("plot", help="the kernel f(y) of a point's code on a world map (PNG)")
    pl.add_argument("--lat", type=float, required=True, help="latitude in degrees")
    pl.add_argument("--lon", type=float, required=True, help="longitude in degrees")
    pl.add_argument("--degree", type=number_in(1, MAX_PLOT_DEGREE), required=True,
                    help=f"at most {MAX_PLOT_DEGREE} (the map's time grows as degree^2)")
    pl.add_argument("--out", required=True, help="the image file (PNG)")
    pl.set_defaults(func=_plot)


def _encode(args: argparse.Namespace) -> int:
    code = SHDD(args.degree).encode(args.lat, args.lon)
    print(json.dumps({"lat": args.lat, "lon": args.lon, "degree": args.degree, "dim": code.numel(),
                      "code": [round(float(v), 8) for v in code]}))
    return 0


def _roundtrip(args: argparse.Namespace) -> int:
    codec = SHDD(args.degree)
    if args.n * codec.dimension > MAX_ROUNDTRIP_FLOATS:  # the codes are held at once: n x (L+1)^2 numbers
        raise UserError(f"--n {args.n:,} points x {codec.dimension:,} coefficients (--degree {args.degree}) is above "
                        f"the {MAX_ROUNDTRIP_FLOATS:,} numbers a round trip holds at once; give a smaller --n")
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    lat, lon = random_points(args.n, seed=args.seed, dtype=dtype)
    t0 = time.perf_counter()
    code = codec.encode(lat, lon)
    t1 = time.perf_counter()
    la, lo, _ = codec.decode(code)
    t2 = time.perf_counter()
    d = haversine_km(lat.double(), lon.double(), la.double(), lo.double())
    print(f"degree {args.degree} ({code.shape[-1]} coefficients), {args.n} random points, {args.dtype}")
    print(f"round-trip error: max {d.max().item():.4f} km, median {d.median().item():.5f} km")
    print(f"encode {args.n / (t1 - t0):,.0f} points/s, decode {args.n / (t2 - t1):,.0f} samples/s")
    return 0


def _plot(args: argparse.Namespace) -> int:
    plt = _pyplot()
    codec = SHDD(args.degree)
    code = codec.encode(torch.tensor(args.lat, dtype=torch.float64), torch.tensor(args.lon, dtype=torch.float64))
    lat = torch.linspace(-90, 90, 361, dtype=torch.float64)
    lon = torch.linspace(-180, 180, 721, dtype=torch.float64)
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    f = codec.density(code, la, lo).numpy()
    fig, ax = plt.subplots(figsize=(10, 5.2))
    im = ax.imshow(f, origin="lower", extent=(-180, 180, -90, 90), cmap="RdBu_r",
                   vmin=-abs(f).max(), vmax=abs(f).max())
    try:
        _background(ax)
    except Exception:  # the background is decoration only
        pass
    ax.plot(args.lon, args.lat, "k+", ms=10)
    ax.set(xlabel="longitude", ylabel="latitude", xlim=(-180, 180), ylim=(-90, 90),
           title=f"SHDD kernel at ({args.lat}, {args.lon}), degree {args.degree}")
    fig.colorbar(im, ax=ax, shrink=0.8, label="f(y)")
    save_figure(fig, args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0
