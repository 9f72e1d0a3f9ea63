"""`locdiff evaluate` (the metrics table of a predictions file), `locdiff synth` (synthetic benchmark) and
`locdiff realbench` (the realistic benchmark) and `locdiff cuebench` (the cue benchmark)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from locdiff.cli.args import check_output_file, check_output_url
from locdiff.errors import UserError
from locdiff.evaluation import draw_plots, metrics_by_method
from locdiff.io import json_text, read_predictions, write_file_atomic
from locdiff.metrics import format_table
from locdiff.worlds.cuebench import CueBenchConfig
from locdiff.worlds.cuebench import write_benchmark as write_cuebench
from locdiff.worlds.realbench import RealBenchConfig
from locdiff.worlds.realbench import write_benchmark as write_realbench
from locdiff.worlds.synth import SynthConfig
from locdiff.worlds.synth import write_benchmark as write_synth


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="metrics of a predictions table",
        description="Print accuracy within 1/25/200/750/2500 km (percent and counts), median and mean error "
                    "and GeoScore of a predictions table (Parquet or CSV with id, lat, lon, pred_lat, "
                    "pred_lon).")
    p.add_argument("--predictions", required=True, metavar="PRED.parquet", help="predictions table")
    p.add_argument("--json", metavar="OUT.json", help="also write the metrics as JSON")
    p.add_argument("--plots", metavar="DIR", help="also write DIR/map.png and DIR/error_cdf.png")
    p.set_defaults(func=_evaluate)

    s = subparsers.add_parser(
        "synth", help="write the synthetic benchmark",
        description="Write a synthetic geolocation benchmark (no download): DIR/train.parquet, "
                    "DIR/test.parquet, DIR/test_unseen.parquet (held-out regions) and DIR/synth.json.")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--n-train", type=int, default=50_000, metavar="N", help="training rows (default 50000)")
    s.add_argument("--n-test", type=int, default=5_000, metavar="N", help="test rows (default 5000)")
    s.add_argument("--n-unseen", type=int, default=2_000, metavar="N", help="test_unseen rows (default 2000)")
    s.add_argument("--n-val", type=int, default=0, metavar="N", help="validation rows (default 0: none)")
    s.add_argument("--n-val-unseen", type=int, default=0, metavar="N",
                   help="val_unseen rows, the held-out regions of test_unseen (default 0: none)")
    s.add_argument("--dim", type=int, default=128, help="embedding dimension (default 128)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    s.set_defaults(func=_synth)

    r = subparsers.add_parser(
        "realbench", help="write the realistic benchmark (GeoCLIP location-encoder embeddings)",
        description="Write a realistic geolocation benchmark: embeddings from GeoCLIP's pretrained location "
                    "encoder (the geoclip package, nothing downloaded) blended with look-alike places and "
                    "noise, at photo-collection-like locations and at the real Im2GPS3k / YFCC26k test "
                    "locations. Writes DIR/{train,val,val_unseen,test,test_unseen,im2gps3k,yfcc26k}.parquet "
                    "and DIR/realbench.json; the same seed gives identical files.")
    _world_args(r)
    r.add_argument("--n-yfcc", type=int, default=4_000, metavar="N",
                   help="yfcc26k rows: a fixed subsample of the 25,600 locations, the same for every seed "
                        "(default 4000; 0: all)")
    r.add_argument("--noise", type=float, default=None, metavar="X",
                   help="norm of the embedding noise (default 1.65; higher is harder)")
    r.set_defaults(func=_realbench)

    c = subparsers.add_parser(
        "cuebench", help="write the cue benchmark (country, region, city, landmark and no-geography cues)",
        description="Write a geolocation benchmark whose embeddings carry discrete cues of different "
                    "strengths: country (confusable with its land neighbours), region, city, famous "
                    "landmarks, a coarse biome, and photos with no geography at all, plus noise (no "
                    "download). Writes DIR/{train,val,val_unseen,test,test_unseen}.parquet, "
                    "DIR/labels/<split>.parquet (what each row shows) and DIR/cuebench.json; the same seed "
                    "gives identical files.")
    _world_args(c)
    c.add_argument("--dim", type=int, default=256, metavar="D", help="embedding dimension (default 256)")
    c.add_argument("--noise", type=float, default=None, metavar="X",
                   help="norm of the embedding noise (default 1.0; higher is harder)")
    c.set_defaults(func=_cuebench)


def _world_args(p: argparse.ArgumentParser) -> None:
    """The output folder, seed and split sizes shared by `realbench` and `cuebench`."""
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed (default 0)")
    p.add_argument("--n-train", type=int, default=60_000, metavar="N", help="training rows (default 60000)")
    p.add_argument("--n-val", type=int, default=2_000, metavar="N", help="val rows, iid (default 2000)")
    p.add_argument("--n-val-unseen", type=int, default=1_000, metavar="N",
                   help="val_unseen rows, held-out regions (default 1000)")
    p.add_argument("--n-test", type=int, default=3_000, metavar="N", help="test rows, iid (default 3000)")
    p.add_argument("--n-test-unseen", type=int, default=2_000, metavar="N",
                   help="test_unseen rows, held-out regions (default 2000)")


def _evaluate(args: argparse.Namespace) -> int:
    # written locally (a URL would become a local folder "s3:"), checked before any work
    check_output_file(args.json, "--json", {"--predictions": args.predictions})
    check_output_url(args.plots, "--plots")
    pred = read_predictions(args.predictions)
    if len(pred.ids) == 0:
        raise UserError(f"{args.predictions}: no rows; nothing to evaluate")
    if not pred.labelled:
        raise ValueError(f"{args.predictions}: no truth columns 'lat' and 'lon'; cannot evaluate")
    name, rows, _ = metrics_by_method(pred)
    print(format_table(rows, title=str(args.predictions)))
    if args.json:
        out = Path(args.json)
        payload = {"predictions": str(args.predictions), "metrics": rows[name]}
        if len(rows) > 1:
            payload["by_method"] = {k: v for k, v in rows.items() if k != name}
        write_file_atomic(out, json_text(payload, indent=2))  # whole or not at all; NaN as null
        print(f"wrote {out}")
    if args.plots:
        drawn = draw_plots(Path(args.plots), pred.pred_lat, pred.pred_lon, pred.lat, pred.lon, label=name,
                           title=str(args.predictions), cdf_title="", world_map="map.png")
        print(f"wrote {drawn['worldmap']} and {drawn['error_cdf']}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    check_output_url(args.out, "--out")  # a local folder: s3://b/x would be the empty local folder s3:/b/x
    cfg = SynthConfig(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test, n_unseen=args.n_unseen,
                      n_val_unseen=args.n_val_unseen, dim=args.dim, seed=args.seed)
    paths = write_synth(args.out, cfg)
    for split, path in paths.items():
        print(f"{split}: {path}")
    return 0


def _realbench(args: argparse.Namespace) -> int:
    return _write_world("realbench", RealBenchConfig, write_realbench, args, n_yfcc=args.n_yfcc)


def _cuebench(args: argparse.Namespace) -> int:
    return _write_world("cuebench", CueBenchConfig, write_cuebench, args, dim=args.dim)


def _write_world(name: str, config_cls: Any, write_benchmark: Any, args: argparse.Namespace, **extra: Any) -> int:
    """Write a benchmark world with the split sizes of `_world_args` (and `extra`), then list its files."""
    check_output_url(args.out, "--out")  # a local folder, as for synth
    noise = {} if args.noise is None else {"noise": args.noise}
    cfg = config_cls(seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_val_unseen=args.n_val_unseen,
                     n_test=args.n_test, n_test_unseen=args.n_test_unseen, **extra, **noise)
    paths = write_benchmark(args.out, cfg)
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(f"config: {paths['train'].parent / f'{name}.json'}")
    return 0
