"""`locdiff locate`: where were these photos taken? (locdiff.inference.Geolocator behind a command)."""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

from locdiff.cli.args import OUTPUT_SCHEMES, check_output_file, number_in
from locdiff.data.sources.base import IMAGE_EXTENSIONS
from locdiff.engine import resolve_device
from locdiff.errors import UserError, printable
from locdiff.inference.geolocator import Geolocator, check_top_k, format_locations, write_locations
from locdiff.inference.model_uri import check_location
from locdiff.io import write_file_atomic
from locdiff.plots import locations_map
from locdiff.schema import DEVICE_EXPECT, DEVICE_PATTERN


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "locate", help="locate photos with a trained run or a registered model",
        description="Locate photos (JPEG/PNG/WebP files, or folders of them, searched recursively): embed them "
        "with the run's image encoder, predict, and print file, lat, lon, the nearest place (offline "
        "gazetteer), the calibrated confidence (probability of lying within the run's confidence radius) and "
        "the top-k modes of the predicted density with their probabilities. Unreadable files are reported "
        "and skipped.")
    p.add_argument("--run", required=True, metavar="RUN_OR_MODEL_URI",
                   help="a run folder of `locdiff train`, or a model URI such as models:/locdiff@champion "
                   "(MLFLOW_TRACKING_URI, else the local store)")
    p.add_argument("photos", nargs="+", metavar="PHOTO_OR_FOLDER", help="photo files and/or folders")
    p.add_argument("--top-k", type=int, default=5, metavar="K", help="modes per photo (default 5)")
    p.add_argument("--method", choices=("locdiff", "locdiff-h"), default="locdiff",
                   help="plain LocDiff (default) or LocDiff-H (retrieval)")
    p.add_argument("--out", metavar="PREDICTIONS", help="also write the table: .csv or .parquet")
    p.add_argument("--map", metavar="MAP.png", help="also draw the located photos on a world map")
    p.add_argument("--batch-size", type=number_in(1, 4096), metavar="N",
                   help="photos per encoder batch (default: the encoder's)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: a GPU when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_locate)


SKIPPED_KINDS = {"symlink_outside": "symlinks leading out of the folder", "symlinked_folder": "symlinked folders "
                 "(not followed)", "special": "entries that are not regular files", "not_an_image": "files that "
                 "are not JPEG/PNG/WebP", "symlink_loop": "symlinks that lead nowhere (a loop)"}


def photo_files(paths: list[str], skipped: dict[str, int] | None = None) -> list[str]:
    """Files as given, and the image files under each folder (sorted). Under a folder, symlinks that lead
    out of it, symlink loops, symlinked folders, entries that are not regular files (FIFOs, sockets, devices)
    and files that are not JPEG/PNG/WebP are left out and counted in `skipped` (by SKIPPED_KINDS). A path
    that does not exist is kept: it is reported as unreadable."""
    counts = skipped if skipped is not None else {}
    out: list[str] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            out.append(given)
            continue
        root = path.resolve()
        found = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            dirnames.sort()
            for name in dirnames:
                if (Path(dirpath) / name).is_symlink():
                    counts["symlinked_folder"] = counts.get("symlinked_folder", 0) + 1
            for name in filenames:
                f = Path(dirpath) / name
                try:
                    target = f.resolve() if f.is_symlink() else f
                except (RuntimeError, OSError):  # a symlink loop (RuntimeError up to Python 3.12)
                    counts["symlink_loop"] = counts.get("symlink_loop", 0) + 1
                    continue
                kind = ("symlink_outside" if f.is_symlink() and not target.is_relative_to(root)
                        else "special" if not f.is_file()
                        else "not_an_image" if not name.lower().endswith(IMAGE_EXTENSIONS) else None)
                if kind is None:
                    found.append(str(f))
                else:
                    counts[kind] = counts.get(kind, 0) + 1
        out.extend(sorted(found))
    return out


def _locate(args: argparse.Namespace) -> int:
    check_top_k(args.top_k, "--top-k")
    check_location(args.run, "--run")
    if args.out and not args.out.endswith((".csv", ".parquet")):
        raise UserError(f"--out {args.out}: give a .csv or .parquet file")
    if args.map and not args.map.lower().endswith(".png"):
        raise UserError(f"--map {args.map}: give a .png file")
    skipped: dict[str, int] = {}
    files = photo_files(args.photos, skipped)
    left_out = "left out of the folders: " + ", ".join(f"{n} {SKIPPED_KINDS[k]}"
                                                        for k, n in sorted(skipped.items()))
    if not files:
        raise UserError(f"no image files (JPEG/PNG/WebP) in {', '.join(args.photos)}"
                        + (f" ({left_out})" if skipped else ""))
    for flag, out in (("--out", args.out), ("--map", args.map)):  # before any work; the map replaced a photo
        check_output_file(out, flag, [("photo", f) for f in files], OUTPUT_SCHEMES)
    if args.device is not None:  # named as the flag (the model's config would call it train.device)
        if not re.fullmatch(DEVICE_PATTERN, args.device):
            raise UserError(f"--device {args.device[:40]!r}: give {DEVICE_EXPECT}")
        resolve_device(args.device, setting="--device")
    g = Geolocator.load(args.run, device=args.device)
    results = g.locate(files, top_k=args.top_k, method=args.method, batch_size=args.batch_size,
                       progress=not args.no_progress)
    located = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            print(f"locdiff locate: skipped {printable(r.id)}: {printable(r.error)}", file=sys.stderr)
    if skipped:
        print(f"locdiff locate: {left_out}", file=sys.stderr)
    print(format_locations(results, modes=args.top_k))
    print(f"\n{len(located)} of {len(results)} photos located with {args.run} ({args.method}); confidence: "
          f"calibrated probability of lying within {g.radius_km:g} km")
    if not located:  # before --out: a failed call leaves an existing table as it was
        raise UserError(f"none of the {len(results)} photos could be read (see the lines above)")
    png = None
    if args.map:  # drawn before anything is written: a failure leaves --out as it was too
        with tempfile.TemporaryDirectory(prefix="locdiff-map-") as tmp:
            png = locations_map(Path(tmp) / "map.png", [r.lat for r in located], [r.lon for r in located],
                                [Path(r.id).name for r in located], title=f"located with {args.run}").read_bytes()
    if args.out:
        write_locations(args.out, results, args.top_k)
        print(f"wrote {args.out}")
    if png is not None:
        write_file_atomic(args.map, png)
        print(f"wrote {args.map}")
    return 0

