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


def check_output_url(out: str | None, flag: str, schemes: tuple[str, ...] = ()) -> None:
    """UserError where the output `out` (of `flag`) is a URL whose scheme is not one of `schemes` (those the
    command writes through the storage layer; none: a local path only). Otherwise s3://b/x would be written
    to the local folder s3:/b, memory://x to a store that is gone when the command ends."""
    if not out or "://" not in out:
        return
    scheme = out.split("://", 1)[0]
    if scheme.lower() not in schemes:
        give = f"a local path or a URL of {', '.join(s + '://' for s in schemes)}" if schemes else "a local path"
        raise UserError(f"{flag} {out}: cannot write to {scheme}:// URLs; give {give}")


def check_not_an_input(out: str | None, flag: str, inputs: dict[str, str | None]) -> None:
    """UserError where the output file `out` (of `flag`) is one of the `inputs` ({flag: path}): writing it would
    replace what the command reads. Local paths only (a URL is never the same file as another argument)."""
    if not out or not os.path.exists(out):
        return
    for name, path in inputs.items():
        if path and os.path.exists(path) and os.path.samefile(out, path):
            raise UserError(f"{flag} {out} is the {name} file: writing it would replace what is read; "
                            "give another file")
