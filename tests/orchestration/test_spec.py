"""One description of a run: the data set type shared by the flows and the library, and the RunSpec built
once (config, data identities, completion key, run folder)."""

from __future__ import annotations

import dataclasses

import pytest

from flows.params import DataSet as FlowDataSet
from locdiff.model.config import config_to_dict
from locdiff.orchestration.spec import DataSet, RunSpec, resolve_config
from locdiff.pipeline import DataSpec
from locdiff.runs import completion_key


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
    # an independent reference: the key of the resolved config and of the identities of the data
    assert spec.key == completion_key(config_to_dict(config), dict(spec.data))
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
