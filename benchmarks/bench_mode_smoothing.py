"""Choosing the taper the density's modes are found on (locdiff.shdd.modes.MODE_SMOOTHING) on validation probes.

For LocDiff's one-step code of two-place probe photos (benchmarks/posterior.py), the share whose two heaviest
modes name both places, with the modes found and placed on the code tapered to width L / s, for each s of
the grid. The probes of seeds --val-seeds choose (mean over them and the worlds); the probe of --test-seed
(bench_model's own probe) is reported beside, as is retrieval's two best distinct places on the same probes.
Needs `bench_model --work DIR`'s trained LocDiff runs (WORK/<benchmark>/locdiff; nothing is trained here).
Output: benchmarks/results/mode_smoothing.json.

    python -m benchmarks.bench_mode_smoothing --work DIR [--benchmarks synth,realbench,cuebench]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bench_model as bm
from benchmarks import posterior
from benchmarks.common import print_table, save
from locdiff.shdd.modes import MODE_SMOOTHING, density_modes

log = logging.getLogger("bench_mode_smoothing")
GRID = (3.0, 4.0, 5.0, 6.0)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--val-seeds: comma-separated integers expected; got {text!r}") from None
    if not seeds:
        raise SystemExit("--val-seeds: at least one seed")
    return seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bm.add_reuse_arguments(ap, "bench_model's --work folder (its trained LocDiff runs)")
    ap.add_argument("--val-seeds", default="1,2,3,4", help="probe seeds that choose (not bench_model's)")
    ap.add_argument("--test-seed", type=int, default=0, help="bench_model's probe seed: reported, not used")
    ap.add_argument("--probe-n", type=int, default=500, help="probe photos per seed")
    ap.add_argument("--radius", type=float, default=posterior.NAME_RADIUS_KM, help="naming radius (km)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    val_seeds = parse_seeds(args.val_seeds)
    if args.test_seed in val_seeds:
        ap.error("--test-seed must not be one of --val-seeds")
    data_args = bm.reuse_data_args(args)
    rows: list[dict[str, Any]] = []
    for bench in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        _, method, _, _ = bm.kept_run(bench, data_args, Path(args.work), args.config)
        gallery, world = method.get_gallery(), bm._world(bench, data_args)
        for seed in [*val_seeds, args.test_seed]:
            probe = bm.two_place_probe(bench, world, args.probe_n, seed)
            code = posterior.draw(method.model, probe.embedding, method.config, samples=1, steps=1,
                                  seed=seed).mean_code
            places = (probe.a_lat, probe.a_lon, probe.b_lat, probe.b_lon)
            _, idx = gallery.search(probe.embedding, posterior.RETRIEVED)
            r_lat, r_lon = posterior.retrieval_two_places(gallery.lat[idx], gallery.lon[idx], args.radius)
            row = {"benchmark": bench, "seed": seed, "use": "test" if seed == args.test_seed else "val",
                   "retrieval": 100 * float(posterior.names_both(r_lat, r_lon, *places, args.radius).mean())}
            for s in GRID:
                m = density_modes(code, 2, min_separation_km=args.radius, smoothing=s)
                row[f"L/{s:g}"] = 100 * float(posterior.names_both(m.lat, m.lon, *places, args.radius).mean())
            rows.append(row)
            log.info("%s", row)
    print_table(rows, title=f"two-place probe: top-2 modes of the one-step code naming both places within "
                            f"{args.radius:g} km, by the modes' taper")
    val = [r for r in rows if r["use"] == "val"]
    means = {f"L/{s:g}": float(np.mean([r[f"L/{s:g}"] for r in val])) for s in GRID}
    chosen = max(means, key=means.get)
    print(f"mean over the validation probes: {means}; chosen {chosen} (MODE_SMOOTHING is L/{MODE_SMOOTHING:g})")
    save("mode_smoothing", {"args": bm.recorded_args(args), "grid": list(GRID), "rows": rows,
                            "val_mean": means, "chosen": chosen, "mode_smoothing": MODE_SMOOTHING})


if __name__ == "__main__":
    main()
