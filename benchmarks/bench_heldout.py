"""How precisely a held-out split measures LocDiff-H against the best single method: standard errors by region.

The held-out splits (val_unseen, test_unseen) are drawn from a few held-out regions: 6 disks on synth, 15 and 30
small disks on realbench and cuebench, with photos drawn by population, so that one region can hold a quarter of
a split. Rows of one region succeed or fail together, so the standard error of an accuracy difference on such a
split is that of a cluster sample: computed over regions, not rows. For every held-out split and threshold, this
reports LocDiff-H's accuracy minus the best of top-1 retrieval, the cell classifier and LocDiff there, with the
paired standard error over rows and the cluster-robust one over regions. Needs `bench_model --work DIR`'s kept
runs (nothing is trained here); --seed must be the seed that run used. Output: benchmarks/results/heldout.json.

    python -m benchmarks.bench_heldout --work DIR [--seed 0] [--benchmarks synth,realbench,cuebench]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bench_model as bm
from benchmarks.common import print_table, save
from locdiff.geo import haversine_km
from locdiff.metrics import THRESHOLDS_KM, distances_km
from locdiff.model.config import config_to_dict, load_config

log = logging.getLogger("bench_heldout")
HELD_OUT = ("val_unseen", "test_unseen")
SINGLE = ("knn", "geocell", "LocDiff")  # the single methods LocDiff-H is held against (bench_model's rows)


def paired_se(diff: np.ndarray, clusters: np.ndarray | None = None) -> float:
    """Standard error of mean(diff): over rows (clusters None), or cluster-robust over `clusters` (the
    CR1 sandwich estimator, sqrt(G / (G - 1) * sum_g (sum_{i in g} (d_i - mean))^2) / n). With one row per
    cluster the two agree."""
    d = np.asarray(diff, np.float64)
    n = len(d)
    if n < 2:
        return float("nan")
    if clusters is None:
        return float(d.std(ddof=1) / np.sqrt(n))
    _, g = np.unique(np.asarray(clusters), return_inverse=True)
    groups = int(g.max()) + 1
    if groups < 2:
        return float("nan")
    totals = np.bincount(g, weights=d - d.mean(), minlength=groups)
    return float(np.sqrt(groups / (groups - 1) * np.sum(totals**2)) / n)


def nearest_region(lat: np.ndarray, lon: np.ndarray, regions: list[dict[str, Any]]) -> np.ndarray:
    """The index of each row's nearest held-out region centre."""
    c_lat = np.array([r["lat"] for r in regions], np.float64)
    c_lon = np.array([r["lon"] for r in regions], np.float64)
    return np.asarray(haversine_km(np.asarray(lat, np.float64)[:, None], np.asarray(lon, np.float64)[:, None],
                                   c_lat[None, :], c_lon[None, :])).argmin(1)


def world_regions(world: Any) -> list[dict[str, Any]]:
    """The held-out regions of a benchmark world (cuebench draws its regions with realbench's rule)."""
    return world.regions() if hasattr(world, "regions") else world.places.regions()


def cells(hits: dict[str, np.ndarray], region: np.ndarray, split: str) -> list[dict[str, Any]]:
    """One row per threshold: LocDiff-H minus the best single method (by accuracy on this split) and its errors.
    `hits`: row name -> (N, thresholds) 0/1."""
    out = []
    for j, km in enumerate(THRESHOLDS_KM):
        best = max(SINGLE, key=lambda m: hits[m][:, j].mean())
        diff = hits["LocDiff-H"][:, j] - hits[best][:, j]
        out.append({"split": split, "km": int(km), "best": best, "best_%": 100 * float(hits[best][:, j].mean()),
                    "LocDiff-H_%": 100 * float(hits["LocDiff-H"][:, j].mean()), "diff": 100 * float(diff.mean()),
                    "se_rows": 100 * paired_se(diff), "se_regions": 100 * paired_se(diff, region),
                    "rows": len(diff), "regions": len(np.unique(region))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bm.add_reuse_arguments(ap, "bench_model's --work folder (its kept runs)")
    ap.add_argument("--seed", type=int, default=0, help="the seed of that bench_model run (its data)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data_args = bm.reuse_data_args(args)
    data_args.seed = args.seed
    config = config_to_dict(load_config(args.config, args.set))
    work = Path(args.work)
    rows: list[dict[str, Any]] = []
    for bench in [b.strip() for b in args.benchmarks.split(",") if b.strip()]:
        data, locdiff, _, rechosen = bm.kept_run(bench, data_args, work, args.config)
        if rechosen:
            log.warning("%s: LocDiff-H was chosen again (its rule changed since the run)", bench)
        methods = {"LocDiff": locdiff}
        for row in ("knn", "geocell"):
            name, cfg = bm.baseline_config(config, row)
            methods[row], _ = bm._fit(name, cfg, data, bm.baseline_dir(work / bench, row))  # kept: resumed
        regions = world_regions(bm._world(bench, data_args))
        for split in HELD_OUT:
            table = data[split]
            hits = {}
            for row, how in [*((r, {}) for r in ("knn", "geocell")), ("LocDiff", {"method": "locdiff"}),
                             ("LocDiff-H", {"method": "locdiff-h"})]:
                p = methods["LocDiff" if row == "LocDiff-H" else row].predict(table, **how)
                err = distances_km(p.lat, p.lon, table.lat, table.lon)
                hits[row] = (err[:, None] <= np.asarray(THRESHOLDS_KM)).astype(np.float64)
            for cell in cells(hits, nearest_region(table.lat, table.lon, regions), split):
                rows.append({"benchmark": bench, **cell})
    print_table(rows, title="LocDiff-H minus the best single method on held-out splits (points), with standard "
                            "errors over rows and over regions")
    save("heldout", {"args": bm.recorded_args(args), "thresholds_km": list(THRESHOLDS_KM), "rows": rows})
    log.info("%s", json.dumps({"worst": min(rows, key=lambda r: r["diff"])} if rows else {}))


if __name__ == "__main__":
    main()
