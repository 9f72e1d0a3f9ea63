"""Where a model is: a run folder, a saved MLflow model folder, or a model URI of the MLflow registry
(`models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/ID/PATH`), resolved to a local run folder.

A saved MLflow model is a LocDiff model when its python_function flavor names the loader module
`locdiff.inference.pyfunc` (LOADER_MODULE); its data folder is a run folder. mlflow is imported only
for a model URI (the library stays importable without it).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

from locdiff.errors import UserError
from locdiff.tracking_store import check_tracking_uri, resolve_tracking_uri, without_credentials

LOADER_MODULE = "locdiff.inference.pyfunc"
MODEL_FORMS = ("a run folder of `locdiff train`, a saved MLflow model folder, or a model URI models:/NAME@ALIAS, "
               "models:/NAME/VERSION or runs:/ID/PATH")


def check_location(uri: str, what: str | None = None) -> None:
    """UserError (naming `what`, e.g. a flag, when given) unless `uri` is a local path or a model URI of the
    registry: another URL (http://, s3://) is no model location (MLflow failed on it with a bare ValueError)."""
    if "://" in uri and not uri.startswith(("models:/", "runs:/")):
        raise UserError(f"{what + ' ' if what else ''}{uri}: not a model location; give {MODEL_FORMS}")


def check_registered(uri: str, tracking_uri: str | None = None) -> None:
    """UserError naming `uri` when a model URI of the registry (models:/NAME@ALIAS, models:/NAME/VERSION,
    runs:/ID/PATH) names no model version or run: metadata only, nothing is downloaded (a job can refuse it
    before its long first stage). Anything else: nothing here."""
    if not uri.startswith(("models:/", "runs:/")):
        return
    import mlflow
    from mlflow.exceptions import MlflowException

    turi = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(turi)
    client = mlflow.MlflowClient(tracking_uri=turi)
    try:
        if uri.startswith("runs:/"):
            client.get_run(uri.removeprefix("runs:/").split("/", 1)[0])
        else:
            rest = uri.removeprefix("models:/")
            if "@" in rest:
                client.get_model_version_by_alias(*rest.split("@", 1))
            elif rest.partition("/")[2].isdigit():
                client.get_model_version(*rest.split("/", 1))
            else:  # models:/NAME/latest, a stage: the name is checked, the rest is MLflow's when it downloads
                client.get_registered_model(rest.split("/", 1)[0])
    except MlflowException as err:
        raise UserError(f"{uri}: {str(err).splitlines()[0]} (tracking URI {without_credentials(turi)})") from None


def _model_folder(model_dir: Path, what: str) -> Path:
    """The data folder of a saved MLflow model (checks that it is a LocDiff model)."""
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text()) or {}
    flavor = (mlmodel.get("flavors") or {}).get("python_function") or {}
    if flavor.get("loader_module") != LOADER_MODULE or not flavor.get("data"):
        raise UserError(f"{what}: not a LocDiff model (an MLflow model without the {LOADER_MODULE} loader, "
                        "e.g. one logged by an older version); register the run again with `locdiff train` or "
                        "the train-locdiff pipeline")
    if flavor.get("code"):  # MLflow would put that folder first on the import path before loading the model
        raise UserError(f"{what}: its MLmodel names code to import (flavors.python_function.code); a LocDiff model "
                        "carries none: register the run again with `locdiff train` or the train-locdiff pipeline")
    return model_dir / flavor["data"]


def resolve_model(uri: str, *, tracking_uri: str | None = None
                  ) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """(local run folder, an object that keeps a download alive or None) for a run folder, a saved MLflow
    model folder, or a model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH) downloaded
    through MLflow."""
    _, run_dir, keep = _resolve(uri, tracking_uri)
    return run_dir, keep


def resolve_mlflow_model(uri: str, *, tracking_uri: str | None = None
                         ) -> tuple[Path, tempfile.TemporaryDirectory[str] | None]:
    """(the folder of a LocDiff MLflow model, holding MLmodel; an object that keeps a download alive or None)
    for a saved MLflow model folder or a model URI downloaded through MLflow."""
    model_dir, _, keep = _resolve(uri, tracking_uri)
    if model_dir is None:
        raise UserError(f"{uri}: a run folder, not an MLflow model: register it (`locdiff train`, the "
                        "train-locdiff pipeline) and give its model URI, such as models:/locdiff@champion")
    return model_dir, keep


def _resolve(uri: str, tracking_uri: str | None
             ) -> tuple[Path | None, Path, tempfile.TemporaryDirectory[str] | None]:
    """(the MLflow model folder or None for a plain run folder, the run folder, the download's keeper or None)."""
    check_location(uri)
    local = Path(uri).expanduser()
    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        if (local / "MLmodel").is_file():
            return local, _model_folder(local, uri), None
        if (local / "config.yaml").is_file():
            return None, local, None
        if local.exists():
            raise UserError(f"{uri}: neither a run folder (no config.yaml) nor an MLflow model (no MLmodel)")
        raise UserError(f"{uri}: no such run folder; give a run folder of `locdiff train` or a model URI "
                        "such as models:/locdiff@champion")
    import mlflow
    from mlflow.exceptions import MlflowException

    turi = resolve_tracking_uri(tracking_uri)
    check_tracking_uri(turi)
    mlflow.set_tracking_uri(turi)
    keep = tempfile.TemporaryDirectory(prefix="locdiff-model-")
    bar = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar or "false"  # one bar line per file otherwise
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=keep.name))
    except MlflowException as err:
        keep.cleanup()
        raise UserError(f"{uri}: {str(err).splitlines()[0]} (tracking URI {without_credentials(turi)})") from None
    finally:
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
    try:
        if not (path / "MLmodel").is_file():
            raise UserError(f"{uri}: not an MLflow model (no MLmodel file)")
        return path, _model_folder(path, uri), keep
    except UserError:
        keep.cleanup()
        raise
