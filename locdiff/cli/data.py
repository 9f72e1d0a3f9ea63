"""`locdiff data ...`: ingest, embed, inspect, export (see locdiff/data)."""

from __future__ import annotations

import argparse
import os
import sys

from locdiff.cli.args import MAX_DEGREE, check_not_an_input, number_in
from locdiff.data.config import encoder_folder_name, load_dataset_config
from locdiff.data.features import export_features, features_dir
from locdiff.data.featurize import embed
from locdiff.data.ingest import ingest, ingest_split
from locdiff.data.inspect import format_report, inspect
from locdiff.data.storage import check_writable
from locdiff.orchestration.ray_session import RayUnavailable


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="data sets to WebDataset shards, embeddings and SHDD targets")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    q = sub.add_parser("ingest", help="download, validate and shard a data set into ROOT/NAME/images")
    q.add_argument("name", metavar="NAME", help="data set (configs/datasets/NAME.yaml)")
    q.add_argument("--root", required=True, help="local folder or s3://bucket/prefix")
    q.add_argument("--source", default=None, metavar="PATH_OR_URL",
                   help="folder, archive, CSV, http(s) or s3:// URL to read instead of the published URLs")
    q.add_argument("--limit", type=number_in(1, 10**12), default=None, metavar="N",
                   help="only the first N metadata rows")
    q.add_argument("--unlabelled", action="store_true",
                   help="coordinates optional: keep records without lat/lon (null); a folder without a "
                        "CSV is read for every JPEG/PNG/WebP under it (config: coordinates: optional)")
    q.add_argument("--allow-private-addresses", action="store_true",
                   help="also fetch from private, loopback and link-local hosts (a mirror on your own "
                        "network; config: allow_private_addresses, env LOCDIFF_ALLOW_PRIVATE_ADDRESSES=1)")
    q.add_argument("--max-image-bytes", type=number_in(1, 1 << 32), default=None, metavar="N",
                   help="bytes read per image (default 50000000); larger ones are skipped as too_big")
    q.add_argument("--max-image-pixels", type=number_in(1, 1 << 32), default=None, metavar="N",
                   help="pixels per image (default 64000000); larger ones are skipped undecoded as too_large")
    q.add_argument("--test-share", type=float, default=None, metavar="P",
                   help="also a test set: about P of the records (by a stable hash of their id) go to "
                        "ROOT/NAME-test, the others to ROOT/NAME (e.g. 0.1 for your own photos; not for the "
                        "embeddings source, whose table is copied whole)")
    q.set_defaults(func=_ingest)

    q = sub.add_parser("embed", help="image embeddings (and SHDD targets) into ROOT/NAME/features/ENCODER")
    q.add_argument("name", metavar="NAME", help="the ingested data set (ROOT/NAME/images)")
    q.add_argument("--root", required=True, help="local folder or s3://bucket/prefix")
    q.add_argument("--encoder", required=True,
                   help="encoder config (configs/encoders/), local model folder or hub id")
    q.add_argument("--degree", type=number_in(1, MAX_DEGREE), default=None, metavar="L",
                   help="also store SHDD targets of degree L")
    q.add_argument("--runner", choices=("auto", "local", "ray"), default="auto",
                   help="local: this process (a few shards at a time on threads); ray: Ray Data "
                        "(RAY_ADDRESS or a local Ray), parallel over shards, GPU actors when there are GPUs; "
                        "auto (default): ray for large jobs on a cluster, several GPUs or more than 4 CPUs")
    q.set_defaults(func=_embed)

    q = sub.add_parser("inspect", help="counts, skipped records, samples and a PNG map of ROOT/NAME; "
                                          "checks every shard against its manifest's sha256")
    q.add_argument("folder", metavar="ROOT/NAME", help="a data set's folder (local or s3://); the map is "
                   "written to ROOT/NAME/locations.png")
    q.add_argument("--no-verify", action="store_true",
                   help="do not read every shard to check its sha256 (faster on large data sets)")
    q.set_defaults(func=_inspect)

    q = sub.add_parser("export", help="features to the embeddings Parquet table")
    q.add_argument("name", metavar="NAME", help="the embedded data set (ROOT/NAME/features/ENCODER)")
    q.add_argument("--root", required=True, help="local folder or s3://bucket/prefix")
    q.add_argument("--encoder", required=True, help="the encoder given to `data embed`")
    q.add_argument("--out", required=True, metavar="X.parquet", help="the embeddings table (id, lat, lon, "
                   "embedding)")
    q.set_defaults(func=_export)


def _ingest(args: argparse.Namespace) -> int:
    cfg = load_dataset_config(args.name, coordinates="optional" if args.unlabelled else None,
                              allow_private_addresses=True if args.allow_private_addresses else None,
                              max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels)
    check_writable(args.root, "--root", folder=True)  # an s3:// root without a bucket or access: before any work
    try:
        if args.test_share is None:
            made = {args.name: ingest(args.name, args.root, source=args.source, limit=args.limit, config=cfg)}
        else:
            parts = ingest_split(args.name, args.root, args.test_share, source=args.source, limit=args.limit,
                                 config=cfg)
            made = {args.name: parts["train"], f"{args.name}-test": parts["test"]}
    except ImportError as err:  # an optional extra (img2dataset) that is not installed
        print(f"locdiff data ingest: error: {err}", file=sys.stderr)
        return 2
    for name, m in made.items():
        skipped = ", ".join(f"{k} {v}" for k, v in m["skipped"].items()) or "none"
        unlabelled = f" ({m['unlabelled']} without coordinates)" if m.get("unlabelled") else ""
        exif = m.get("exif") or {}
        tags = (f"; GPS tags: {exif['labelled']} labelled by their tag, {exif['disagree']} over 1 km from the "
                f"metadata (the metadata's kept), {exif['malformed']} unusable") if any(exif.values()) else ""
        print(f"{name}: {m['count']} images in {len(m['shards'])} shards{unlabelled}; skipped: {skipped}{tags}")
    return 0


def _embed(args: argparse.Namespace) -> int:
    check_writable(args.root, "--root", folder=True)  # an s3:// root that cannot be written: before embedding
    try:
        m = embed(args.name, args.root, args.encoder, degree=args.degree, runner=args.runner)
    except RayUnavailable as err:
        print(f"locdiff data embed: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.name}: {m['count']} embeddings ({m['embedding']['dim']}-d {m['embedding']['dtype']})"
          + (f", SHDD degree {m['degree']}" if m["degree"] is not None else "")
          + f" in {len(m['shards'])} shards")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    print(format_report(inspect(args.folder, verify=not args.no_verify, progress=sys.stderr.isatty())))
    return 0


def _export(args: argparse.Namespace) -> int:
    folder = features_dir(args.root, args.name, encoder_folder_name(args.encoder))
    if os.path.isdir(folder):  # --out onto a shard, the manifest or a progress record would replace it
        check_not_an_input(args.out, "--out", {f"features stage's {os.path.relpath(os.path.join(d, f), folder)}":
                                               os.path.join(d, f) for d, _, files in os.walk(folder) for f in files})
    table = export_features(args.root, args.name, encoder_folder_name(args.encoder), args.out)
    print(f"wrote {len(table)} rows ({table.dim}-d) to {args.out}")
    return 0


