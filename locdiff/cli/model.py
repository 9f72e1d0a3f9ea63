"""`locdiff train` and `locdiff predict`: train any method into a run directory, predict from it."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAIN_METHODS = ("locdiff", "knn", "geocell", "regress", "flow")
# config keys that may change between a run and its resumption
_RESUMABLE_CHANGES = (
    "train.steps",
    "train.checkpoint_every",
    "train.log_every",
    "train.val_samples",
    "train.device",
    "predict.",
    "hybrid.",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a method on an embeddings table into a run directory",
        description="Train LocDiff or a baseline. Writes checkpoint, resolved config "
        "(config.yaml) and metrics.jsonl into RUN_DIR; run again to resume.",
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/model/base.yaml")
    p.add_argument(
        "--train", required=True, help="training embeddings table (Parquet) or feature-shard folder"
    )
    p.add_argument("--val", help="validation table (chooses the aggregation and LocDiff-H settings)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--method", choices=TRAIN_METHODS, help="method to train (default: the config's `method`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=500 (repeatable)",
    )
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
    q.add_argument("--samples", type=int, help="K samples per image (LocDiff; default from the config)")
    q.add_argument("--steps", type=int, help="S DDIM steps (LocDiff; default from the config)")
    q.add_argument("--seed", type=int, default=0, help="sampling seed")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=_predict)


def read_table(path: str, *, labelled: bool | None = None):
    """An EmbeddingTable from a Parquet file/folder, or a feature-shard folder when the data layer's
    loader is installed."""
    p = Path(path)
    if not str(path).startswith(("s3://", "gs://", "http://", "https://")) and not p.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if p.is_dir() and not any(p.glob("*.parquet")):
        try:
            from locdiff.data.features import load_features
        except ImportError:
            load_features = None
        if load_features is not None:
            return load_features(p)
    from locdiff.io import read_embeddings

    return read_embeddings(path, labelled=labelled)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "baselines":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume(run_dir: Path, new: dict[str, Any]) -> None:
    """A run directory with a config must be resumed with a compatible config, or it is an error."""
    from locdiff.model.config import read_run_config

    if not (run_dir / "config.yaml").exists():
        return
    old = _flatten(read_run_config(run_dir))
    cur = _flatten(new)
    diff = [
        k
        for k in sorted(set(old) | set(cur))
        if old.get(k) != cur.get(k)
        and not any(k == c or (c.endswith(".") and k.startswith(c)) for c in _RESUMABLE_CHANGES)
    ]
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {cur.get(k)!r}" for k in diff[:5])
        raise ValueError(
            f"{run_dir} holds a run with a different config ({details}); use a new --out "
            f"to train a different config"
        )


def _train(args: argparse.Namespace) -> int:
    from locdiff.methods import get_method
    from locdiff.model.config import config_to_dict, load_config, save_config
    from locdiff.resources import model_config_path

    overrides = list(args.overrides)
    if args.method:
        overrides.append(f"method={args.method}")
    cfg = load_config(model_config_path(args.config), overrides)  # a bare name: the packaged config
    if cfg.method not in TRAIN_METHODS:
        raise ValueError(
            f"{args.config}: method must be one of {', '.join(TRAIN_METHODS)}; got {cfg.method!r}"
        )
    run_dir = Path(args.out)
    resolved = config_to_dict(cfg)
    _check_resume(run_dir, resolved)
    train = read_table(args.train, labelled=True)
    val = read_table(args.val, labelled=True) if args.val else None
    if val is not None and val.dim != train.dim:
        raise ValueError(
            f"{args.val}: column 'embedding' has dimension {val.dim}; {args.train} has {train.dim}"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    cls = get_method(cfg.method)
    method = cls.from_config(cfg if cfg.method == "locdiff" else resolved)
    metrics = method.fit(train, val, run_dir, progress=not args.no_progress)
    print(f"trained {cfg.method} into {run_dir}")
    for k, v in (metrics or {}).items():
        print(f"  {k}: {v:.6g}" if isinstance(v, float) else f"  {k}: {v}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from locdiff.io import write_predictions
    from locdiff.methods import get_method
    from locdiff.model.config import read_run_config

    run_dir = Path(args.run)
    cfg = read_run_config(run_dir)
    trained = cfg.get("method", "locdiff")
    if args.method and trained != "locdiff":
        raise ValueError(
            f"{run_dir} is a run of method {trained!r}; --method {args.method} needs a LocDiff run "
            f"(train one with `locdiff train --method locdiff`)"
        )
    for flag in ("samples", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} must be >= 1; got {value}")
    table = read_table(args.data)
    method = get_method(trained).load(run_dir, cfg)
    if trained == "locdiff":
        name = args.method or "locdiff"
        pred = method.predict(
            table,
            method=name,
            samples=args.samples,
            steps=args.steps,
            seed=args.seed,
            progress=not args.no_progress,
        )
    else:
        if args.samples is not None or args.steps is not None:
            log.warning("--samples/--steps apply to LocDiff only; ignored for %s", trained)
        name = trained
        pred = method.predict(table)
    write_predictions(
        args.out, table.ids, table.lat, table.lon, pred.lat, pred.lon, method=name, confidence=pred.confidence
    )
    print(f"wrote {len(table)} predictions ({name}) to {args.out}")
    return 0
