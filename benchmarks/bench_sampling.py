"""Does diffusion earn its place? K samples x S steps against one sample, one step (issue 9, item 4).

For a trained LocDiff run and a labelled table (a validation split: never choose on a test split), it
predicts with each (K, S) of a sweep and reports accuracy and speed; then it splits the images by how much
K = 16 samples disagree (the share of samples within the support radius of the mean answer: low = several
distinct modes, an ambiguous image) and compares one sample with 16 in each group, as a table and a
figure (benchmarks/results/sampling_<name>.png). Where several samples help, it is on the low-agreement
groups; if no group gains, one step is as good and the cheap setting should be the default.

    python -m benchmarks.bench_sampling --run RUN --data VAL.parquet [--name realbench] [--n 1000]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import RESULTS, print_table, save
from locdiff.io import read_embeddings
from locdiff.metrics import distances_km, geo_metrics
from locdiff.model.method import LocDiffMethod
from locdiff.model.predict import locdiff_predict
from locdiff.runs import RunFolder

SWEEP = ((1, 1), (1, 10), (4, 10), (16, 1), (16, 20))
KEYS = ("acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km", "median_km")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained LocDiff run folder")
    ap.add_argument("--data", required=True, help="a labelled embeddings table (a validation split)")
    ap.add_argument("--name", default="val", help="label of the results (sampling_<name>.json/.png)")
    ap.add_argument("--n", type=int, default=1000, help="rows used")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    run = RunFolder(args.run)
    _, meta = run.load_model()  # the predictor's own description carries its resolved config
    method = LocDiffMethod.load(Path(args.run), meta["config"])
    table = read_embeddings(args.data)
    n = min(args.n, len(table))
    emb, lat, lon = np.asarray(table.embedding[:n]), np.asarray(table.lat[:n]), np.asarray(table.lon[:n])

    rows, errors, agreement = [], {}, None
    for k, s in SWEEP:
        t0 = time.perf_counter()
        out = locdiff_predict(method.model, emb, method.config, samples=k, steps=s, seed=0)
        secs = time.perf_counter() - t0
        for agg in ("mean", "support") if k > 1 else ("mean",):
            p_lat, p_lon, _ = out.choose(agg)
            m = geo_metrics(p_lat, p_lon, lat, lon)
            rows.append({"K": k, "S": s, "aggregation": agg, "images_per_s": n / secs, **{c: m[c] for c in KEYS}})
            errors[(k, s, agg)] = np.asarray(distances_km(p_lat, p_lon, lat, lon))
        if (k, s) == (16, 20):
            agreement = np.asarray(out.mean_conf)
    print_table(rows, title=f"{args.name}: accuracy (%) and speed by samples K and steps S ({n} images)")

    # by how much the 16 samples agree (share of samples near the mean answer): all agree, or the images
    # where some disagree, split at their median (ties at 1.0 are common: quantiles alone would be empty)
    some = agreement < 1.0
    cut = float(np.median(agreement[some])) if some.any() else 0.0
    groups = {"most ambiguous": some & (agreement <= cut), "some disagree": some & (agreement > cut),
              "all 16 agree": ~some}
    by_q = []
    for label, sel in groups.items():
        entry = {"group": label, "images": int(sel.sum()),
                 "agreement": f"{agreement[sel].min():.2f}-{agreement[sel].max():.2f}" if sel.any() else "-"}
        for key in ((1, 1, "mean"), (16, 20, "mean"), (16, 20, "support")):
            hit = float((errors[key][sel] <= 200).mean() * 100) if sel.any() else None
            entry[f"K={key[0]} S={key[1]} {key[2]} @200km"] = hit
        by_q.append(entry)
    print_table(by_q, title=f"{args.name}: accuracy within 200 km by how much 16 samples agree")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{e['group']}\n{e['images']} images, {e['agreement']}" for e in by_q]
    series = [c for c in by_q[0] if c.endswith("@200km")]
    width = 0.8 / len(series)
    for i, c in enumerate(series):
        ax.bar(np.arange(len(by_q)) + (i - (len(series) - 1) / 2) * width, [e[c] or 0 for e in by_q], width, label=c)
    ax.set_xticks(np.arange(len(by_q)), labels)
    ax.set_xlabel("share of the 16 samples near the mean answer")
    ax.set_ylabel("% within 200 km")
    ax.set_title(f"{args.name}: do several samples help ambiguous images?")
    ax.legend(fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"sampling_{args.name}.png"
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
    save(f"sampling_{args.name}", {"run": args.run, "data": args.data, "n": n, "sweep": rows, "by_agreement": by_q})


if __name__ == "__main__":
    main()
