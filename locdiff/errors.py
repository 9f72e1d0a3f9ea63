"""Errors a user can cause or meet, and their one-line descriptions (the CLI's and the flows' error boundary).

Three tools, for three places:

- In the library, raise a `UserError` (a ValueError) whose message names the file, row or field and
  what to do: `raise UserError(f"{path}: column 'lat' is missing; add it or choose another table")`.
  `ConfigError` is the one for a config value; `CorruptFileError` and `DiskFullError` are what
  `reraise_for` raises.
- Around a read or a write of one file, `reraise_for(path)` turns what the reader raises on a corrupt,
  truncated or unwritable file (BadZipFile, EOFError, UnpicklingError, torch.load's RuntimeError, a
  ValueError of numpy/pyarrow/json, a YAML error, ENOSPC, ...) into a UserError naming that file:

      with reraise_for(path, what="checkpoint"):
          state = torch.load(path, map_location="cpu", weights_only=True)
      with reraise_for(tmp):                       # a full disk becomes DiskFullError naming tmp
          torch.save(state, tmp)

  Keep the block to the read or write itself: every ValueError inside it is reported as the file's fault.
- At the boundary (`locdiff.cli.main`, a Prefect flow), `describe(exc)` is the one line to show and
  `exit_code(exc)` the status (2; 130 for Ctrl-C). A flow can do
  `except Exception as exc: raise RuntimeError(describe(exc, debug_hint="see the task log")) from exc`.

Only the standard library and PyYAML are imported here; pyarrow, torch and botocore errors are recognised
by their module name, so importing this module stays cheap.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager

import yaml

DEBUG_HINT = "run with --debug for the traceback"
_MAX_LEN = 600  # characters of a third-party message kept in the one line
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class UserError(ValueError):
    """A failure the user can fix; its message is the whole one-line report (file/row/field, what to do)."""


class ConfigError(UserError):
    """A config value that fails validation: `SOURCE: KEY: PROBLEM` (`--set KEY: PROBLEM` for an override).

    Attributes: source (the file, or e.g. "--set"), key (the dotted key path, e.g. "train.steps"),
    problem (e.g. "must be an integer >= 1; got -5").
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = source
        if key:  # a flag as the source reads "--set train.steps: ...", a file "base.yaml: train.steps: ..."
            where = f"{source} {key}" if source.startswith("-") else f"{source}: {key}" if source else key
        super().__init__(f"{where}: {problem}" if where else problem)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server cannot be reached (its message says what to start)."""


class CorruptFileError(UserError):
    """A file that cannot be read as what it should be (corrupt, truncated, wrong format)."""

    def __init__(self, path: str | os.PathLike[str], message: str) -> None:
        self.path = str(path)
        super().__init__(message)


class DiskFullError(UserError):
    """No space left (or quota exceeded) while writing `path`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        super().__init__(f"disk full while writing {self.path}: free space or choose another --out")


def one_line(text: str, limit: int = _MAX_LEN) -> str:
    """`text` on one line (newlines and their indentation folded into spaces), cut to `limit` characters."""
    text = re.sub(r"\s*\n\s*", " ", str(text)).strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable_name(name: str) -> str:
    """A file name as the text every output takes (a table, a map, a terminal): the bytes of a name that is not
    UTF-8 (os.fsdecode's surrogates, which UTF-8 writers refuse) written as escapes, `x\\xff.jpg`."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to
        return name.encode("utf-8", "surrogatepass").decode("utf-8", "backslashreplace")


def printable(text: object, limit: int = 300) -> str:
    """`text` (a file name, a tag's value) safe to put in a message: bytes that are not UTF-8 and control
    characters escaped (a newline in a file name cannot forge a line of its own: `a\\nb`), cut to `limit`
    characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], printable_name(str(text)))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_module(exc: BaseException, *prefixes: str) -> bool:
    return any(type(exc).__module__.split(".")[0] == p for p in prefixes) or any(
        c.__module__.split(".")[0] in prefixes for c in type(exc).__mro__[1:-1]
    )


def _is_torch_oom(exc: BaseException) -> bool:
    return any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__)


def _yaml_where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    if mark is None:
        return ""
    name = "" if mark.name in (None, "<unicode string>", "<byte string>", "<file>") else f"{mark.name}: "
    return f"{name}line {mark.line + 1} column {mark.column + 1}"


def _yaml_text(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    where = _yaml_where(exc)
    if problem and where:
        return f"not valid YAML ({problem} at {where})"
    return f"not valid YAML ({one_line(str(exc), 200)})"


def _file_detail(exc: BaseException) -> str:
    """What went wrong reading a file, in a few words (for CorruptFileError)."""
    msg = one_line(str(exc), 200)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
        return "it holds pickled objects that are not plain tensors (refused to unpickle them)"
    if isinstance(exc, yaml.YAMLError):
        return _yaml_text(exc)
    if isinstance(exc, json.JSONDecodeError):
        return f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
    if isinstance(exc, EOFError):
        return f"it ends too early ({msg})" if msg else "it ends too early"
    if isinstance(exc, KeyError):
        return f"a member is missing ({msg})"
    if isinstance(exc, zipfile.BadZipFile):
        return f"not a complete zip/npz archive ({msg})"
    if isinstance(exc, RuntimeError) and "PytorchStream" in msg:
        return f"not a complete torch file ({msg})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def _os_error(exc: OSError) -> str:
    name = exc.filename
    if exc.errno in _DISK_FULL:
        return str(DiskFullError(name if name is not None else "a file"))
    if name is None:
        return one_line(str(exc))
    name = os.fsdecode(name) if isinstance(name, bytes | os.PathLike) else str(name)
    if exc.filename2 is not None:
        name = f"{name} -> {os.fsdecode(exc.filename2)}"
    if "://" in name and exc.strerror is None and isinstance(exc, FileNotFoundError | PermissionError):
        # object storage in its own words (storage.named gave it the URL): no bucket, a wrong key, no access
        return (f"{name}: {'not found' if isinstance(exc, FileNotFoundError) else 'access denied'} "
                f"({one_line(str(exc.args[0] if exc.args else ''), 200)}); check the endpoint, bucket and credentials")
    if isinstance(exc, FileNotFoundError):
        return f"{name}: no such file or directory; check the path"
    if isinstance(exc, PermissionError):
        return f"{name}: permission denied; check its permissions or choose another path"
    if isinstance(exc, IsADirectoryError):
        return f"{name}: is a directory; give a file"
    if isinstance(exc, NotADirectoryError):
        return f"{name}: a part of this path is not a directory; check the path"
    if isinstance(exc, FileExistsError) and os.path.lexists(name) and not os.path.isdir(name):
        # a folder to create (an output's parent) is an existing file: "File exists" did not say why it failed
        return f"{name}: is a file, not a directory; check the path"
    return f"{name}: {exc.strerror or one_line(str(exc))}"


def describe(exc: BaseException, *, debug_hint: str = DEBUG_HINT) -> str:
    """The one line (no trailing newline, no command prefix) that reports `exc` to a user.

    UserError, plain ValueError and a "...Unavailable" service error: their message. OS errors: the file
    and the cause (a full disk says so). YAML, JSON, Arrow/Parquet, zip/pickle/EOF and torch.load errors:
    the kind of damage (the file is named when the error came through `reraise_for`). Anything else is a
    bug, reported as "unexpected TYPE: message (`debug_hint`)".
    """
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, UserError) or type(exc).__name__.endswith("Unavailable"):
        # ...Unavailable: a service that cannot be reached (TrackingUnavailable,
        # distributed.RayUnavailable); their messages say what to start. New ones should subclass UserError.
        return one_line(str(exc))
    if isinstance(exc, OSError) and not _from_module(exc, "pyarrow"):
        return _os_error(exc)
    if isinstance(exc, yaml.YAMLError):
        return _yaml_text(exc)
    if isinstance(exc, json.JSONDecodeError):
        return (f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                f"{debug_hint} to see which file")
    if _from_module(exc, "pyarrow"):
        return f"invalid Arrow/Parquet data: {one_line(str(exc))}"
    if isinstance(exc, zipfile.BadZipFile | EOFError | pickle.UnpicklingError | tarfile.TarError | struct.error):
        return f"a file is corrupt or truncated ({_file_detail(exc)}); {debug_hint} to see which one"
    if _is_torch_oom(exc):
        return "out of GPU memory; lower train.batch_size or predict.batch_size, or use a smaller model"
    if isinstance(exc, MemoryError):
        return "out of memory; lower the batch size or the data size"
    if isinstance(exc, RuntimeError) and re.search(r"PytorchStream(Reader|Writer)|zip archive|central directory",
                                                   str(exc)):
        return f"a torch file is corrupt or truncated ({one_line(str(exc), 200)}); {debug_hint} to see which one"
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return f"the package {exc.name!r} is not installed; install it (pip install {exc.name.split('.')[0]})"
    if isinstance(exc, ValueError):
        return one_line(str(exc))
    if _from_module(exc, "botocore", "boto3", "s3fs"):
        return f"object storage: {one_line(str(exc))}; check the endpoint, bucket and credentials"
    if _from_module(exc, "mlflow"):
        return f"MLflow: {one_line(str(exc))}; check MLFLOW_TRACKING_URI and that the server is running"
    msg = one_line(str(exc))
    return f"unexpected {type(exc).__name__}{': ' + msg if msg else ''} ({debug_hint})"


def exit_code(exc: BaseException) -> int:
    """The process exit status for `exc`: 130 for Ctrl-C, 2 for everything else."""
    return 130 if isinstance(exc, KeyboardInterrupt) else 2


@contextmanager
def reraise_for(path: str | os.PathLike[str], *, what: str = "file",
                hint: str = "replace it or write it again", writing: bool = False) -> Iterator[None]:
    """Re-raise what a read or write of `path` raises as a UserError naming `path`.

    Inside the block: a full disk becomes DiskFullError(path); a missing/unreadable path keeps its
    FileNotFoundError/PermissionError/IsADirectoryError (with `path` as its filename when it had none);
    other OSErrors without a file name, ValueError (json, numpy, pyarrow), KeyError, EOFError,
    BadZipFile, UnpicklingError, TarError, struct.error, YAML errors, RuntimeError (torch.load) and
    MemoryError become CorruptFileError: "PATH: cannot read WHAT: DETAIL; HINT". UserErrors pass unchanged.

    Args:
        path: the file read or written (shown as given).
        what: what the file is, e.g. "checkpoint", "gallery", "shard".
        hint: what the user can do about a corrupt file.
        writing: the block writes `path` ("cannot write" instead of "cannot read").
    """
    shown = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    verb = "write" if writing else "read"
    try:
        yield
    except UserError:
        raise
    except OSError as exc:
        if exc.errno in _DISK_FULL or "No space left on device" in str(exc):  # pyarrow's carry no errno
            raise DiskFullError(exc.filename if exc.filename is not None else shown) from exc
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
            if exc.filename is None:
                exc.filename = shown
            raise
        if exc.filename is not None and not _from_module(exc, "pyarrow"):
            raise
        raise CorruptFileError(shown, f"{shown}: cannot {verb} {what}: {_file_detail(exc)}; {hint}") from exc
    except MemoryError as exc:
        raise CorruptFileError(shown, f"{shown}: {what} is too large to load (out of memory); {hint}") from exc
    except (ValueError, KeyError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, tarfile.TarError,
            struct.error, yaml.YAMLError, RuntimeError) as exc:
        if _is_torch_oom(exc):
            raise
        raise CorruptFileError(shown, f"{shown}: cannot {verb} {what}: {_file_detail(exc)}; {hint}") from exc


__all__ = [
    "DEBUG_HINT", "ConfigError", "CorruptFileError", "DiskFullError", "UserError", "describe", "exit_code",
    "one_line", "printable", "reraise_for",
]
