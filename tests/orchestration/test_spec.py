"""One description of a run: the data set type shared by the flows and the library, and the RunSpec built
once (config, data identities, completion key, run folder)."""

from __future__ import annotations

import dataclasses

import pytest

from flows.params import DataSet as FlowDataSet
from locdiff.hashing import stable_hash
from locdiff.model.config import config_to_dict
from locdiff.orchestration.spec import DataSet, RunSpec, resolve_config
from locdiff.pipeline import DataSpec


def test_one_data_set_type_for_flows_and_library():
    assert FlowDataSet is DataSet and DataSpec is DataSet
    assert DataSet.parse("mp16") == DataSet(name="mp16")
    parsed = DataSet.parse({"name": "t", "source": "folder", "path": "/x", "limit": 3})
    assert (parsed.config_name, parsed.path, parsed.limit, parsed.encoder) == ("folder", "/x", 3, "clip-vit-l14")
    assert DataSet.parse(parsed) is parsed
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bad'\]; valid: name, source, path, encoder, limit"):
        DataSet.parse({"name": "t", "bad": 1})
    with pytest.raises(ValueError, match="a name or a mapping with 'name'"):
        DataSet.parse({"source": "folder"})
    with pytest.raises(ValueError):  # the flows' parameters refuse unknown keys as well
        DataSet(name="t", bad=1)


def test_run_spec_holds_the_key_of_the_config_and_data(tmp_path):
    from locdiff.worlds.synth import SynthConfig, write_benchmark

    data = write_benchmark(tmp_path / "synth", SynthConfig(n_train=200, n_test=20, n_unseen=20, n_val=20,
                                                           n_val_unseen=20, dim=16, seed=0))
    config = resolve_config("tiny", degree=4, overrides=["train.steps=5"])
    assert config.shdd.degree == 4 and config.train.steps == 5
    spec = RunSpec.build(config, data["train"], tmp_path / "run", val=data["val"], config_name="tiny")
    # the key, written out: the hash of the resolved config less its memory budgets and of the identities of
    # the data (completion_key is what RunSpec.build itself calls: no reference)
    settings = {k: v for k, v in config_to_dict(config).items() if k != "limits"}
    assert spec.key == stable_hash({"config": settings, "data": dict(spec.data)})
    budgets = resolve_config("tiny", degree=4, overrides=["train.steps=5", "limits.max_parameters=1000000"])
    assert RunSpec.build(budgets, data["train"], tmp_path / "run", val=data["val"]).key == spec.key
    assert set(spec.data) == {"train", "val"} and spec.run_dir == tmp_path / "run"
    assert str(spec.train) == str(data["train"].resolve())  # recorded as absolute paths
    same = RunSpec.build(resolve_config("tiny", degree=4, overrides=["train.steps=5"]), data["train"],
                         tmp_path / "elsewhere", val=data["val"], config_name="tiny")
    assert same.key == spec.key and same != spec and same.at(tmp_path / "run") == spec
    other = RunSpec.build(resolve_config("tiny", degree=4, overrides=["train.steps=6"]), data["train"],
                          tmp_path / "run", val=data["val"])
    assert other.key != spec.key
    unseen = RunSpec.build(config, data["train"], tmp_path / "run", val=data["val"],
                           val_unseen=data["val_unseen"])
    assert set(unseen.data) == {"train", "val", "val_unseen"} and unseen.key != spec.key
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.key = "x"  # type: ignore[misc]


FLOW_URL_PARAMETERS = {  # flow -> its parameters that take a path or URL (DataSet.path inside data sets)
    "train-locdiff": ["root", "tracking_uri", "synth", "train_data.path", "tests.path", "val.path",
                      "val_unseen.path"],
    "locate-photos": ["photos", "model", "out", "tracking_uri"],
    "train": ["root", "run_dir", "tracking_uri", "dataset.path"],
    "evaluate": ["run_dir", "root", "tracking_uri", "datasets.path"],
    "ingest": ["root", "dataset.path"], "embed": ["root", "dataset.path"],
}


@pytest.mark.parametrize("flow_name", sorted(FLOW_URL_PARAMETERS))
def test_flow_schemas_refuse_a_url_carrying_credentials(flow_name):
    """The schema the Prefect API checks a deployment run against (before it stores the run's parameters)
    refuses user:password@ in every path or URL parameter, and takes the same parameter without it."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows import embed, evaluate, ingest, locate, pipeline, train

    flows = {f.name: f for f in (pipeline.train_locdiff, locate.locate_photos, train.train, evaluate.evaluate,
                                 ingest.ingest, embed.embed)}
    schema = parameter_schema(flows[flow_name]).model_dump_for_openapi()
    needed = {"train-locdiff": {"train_data": {"name": "a"}, "tests": []}, "locate-photos": {"photos": "p"},
              "train": {"config": "tiny", "dataset": {"name": "a"}, "root": "r", "run_dir": "d"},
              "evaluate": {"run_dir": "d", "datasets": [], "root": "r"}}.get(flow_name, {"dataset": {"name": "a"},
                                                                                        "root": "r"})
    validate(needed, schema, raise_on_error=True)
    for param in FLOW_URL_PARAMETERS[flow_name]:
        for url, refused in (("s3://bucket/x", False), ("sqlite:///a@b.db", False), ("data/a@b", False),
                             ("s3://AKIAKEY:s3cret@bucket/x", True), ("https://user:pw@host/x.csv", True),
                             ("http://token@127.0.0.1:5000", True)):
            name, _, key = param.partition(".")
            value = {"name": "a", key: url} if key else url
            params = {**needed, name: [value] if name in ("tests", "datasets") else value}
            if refused:
                with pytest.raises(ValidationError, match="should not be valid"):
                    validate(params, schema, raise_on_error=True)
            else:
                validate(params, schema, raise_on_error=True)
