"""The `locdiff` command. Each group of subcommands lives in its own module with a `register` function;
heavy libraries are imported inside the handlers so that `locdiff --help` stays fast.

This is the CLI's one error boundary: whatever a handler raises becomes ONE line on stderr,
`locdiff COMMAND: error: ...` (from `locdiff.errors.describe`), and exit code 2; Ctrl-C is
`locdiff COMMAND: interrupted` and 130. `--debug` prints the traceback before that line. Handlers raise
(a `locdiff.errors.UserError` where they can name the file, row or field) and never print errors themselves.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
import typing

MAX_DEGREE = 512  # the SHDD degree a flag may ask for (the bound of the config's shdd.degree)
# Modules under locdiff.cli that add subcommands; a module that is not there yet is skipped.
_GROUPS = ("locate", "shdd", "model", "evaluate", "data")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too (subparsers inherit the class): `locdiff train: error: ... (see --help)`."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def number_in(lo: float, hi: float, kind: type = int) -> typing.Callable[[str], float]:
    """An argparse `type=` for a bounded number: `--n` outside [lo, hi] is the usual one-line usage error
    (`locdiff shdd roundtrip: error: argument --n: must be an integer in [1, 10000000]; got 10**9`), before
    any work. Every numeric flag has one (issue 21)."""
    what = "an integer" if kind is int else "a number"
    span = f"[{int(lo)}, {int(hi)}]" if kind is int else f"[{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} in {span}; got {text[:40]!r}") from None
        if not lo <= value <= hi:  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"must be {what} in {span}; got {text[:40]}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def _global_flags(parser: argparse.ArgumentParser, *, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the traceback of an error (with its one-line report)")


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                out += [child, *_subparsers(child)]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="locdiff", description="LocDiff image geolocalization.")
    _global_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _GROUPS:
        try:
            module = importlib.import_module(f"locdiff.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"locdiff.cli.{name}":
                continue
            raise
        module.register(sub)
    # -v and --debug also after the subcommand (`locdiff train ... --debug`); SUPPRESS keeps the value
    # given before it. Each parser records its command name ("data ingest") for the error line.
    for child in _subparsers(parser):
        _global_flags(child, default=argparse.SUPPRESS)
        child.set_defaults(command_name=child.prog.split(" ", 1)[1] if " " in child.prog else child.prog)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `locdiff ARGV`; returns the exit status (0, 2 for an error, 130 when interrupted)."""
    from locdiff.errors import describe, exit_code

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = getattr(args, "command_name", args.command)
    try:
        return int(args.func(args) or 0)
    except (KeyboardInterrupt, Exception) as err:  # the boundary: one line, never a traceback by default
        if args.debug:
            traceback.print_exc()
        if isinstance(err, KeyboardInterrupt):
            print(f"locdiff {command}: interrupted", file=sys.stderr)
        else:
            print(f"locdiff {command}: error: {describe(err)}", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
