"""The `locdiff` command. Each group of subcommands lives in its own module with a `register` function
(`_GROUPS`); the flags' shared helpers are in locdiff.cli.args.

This is the CLI's one error boundary: whatever a handler raises becomes ONE line on stderr,
`locdiff COMMAND: error: ...` (from `locdiff.errors.describe`), and exit code 2; Ctrl-C is
`locdiff COMMAND: interrupted` and 130. `--debug` prints the traceback before that line. Handlers raise
(a `locdiff.errors.UserError` where they can name the file, row or field) and never print errors themselves.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import typing
import warnings

from locdiff.cli import data, evaluate, locate, model, serve, shdd
from locdiff.cli.args import MAX_DEGREE, number_in
from locdiff.errors import describe, exit_code, one_line, printable

# The modules that add subcommands, each with a `register(subparsers)`, in the order of `locdiff --help`.
_GROUPS = (locate, shdd, model, evaluate, data, serve)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too (subparsers inherit the class): `locdiff train: error: ... (see --help)`."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _log_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning (Pillow's on a corrupt EXIF block, ...) as one log line, not two raw stderr lines."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, printable(one_line(str(message))))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="locdiff", description="LocDiff image geolocalization.")
    _global_flags(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _GROUPS:
        module.register(sub)
    # -v and --debug also after the subcommand (`locdiff train ... --debug`); SUPPRESS keeps the value
    # given before it. Each parser records its command name ("data ingest") for the error line.
    for child in _subparsers(parser):
        _global_flags(child, default=argparse.SUPPRESS)
        child.set_defaults(command_name=child.prog.split(" ", 1)[1] if " " in child.prog else child.prog)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `locdiff ARGV`; returns the exit status (0, 2 for an error, 130 when interrupted)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the subcommand given them (`locdiff train: error: ...`); before it, by `locdiff`
        before = argv[:argv.index(args.command)]
        command_parser = parser if any(u in before for u in unknown) else {
            child.prog: child for child in _subparsers(parser)}[f"locdiff {args.command_name}"]
        command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # faiss's loader logs six lines about CPU features on every gallery search
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        # the Hub client warns twice on every retry (the failure itself is the error line); it reads its level
        # when first imported
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    command = getattr(args, "command_name", args.command)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _log_warning
            return int(args.func(args) or 0)
    except (KeyboardInterrupt, Exception) as err:  # the boundary: one line, never a traceback by default
        if args.debug:
            traceback.print_exc()
        if isinstance(err, KeyboardInterrupt):
            print(f"locdiff {command}: interrupted", file=sys.stderr)
        else:
            print(f"locdiff {command}: error: {describe(err)}", file=sys.stderr)
        return exit_code(err)


__all__ = ["MAX_DEGREE", "build_parser", "main", "number_in"]


if __name__ == "__main__":
    sys.exit(main())
