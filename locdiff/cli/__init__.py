"""The `locdiff` command. Each group of subcommands lives in its own module with a `register` function;
heavy libraries are imported inside the handlers so that `locdiff --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules under locdiff.cli that add subcommands; a module that is not there yet is skipped.
_GROUPS = ("shdd", "model", "evaluate", "data")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="locdiff", description="LocDiff image geolocalization.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(f"locdiff.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"locdiff.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as err:
        print(f"locdiff {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
