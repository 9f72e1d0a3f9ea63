"""The configs shipped with LocDiff, found by bare name: `tiny` is `configs/model/tiny.yaml`.

The one source is the repository's top-level `configs/` folder. The package reaches it as
`locdiff/configs`: a link to `../configs` in a checkout (and so in an editable install), real files in a
wheel (setuptools copies the linked files in as package data), so the same lookup works in both. The
environment variable LOCDIFF_CONFIGS names another folder of the same layout instead.

    config_path("model", "tiny")          # .../configs/model/tiny.yaml
    config_path("model", "my/run.yaml")   # a YAML path is taken as it is
    config_path("model", "configs/model/tiny.yaml")   # the shipped tiny.yaml where no such file is (a wheel)
    known_configs("datasets")             # ["embeddings", "folder", ...]

"""

from __future__ import annotations

import os
from pathlib import Path

from locdiff.errors import UserError

KINDS = ("model", "datasets", "encoders")
_WHAT = {"model": "model config", "datasets": "data set", "encoders": "encoder config"}


def configs_dir() -> Path:
    """The configs folder: LOCDIFF_CONFIGS when set, else the one shipped with the package."""
    env = os.environ.get("LOCDIFF_CONFIGS")
    if env:
        return Path(env)
    packaged = Path(__file__).resolve().parent / "configs"
    if packaged.is_dir():
        return packaged.resolve()  # in a checkout: the top-level configs/ the link points to
    # A checkout whose link was not created (e.g. symlinks off in git): the top-level folder beside it.
    return Path(__file__).resolve().parent.parent / "configs"


def known_configs(kind: str) -> list[str]:
    """The bare names of the shipped configs of one kind ("model", "datasets" or "encoders")."""
    _check_kind(kind)
    return sorted(p.stem for p in (configs_dir() / kind).glob("*.yaml"))


def is_yaml_path(name: str | os.PathLike) -> bool:
    return Path(name).suffix in (".yaml", ".yml")


def find_config(kind: str, name: str | os.PathLike) -> Path | None:
    """configs/KIND/NAME.yaml for a bare name, NAME itself for a YAML path; None when it is not a file."""
    _check_kind(kind)
    path = Path(name) if is_yaml_path(name) else configs_dir() / kind / f"{name}.yaml"
    if not path.is_file() and is_yaml_path(name) and Path(name).parts[-3:-1] == ("configs", kind):
        path = configs_dir() / kind / Path(name).name  # `configs/model/tiny.yaml` outside a checkout: the shipped one
    return path if path.is_file() else None


def config_path(kind: str, name: str | os.PathLike) -> Path:
    """Like `find_config`, but a missing config is a ValueError naming it and the known names."""
    path = find_config(kind, name)
    if path is not None:
        return path
    if is_yaml_path(name):  # a path the user gave: say what is wrong with it
        if Path(name).is_dir():
            raise UserError(f"{name}: is a directory; give a YAML file")
        raise FileNotFoundError(f"{name}: no such config file; check the path")
    where = configs_dir() / kind / f"{name}.yaml"
    raise ValueError(f"unknown {_WHAT[kind]} {str(name)!r}: no file {where}; known configs: "
                     f"{', '.join(known_configs(kind)) or '(none)'} (or give a YAML path)")


def model_config_path(name: str | os.PathLike) -> Path:
    """The model config for `locdiff train --config NAME_OR_PATH` and the pipeline's `config`."""
    return config_path("model", name)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; one of {', '.join(KINDS)}")


