"""How precisely a held-out split measures LocDiff-H against the best single method: standard errors by region.

The held-out splits (val_unseen, test_unseen) are drawn from a few held-out regions: 6 disks on synth, 15 and 30
small disks on realbench and cuebench, with photos drawn by population, so that one region can hold a quarter of
a split. Rows of one region succeed or fail together, so the standard error of an accuracy difference on such a
split is that of a cluster sample: computed over regions, not rows. For every held-out split and threshold, this
reports LocDiff-H's accuracy minus the best of top-1 retrieval, the cell classifier and LocDiff there, with the
paired standard error over rows and the cluster-robust one over regions. Needs `bench_model --work DIR`'s kept
runs (nothing is trained here); --seed must be the seed that run used. Output: benchmarks/results/heldout.json.

With `--cv`, it also checks how LocDiff-H's choice carries to regions it was not chosen on, on validation rows
alone: val's rows and val_unseen's regions are dealt into `--folds` folds; each fold's images are placed by the
product of experts chosen (`choose_poe`, the run's rule) on the other folds, and `--draws` deals are averaged.
It reports, for val and val_unseen and each threshold, LocDiff-H minus the better of LocDiff and top-1 retrieval
(choose_poe's reference), as the run chose on all of them (in sample) and out of fold.

    python -m benchmarks.bench_heldout --work DIR [--seed 0] [--benchmarks synth,realbench,cuebench]
    python -m benchmarks.bench_heldout --work DIR --seed S --benchmarks realbench --cv [--folds 3 --draws 3]
    python -m benchmarks.bench_heldout --work DIR --seed 2 --cv --out benchmarks/results/heldout-seed2.json
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
from locdiff.metrics import THRESHOLDS_KM, hits_within
from locdiff.model.config import config_to_dict, load_config
from locdiff.model.hybrid import POE_DEFAULT, PoECandidates, choose_poe, concat_candidates, poe_select

log = logging.getLogger("bench_heldout")
HELD_OUT = ("val_unseen", "test_unseen")
SINGLE = ("knn", "geocell", "LocDiff")  # the single methods LocDiff-H is held against (bench_model's rows)
VALIDATION = ("val", "val_unseen")  # choose_poe's groups 0 and 1


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


def region_folds(groups: np.ndarray, regions: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """A fold per row: group 0's rows (iid) dealt at random, the other rows region by region (all the rows of
    a region in one fold), each about equally over the folds."""
    groups, regions = np.asarray(groups), np.asarray(regions)
    fold = np.empty(len(groups), np.int64)
    iid = groups == 0
    fold[iid] = rng.permutation(int(iid.sum())) % folds
    ids, inverse = np.unique(regions[~iid], return_inverse=True)
    fold[~iid] = (rng.permutation(len(ids)) % folds)[inverse]
    return fold


def placed(c: PoECandidates, lat: np.ndarray, lon: np.ndarray, groups: np.ndarray, fit: np.ndarray,
           rows: np.ndarray, *, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of the images `rows` selects, placed by the product of experts chosen (`choose_poe`) on the
    images `fit` selects."""
    p = choose_poe(c.rows(fit), lat[fit], lon[fit], groups[fit], tolerance=tolerance)
    plat, plon, _ = poe_select(c.rows(rows), **{k: p[k] for k in POE_DEFAULT}, novelty=p["novelty"])
    return plat, plon


def out_of_fold(c: PoECandidates, lat: np.ndarray, lon: np.ndarray, groups: np.ndarray, fold: np.ndarray, *,
                tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) per image: placed by the product of experts chosen on the other folds' images."""
    plat, plon = np.empty(len(lat)), np.empty(len(lat))
    for f in np.unique(fold):
        rows = fold == f
        plat[rows], plon[rows] = placed(c, lat, lon, groups, ~rows, rows, tolerance=tolerance)
    return plat, plon


def cross_validate(bench: str, method: Any, data: Any, regions: list[dict[str, Any]], *, folds: int, draws: int,
                   seed: int) -> list[dict[str, Any]]:
    """One row per validation split and threshold: LocDiff-H minus the better of LocDiff and top-1 retrieval,
    in sample (the run's choice) and out of fold (mean, min and max over the draws), in points."""
    tables = [data.get(s) for s in VALIDATION]
    if any(t is None or not len(t.lat) for t in tables):
        log.warning("%s: no rows in %s; nothing to cross-validate", bench, " or ".join(VALIDATION))
        return []
    c = concat_candidates([method.candidates(t) for t in tables])
    lat, lon = np.concatenate([t.lat for t in tables]), np.concatenate([t.lon for t in tables])
    groups = np.repeat(np.arange(len(tables)), [len(t.lat) for t in tables])
    region = np.where(groups == 0, -1, nearest_region(lat, lon, regions))

    def hits(plat: np.ndarray, plon: np.ndarray) -> np.ndarray:
        return hits_within(plat, plon, lat, lon)

    tolerance = method.config.hybrid.poe_tolerance
    in_sample = hits(*method.place_hybrid(c))  # the run's own choice
    h_loc, h_ret = hits(c.lat[:, 0], c.lon[:, 0]), hits(c.lat[:, 1], c.lon[:, 1])
    rng = np.random.default_rng(seed)
    oof = [hits(*out_of_fold(c, lat, lon, groups, region_folds(groups, region, folds, rng), tolerance=tolerance))
           for _ in range(draws)]
    out = []
    for g, split in enumerate(VALIDATION):
        r = groups == g
        ref = np.maximum(h_loc[r].mean(0), h_ret[r].mean(0))
        diffs = np.stack([100 * (h[r].mean(0) - ref) for h in oof])
        for j, km in enumerate(THRESHOLDS_KM):
            out.append({"benchmark": bench, "split": split, "km": int(km), "reference_%": 100 * float(ref[j]),
                        "in_sample": 100 * float(in_sample[r, j].mean() - ref[j]),
                        "out_of_fold": float(diffs[:, j].mean()), "oof_min": float(diffs[:, j].min()),
                        "oof_max": float(diffs[:, j].max()), "rows": int(r.sum()),
                        "regions": len(np.unique(region[r])) if g else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bm.add_reuse_arguments(ap, "bench_model's --work folder (its kept runs)")
    ap.add_argument("--seed", type=int, default=0, help="the seed of that bench_model run (its data)")
    ap.add_argument("--cv", action="store_true", help="also cross-validate LocDiff-H's choice over val_unseen's "
                                                      "regions (validation rows only)")
    ap.add_argument("--folds", type=int, default=3, choices=range(2, 11), metavar="2..10")
    ap.add_argument("--draws", type=int, default=3, choices=range(1, 21), metavar="1..20")
    ap.add_argument("--out", default=None, help="the results JSON (default benchmarks/results/heldout.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data_args = bm.reuse_data_args(args)
    data_args.seed = args.seed
    config = config_to_dict(load_config(args.config, args.set))
    work = Path(args.work)
    rows: list[dict[str, Any]] = []
    cv_rows: list[dict[str, Any]] = []
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
                hits[row] = hits_within(p.lat, p.lon, table.lat, table.lon)
            for cell in cells(hits, nearest_region(table.lat, table.lon, regions), split):
                rows.append({"benchmark": bench, **cell})
        if args.cv:
            cv_rows += cross_validate(bench, locdiff, data, regions, folds=args.folds, draws=args.draws,
                                      seed=args.seed)
    print_table(rows, title="LocDiff-H minus the best single method on held-out splits (points), with standard "
                            "errors over rows and over regions")
    if cv_rows:
        print_table(cv_rows, title=f"LocDiff-H minus the better of LocDiff and top-1 retrieval on validation (points): "
                                   f"as the run chose on all rows (in sample) and on other folds ({args.folds} folds "
                                   f"of val's rows and val_unseen's regions, {args.draws} draws)")
    save(Path(args.out) if args.out else "heldout",
         {"args": bm.recorded_args(args), "thresholds_km": list(THRESHOLDS_KM), "rows": rows,
          **({"cross_validation": cv_rows} if cv_rows else {})})
    log.info("%s", json.dumps({"worst": min(rows, key=lambda r: r["diff"])} if rows else {}))


if __name__ == "__main__":
    main()
