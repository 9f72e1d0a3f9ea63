"""Where a model is: a run folder, a saved MLflow model folder, or a registry URI (locdiff.inference.model_uri)."""

from __future__ import annotations

import pytest
import yaml

from locdiff.errors import TrackingUnavailable, UserError
from locdiff.inference.model_uri import LOADER_MODULE, resolve_model


def mlmodel(folder, loader: str, data: str = "data/locdiff-model") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    flavor = {"python_function": {"loader_module": loader, "data": data}}
    (folder / "MLmodel").write_text(yaml.safe_dump({"flavors": flavor}))


def test_a_run_folder_is_itself(tmp_path):
    (tmp_path / "config.yaml").write_text("method: locdiff\n")
    assert resolve_model(str(tmp_path)) == (tmp_path, None)


def test_a_saved_locdiff_model_is_its_data_folder(tmp_path):
    mlmodel(tmp_path / "m", LOADER_MODULE)
    folder, keep = resolve_model(str(tmp_path / "m"))
    assert folder == tmp_path / "m" / "data" / "locdiff-model" and keep is None


def test_another_mlflow_model_is_refused_in_one_line(tmp_path):
    mlmodel(tmp_path / "m", "some.other.loader")
    with pytest.raises(UserError, match="not a LocDiff model") as err:
        resolve_model(str(tmp_path / "m"))
    assert "\n" not in str(err.value)


def test_a_folder_that_is_neither_and_a_missing_one_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="neither a run folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="no such run folder"):
        resolve_model(str(tmp_path / "absent"))


def test_a_registry_uri_with_an_unreachable_server_says_what_to_start():
    # port 1 on the loopback: the connection is refused at once, nothing leaves the machine
    with pytest.raises(TrackingUnavailable, match="infra/start.sh"):
        resolve_model("models:/locdiff@champion", tracking_uri="http://127.0.0.1:1")


@pytest.mark.parametrize("uri", ["http://127.0.0.1:9/m", "s3://bucket/model"])
def test_another_url_is_refused_naming_the_forms_accepted(tmp_path, capsys, uri):
    """`locate --run http://127.0.0.1:9/m` said `not enough values to unpack (expected 2, got 1)` (MLflow's
    HTTP artifact repository): a URL that is no model URI is refused, naming the flag and the forms taken."""
    from locdiff.cli import main

    with pytest.raises(UserError, match="not a model location; give a run folder .* models:/NAME@ALIAS"):
        resolve_model(uri)
    assert main(["locate", "--run", uri, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"locdiff locate: error: --run {uri}: not a model location; give a run folder") and \
        "runs:/ID/PATH" in err and err.count("\n") == 1, err
