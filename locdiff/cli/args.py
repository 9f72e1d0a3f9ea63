"""What every `locdiff` subcommand's flags share: the bounded-number `type=` and the SHDD degree bound."""

from __future__ import annotations

import argparse
import os
import typing

from locdiff.errors import UserError

MAX_DEGREE = 512  # the SHDD degree a flag may ask for (the bound of the config's shdd.degree)


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


def check_not_an_input(out: str | None, flag: str, inputs: dict[str, str | None]) -> None:
    """UserError where the output file `out` (of `flag`) is one of the `inputs` ({flag: path}): writing it would
    replace what the command reads. Local paths only (a URL is never the same file as another argument)."""
    if not out or not os.path.exists(out):
        return
    for name, path in inputs.items():
        if path and os.path.exists(path) and os.path.samefile(out, path):
            raise UserError(f"{flag} {out} is the {name} file: writing it would replace what is read; "
                            "give another file")
