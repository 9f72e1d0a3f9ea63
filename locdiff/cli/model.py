"""`locdiff train` and `locdiff predict`: train any method into a run directory, predict from it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from locdiff.cli.args import OUTPUT_SCHEMES, check_output_file, check_output_url, number_in
from locdiff.data.stream import read_table
from locdiff.errors import UserError
from locdiff.evaluation import predict_in_chunks
from locdiff.io import write_predictions
from locdiff.methods import get_method
from locdiff.model.config import check_predict_options, config_from_dict, load_config
from locdiff.orchestration.ray_train import RayTrainSettings
from locdiff.orchestration.spec import RunSpec
from locdiff.resources import model_config_path
from locdiff.runs import RunFolder, check_data_encoder
from locdiff.training import MAX_GPUS_PER_WORKER, MAX_WORKERS, check_devices, run, throughput_line

log = logging.getLogger(__name__)

TRAIN_METHODS = ("locdiff", "knn", "geocell", "regress", "flow")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a method on an embeddings table into a run directory",
        description="Train LocDiff or a baseline. Writes checkpoint, resolved config "
        "(config.yaml) and metrics.jsonl into RUN_DIR; run again to resume.",
    )
    p.add_argument("--config", required=True, help="model config: a shipped name (tiny, base, paper) or a YAML path")
    p.add_argument(
        "--train", required=True, help="training embeddings table (Parquet) or feature-shard folder"
    )
    p.add_argument("--val", help="validation table or features folder (chooses the aggregation and LocDiff-H "
                   "settings); default: a held-out share of --train (train.val_share)")
    p.add_argument("--val-unseen", help="validation rows from regions absent from --train (a benchmark's "
                   "val_unseen): LocDiff-H's parameters are chosen on --val and these, each weighing half")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory")
    p.add_argument("--method", choices=TRAIN_METHODS, help="method to train (default: the config's `method`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=500 (repeatable)",
    )
    p.add_argument("--encoder", metavar="NAME",
                   help="the image encoder that made the table's embeddings (configs/encoders/NAME.yaml or a "
                   "hub id), recorded in the run; a features folder's manifest says it itself")
    p.add_argument("--workers", type=number_in(0, MAX_WORKERS), default=0, metavar="N",
                   help="train on Ray Train with N workers (a local Ray, or the cluster at RAY_ADDRESS)")
    p.add_argument("--gpus-per-worker", type=number_in(0, MAX_GPUS_PER_WORKER, float), default=0.0, metavar="G",
                   help="GPUs per Ray worker; without --workers, 1 trains this process on the local GPU "
                   "(refused when there is none)")
    p.add_argument("--storage", metavar="DIR_OR_S3",
                   help="Ray Train checkpoints (default: RUN/ray); s3://bucket/prefix on a cluster")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    q = subparsers.add_parser(
        "predict",
        help="predict locations with a trained run",
        description="Write the predictions table (id, lat, lon, pred_lat, pred_lon, "
        "method, confidence); Parquet or CSV by the extension of --out.",
    )
    q.add_argument("--run", required=True, help="run directory written by `locdiff train`")
    q.add_argument("--data", required=True, help="embeddings table (Parquet) or feature-shard folder")
    q.add_argument("--out", required=True, help="predictions file, .parquet or .csv")
    q.add_argument(
        "--method",
        choices=("locdiff", "locdiff-h"),
        help="for LocDiff runs: plain LocDiff (default) or the hybrid LocDiff-H",
    )
    q.add_argument("--samples", type=int, help="K samples per image (LocDiff; default from the config: base.yaml "
                   "1 with --steps 1, one-step: the network's z0 estimate from pure noise, no iterative sampling)")
    q.add_argument("--steps", type=int, help="S DDIM steps (LocDiff; default from the config: base.yaml 1, "
                   "one-step; paper.yaml 16 samples of 50 steps)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed (LocDiff; default 0)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_predict)


def _train(args: argparse.Namespace) -> int:
    check_output_url(args.out, "--out")  # a run folder is local: s3://b/x would be the local folder s3:/b/x
    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"method={args.method}")
    cfg = load_config(model_config_path(args.config), overrides)  # a bare name: the packaged config
    if cfg.method not in TRAIN_METHODS:
        raise ValueError(f"{args.config}: method must be one of {', '.join(TRAIN_METHODS)}; got {cfg.method!r}")
    check_devices(cfg, args.workers, args.gpus_per_worker)  # before anything is written
    ray_settings = None
    if args.workers:
        ray_settings = RayTrainSettings(num_workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                                        storage_root=args.storage or str(Path(args.out).resolve() / "ray"),
                                        run_name=Path(args.out).resolve().name)
    # the run, described once: config, data identities, completion key, run folder
    spec = RunSpec.build(cfg, args.train, args.out, val=args.val, val_unseen=args.val_unseen, encoder=args.encoder,
                         config_name=args.config)
    outcome = run(spec, workers=args.workers, ray_settings=ray_settings, progress=not args.no_progress)
    verb = "already trained (same config and data)" if outcome.skipped else "trained"
    print(f"{verb} {cfg.method} into {args.out}")
    for k, v in (outcome.record.get("metrics") or {}).items():
        print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    line = throughput_line(outcome.record.get("metrics") or {})
    if line:
        print(line)
    return 0


def _predict(args: argparse.Namespace) -> int:
    check_output_file(args.out, "--out", {"--data": args.data}, OUTPUT_SCHEMES)  # before any work
    folder = RunFolder(args.run)
    cfg = folder.read_config()
    trained = cfg.get("method", "locdiff")
    if args.method and trained != "locdiff":
        raise ValueError(f"{folder.path} is a run of method {trained!r}; --method {args.method} needs a LocDiff "
                         "run (train one with `locdiff train --method locdiff`)")
    if trained == "locdiff":  # the flags' bounds, before the data is read or the model built
        check_predict_options(config_from_dict(cfg, source=str(folder.file("config.yaml"))), samples=args.samples,
                              steps=args.steps, seed=args.seed, flags=True)
    check_data_encoder(folder, args.data)
    table = read_table(args.data)
    if len(table) == 0:
        raise UserError(f"{args.data}: no rows; nothing to predict")
    method = get_method(trained).load(folder.path, cfg)
    name = (args.method or "locdiff") if trained == "locdiff" else trained
    if trained != "locdiff" and (args.samples is not None or args.steps is not None):
        log.warning("--samples/--steps apply to LocDiff only; ignored for %s", trained)
    options = {"method": name, "samples": args.samples, "steps": args.steps, "seed": args.seed,
               "progress": not args.no_progress} if trained == "locdiff" else {}
    pred = predict_in_chunks(method, table, **options)
    write_predictions(args.out, table.ids, table.lat, table.lon, pred.lat, pred.lon, method=name,
                      confidence=pred.confidence)
    print(f"wrote {len(table)} predictions ({name}) to {args.out}")
    return 0
