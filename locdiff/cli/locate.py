"""`locdiff locate`: where were these photos taken? (locdiff.inference.Geolocator behind a command)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
    p.add_argument("--batch-size", type=int, metavar="N", help="photos per encoder batch (default: the encoder's)")
    p.add_argument("--device", metavar="DEVICE", help="cpu, cuda or cuda:N (default: a GPU when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_locate)


def photo_files(paths: list[str]) -> list[str]:
    """Files as given, and the image files under each folder (sorted; symlinks that lead out of the
    folder are left out). A path that does not exist is kept: it is reported as unreadable."""
    from locdiff.data.sources.base import IMAGE_EXTENSIONS

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
            for name in filenames:
                f = Path(dirpath) / name
                if name.lower().endswith(IMAGE_EXTENSIONS) and f.resolve().is_relative_to(root):
                    found.append(str(f))
        out.extend(sorted(found))
    return out


def _locate(args: argparse.Namespace) -> int:
    from locdiff.errors import UserError
    from locdiff.inference.geolocator import check_top_k

    check_top_k(args.top_k, "--top-k")
    if args.out and not args.out.endswith((".csv", ".parquet")):
        raise UserError(f"--out {args.out}: give a .csv or .parquet file")
    if args.map and not args.map.lower().endswith(".png"):
        raise UserError(f"--map {args.map}: give a .png file")
    files = photo_files(args.photos)
    if not files:
        raise UserError(f"no image files (JPEG/PNG/WebP) in {', '.join(args.photos)}")
    from locdiff.inference.geolocator import Geolocator, format_locations, write_locations

    g = Geolocator.load(args.run, device=args.device)
    results = g.locate(files, top_k=args.top_k, method=args.method, batch_size=args.batch_size,
                       progress=not args.no_progress)
    located = [r for r in results if r.ok]
    for r in results:
        if not r.ok:
            print(f"locdiff locate: skipped {r.id}: {r.error}", file=sys.stderr)
    print(format_locations(results, modes=args.top_k))
    print(f"\n{len(located)} of {len(results)} photos located with {args.run} ({args.method}); confidence: "
          f"calibrated probability of lying within {g.radius_km:g} km")
    if args.out:
        write_locations(args.out, results, args.top_k)
        print(f"wrote {args.out}")
    if args.map and located:
        from locdiff.plots import locations_map

        locations_map(args.map, [r.lat for r in located], [r.lon for r in located],
                      [Path(r.id).name for r in located], title=f"located with {args.run}")
        print(f"wrote {args.map}")
    if not located:
        raise UserError(f"none of the {len(results)} photos could be read (see the lines above)")
    return 0
