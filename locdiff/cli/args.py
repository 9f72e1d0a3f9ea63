"""What every `locdiff` subcommand's flags share: the bounded-number `type=` and the SHDD degree bound."""

from __future__ import annotations

import argparse
import errno
import os
import typing

from locdiff.data.storage import check_writable
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


# the URLs an output file may name: written through the storage layer (memory:// would be gone when the command ends)
OUTPUT_SCHEMES = ("s3", "s3a", "file")


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


def check_not_an_input(out: str | None, flag: str,
                       inputs: dict[str, str | None] | list[tuple[str, str | None]]) -> None:
    """UserError where the output file `out` (of `flag`) is one of the `inputs` ({flag: path}, or (name, path)
    pairs): writing it would replace what the command reads. Local paths only (a URL is never the same file as
    another argument)."""
    if not out or not os.path.exists(out):
        return
    for name, path in inputs.items() if isinstance(inputs, dict) else inputs:
        if path and os.path.exists(path) and os.path.samefile(out, path):
            raise UserError(f"{flag} {out} is the {name} file: writing it would replace what is read; "
                            "give another file")


def check_output_file(out: str | None, flag: str, inputs: dict[str, str | None] | list[tuple[str, str | None]],
                      schemes: tuple[str, ...] = ()) -> None:
    """Before any work, where the output file `out` (of `flag`) cannot be written: a URL of a scheme not in
    `schemes` (`check_output_url`), a folder (IsADirectoryError), a path under a file, one of the `inputs`
    (`check_not_an_input`), or a URL that cannot be written (`storage.check_writable`: no bucket, no access)."""
    check_output_url(out, flag, schemes)
    if not out or "://" in out:
        check_writable(out or "", flag)
        return
    if os.path.isdir(out):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), out)
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):  # the nearest folder that exists: the others are made
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{parent}: is a file, not a directory; check the path ({flag} {out})")
    check_not_an_input(out, flag, inputs)
