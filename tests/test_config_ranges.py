"""Every numeric config field has a range (issue 12 item 5): a value outside it is exit code 2 from
`locdiff train`, one line naming the file and the key, and nothing is written. The ranges below are the
specification (issue 12 and the config docs), written out here independently of the config classes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from locdiff.cli import main
from locdiff.data.config import DatasetConfig, EncoderConfig, RemoteFile, load_dataset_config, load_encoder_config
from locdiff.errors import ConfigError
from locdiff.model.config import Config, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "model" / "tiny.yaml"

# (key path, bad value, the expected problem after "FILE: KEY: ")
BAD_RUN_VALUES = [
    ("train.steps", -5, "must be an integer in [1, 1000000000]; got -5"),
    ("train.steps", 0, "must be an integer in [1, 1000000000]; got 0"),
    ("train.steps", 2.5, "must be an integer in [1, 1000000000]; got 2.5"),
    ("train.steps", 10**20, "must be an integer in [1, 1000000000]; got 100000000000000000000"),  # issue 21: upper
    ("train.batch_size", 10**8, "must be an integer in [1, 16777216]; got 100000000"),
    ("predict.samples", 5000, "must be an integer in [1, 1024]; got 5000"),
    ("limits.max_parameters", 0, "must be an integer in [1, 100000000000]; got 0"),
    ("train.batch_size", -4, "must be an integer in [1, 16777216]; got -4"),
    ("train.lr", 0, "must be a number in (0, 10]; got 0"),
    ("train.lr", -0.001, "must be a number in (0, 10]; got -0.001"),
    ("train.lr", float("nan"), "must be a finite number in (0, 10]; got nan"),
    ("train.min_lr_ratio", 1.5, "must be a number in [0, 1]; got 1.5"),
    ("train.min_lr_ratio", -0.1, "must be a number in [0, 1]; got -0.1"),
    ("train.warmup_steps", -1, "must be an integer in [0, 1000000000]; got -1"),
    ("train.weight_decay", -0.01, "must be a number in [0, 1000]; got -0.01"),
    ("train.grad_clip", -1, "must be a number in [0, 1e+06]; got -1"),
    ("train.ema_decay", 1, "must be a number in [0, 1); got 1"),
    ("train.ema_decay", -0.5, "must be a number in [0, 1); got -0.5"),
    ("train.checkpoint_every", 0, "must be an integer in [1, 1000000000]; got 0"),
    ("train.log_every", 0, "must be an integer in [1, 1000000000]; got 0"),
    ("train.kl_weight", -1, "must be a number in [0, 1e+06]; got -1"),
    ("train.mse_weight", -1, "must be a number in [0, 1e+06]; got -1"),
    ("train.seed", -1, "must be an integer in [0, 9223372036854775807]; got -1"),
    ("train.val_samples", 0, "must be an integer in [1, 100000000]; got 0"),
    ("train.device", "gpu", "must be auto, cpu, cuda, cuda:N or mps; got 'gpu'"),
    ("shdd.degree", 0, "must be an integer in [1, 512]; got 0"),
    ("shdd.degree", 513, "must be an integer in [1, 512]; got 513"),
    ("shdd.kl_tau", 0, "must be a number in (0, 1e+06] or null; got 0"),
    ("shdd.kl_tau", -1.5, "must be a number in (0, 1e+06] or null; got -1.5"),
    ("shdd.kl_grid_size", 0, "must be an integer in [1, 4194304] or null; got 0"),
    ("network.widths", [64, 0], None),  # the item is named: network.widths[1]
    ("network.widths", [], "must be a non-empty list of integers in [1, 65536] (at most 16 items); got []"),
    ("network.blocks_per_level", 0, "must be an integer in [1, 64]; got 0"),
    ("network.omega_0", 0, "must be a number in (0, 10000]; got 0"),
    ("network.omega_hidden", -1, "must be a number in (0, 10000]; got -1"),
    ("network.dropout", 1.0, "must be a number in [0, 1); got 1.0"),
    ("network.dropout", -0.1, "must be a number in [0, 1); got -0.1"),
    ("network.cond_dim", 0, "must be an integer in [1, 65536]; got 0"),
    ("network.time_dim", 0, "must be an integer in [1, 65536]; got 0"),
    ("diffusion.timesteps", 0, "must be an integer in [1, 100000]; got 0"),
    ("diffusion.cond_drop_prob", 1, "must be a number in [0, 1); got 1"),
    ("diffusion.cond_drop_prob", -0.1, "must be a number in [0, 1); got -0.1"),
    ("diffusion.guidance_scale", -1, "must be a number in [0, 1000]; got -1"),
    ("diffusion.min_train_timestep", -1, "must be an integer in [0, 100000]; got -1"),
    ("diffusion.min_train_timestep", 1000, "must be < diffusion.timesteps (1000); got 1000"),
    ("predict.samples", 0, "must be an integer in [1, 1024]; got 0"),
    ("predict.steps", 0, "must be an integer in [1, 100000]; got 0"),
    ("predict.steps", 1001, "must be <= diffusion.timesteps (1000); got 1001"),
    ("predict.support_radius_km", 0, "must be a number in (0, 20038]; got 0"),
    ("predict.batch_size", 0, "must be an integer in [1, 16777216]; got 0"),
    ("predict.decode_candidates", 0, "must be an integer in [1, 64]; got 0"),
    ("hybrid.top_k", 0, "must be an integer in [1, 1024]; got 0"),
    ("hybrid.radius_km", -10, "must be a number in (0, 20038]; got -10"),
    ("hybrid.weight", 1.5, "must be a number in [0, 1]; got 1.5"),
    ("hybrid.weight", -0.1, "must be a number in [0, 1]; got -0.1"),
    ("baselines.knn.k", 0, "must be an integer in [1, 1024]; got 0"),
    ("baselines.knn.radius_km", 0, "must be a number in (0, 20038]; got 0"),
    ("baselines.knn.temperature", 0, "must be a number in (0, 1000]; got 0"),
    ("gallery.nprobe", 0, "must be an integer in [1, 16777216]; got 0"),
    ("baselines.geocell.epochs", 0, "must be an integer in [1, 100000]; got 0"),
    ("baselines.geocell.max_cell_size", 0, "must be an integer in [1, 100000000]; got 0"),
    ("baselines.geocell.label_smoothing_km", -1, "must be a number in [0, 20038]; got -1"),
    ("baselines.geocell.medoid_sample", 0, "must be an integer in [1, 4096]; got 0"),
    ("baselines.geocell.medoid_sample", 100_000, "must be an integer in [1, 4096]; got 100000"),
    ("baselines.regress.lr", 0, "must be a number in (0, 10]; got 0"),
    ("baselines.regress.batch_size", 0, "must be an integer in [1, 1048576]; got 0"),
    ("baselines.regress.hidden", 0, "must be an integer in [1, 65536]; got 0"),
    ("baselines.regress.depth", -1, "must be an integer in [0, 64]; got -1"),
    ("baselines.regress.dropout", 1, "must be a number in [0, 1); got 1"),
    ("baselines.regress.weight_decay", -1, "must be a number in [0, 1000]; got -1"),
    ("baselines.regress.warmup_steps", -1, "must be an integer in [0, 1000000000]; got -1"),
    ("baselines.flow.epochs", 0, "must be an integer in [1, 100000]; got 0"),  # FlowOptions only changes the default
    ("baselines.flow.steps", 0, "must be an integer in [1, 100000]; got 0"),
    ("baselines.flow.samples", 0, "must be an integer in [1, 1024]; got 0"),
    ("baselines.flow.time_dim", 1, "must be an integer in [2, 65536]; got 1"),
    ("baselines.flow.mode_radius_km", 0, "must be a number in (0, 20038]; got 0"),
    ("baselines.flow.predict_batch", 0, "must be an integer in [1, 1048576]; got 0"),
    ("shdd.kl_grid_size", 1_000_000, "SHDD-KL would hold 545,000,000 numbers (1,000,000 grid points x (289 "
     "coefficients of degree 16 + a batch of 256)), above limits.max_kl_grid_numbers (268,435,456); set a smaller "
     "grid or degree, or raise the limit on a larger machine; got 1000000"),  # a 4 GB grid basis otherwise
]


def _nested(key: str, value) -> dict:
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize("key,value,problem", BAD_RUN_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_RUN_VALUES])
def test_train_refuses_a_value_out_of_range(tmp_path, capsys, key, value, problem):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_merge(yaml.safe_load(TINY.read_text()), _nested(key, value))))
    out = tmp_path / "run"
    rc = main(["train", "--config", str(cfg), "--train", str(tmp_path / "absent.parquet"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    if problem is None:
        assert f"locdiff train: error: {cfg}: {key}[1]: must be an integer in [1, 65536]; got 0" == err.strip()
    else:
        assert err.strip() == f"locdiff train: error: {cfg}: {key}: {problem}"
    assert not out.exists()  # validation finished before anything was written


@pytest.mark.parametrize("key,value,problem", BAD_RUN_VALUES[::7], ids=[f"{k}={v}" for k, v, _ in BAD_RUN_VALUES[::7]])
def test_an_override_out_of_range_names_the_override(tmp_path, capsys, key, value, problem):
    out = tmp_path / "run"
    raw = "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value).lower()
    rc = main(["train", "--config", str(TINY), "--set", f"{key}={raw}", "--train", str(tmp_path / "absent"),
               "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err.startswith(f"locdiff train: error: --set {key}") and "\n" not in err


def _aliased_lists(depth: int) -> str:
    """YAML of a list nested `depth` times through aliases, each level ten copies of the one below: 10**depth
    leaves in a few kB (a billion laughs)."""
    lines = ["    - &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("overrides", [[], ["train.steps=3"]], ids=["file", "with --set"])
def test_a_billion_laughs_in_a_value_is_one_line(tmp_path, capsys, overrides):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  lr:\n" + _aliased_lists(24))  # its repr would be 10**24 numbers long
    out = tmp_path / "run"
    argv = ["train", "--config", str(cfg), "--train", str(tmp_path / "absent.parquet"), "--out", str(out)]
    rc = main(argv + [x for o in overrides for x in ("--set", o)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not out.exists()
    assert err.startswith(f"locdiff train: error: {cfg}: train.lr: must be a number in (0, 10]; got [[1, 1, ")
    assert err.endswith("...") and "\n" not in err and len(err) < 300


# Values exactly on a bound are accepted (the bounds are inclusive or exclusive as the table says).
EDGE_VALUES = [
    ("train.warmup_steps", 0), ("train.grad_clip", 0), ("train.min_lr_ratio", 0), ("train.min_lr_ratio", 1),
    ("train.ema_decay", 0), ("network.dropout", 0), ("diffusion.cond_drop_prob", 0), ("shdd.degree", 1),
    ("shdd.degree", 512), ("hybrid.weight", 0), ("hybrid.weight", 1), ("predict.steps", 1000),
    ("diffusion.min_train_timestep", 999), ("train.steps", 1), ("shdd.kl_tau", None), ("train.device", "cuda:1"),
    ("baselines.regress.depth", 0), ("baselines.geocell.label_smoothing_km", 0), ("train.lr", 1),
]


@pytest.mark.parametrize("key,value", EDGE_VALUES)
def test_values_on_a_bound_are_accepted(key, value):
    cfg = config_from_dict(_merge(yaml.safe_load(TINY.read_text()), _nested(key, value)))
    node = dataclasses.asdict(cfg)
    for part in key.split("."):
        node = node[part]
    assert node == value


def test_the_objective_needs_a_positive_weight():
    with pytest.raises(ConfigError, match=r"^x: train\.kl_weight: must be > 0 for objective 'kl'; got 0$"):
        config_from_dict({"train": {"objective": "kl", "kl_weight": 0}}, source="x")
    with pytest.raises(ConfigError, match=r"train\.kl_weight: must be > 0 when mse_weight is 0"):
        config_from_dict({"train": {"objective": "kl+mse", "kl_weight": 0, "mse_weight": 0}})
    assert config_from_dict({"train": {"objective": "kl", "mse_weight": 0}}).train.mse_weight == 0


def test_defaults_and_shipped_configs_are_valid():
    assert config_from_dict({}) == Config()
    for path in sorted((ROOT / "configs" / "model").glob("*.yaml")):
        load_config(path)
    for path in sorted((ROOT / "configs" / "datasets").glob("*.yaml")):
        load_dataset_config(path.stem)
    for path in sorted((ROOT / "configs" / "encoders").glob("*.yaml")):
        load_encoder_config(path.stem)


BAD_DATASET_VALUES = [
    ("shard_size", 0, "must be an integer in [1, 100000]; got 0"),
    ("max_side", 15, "must be an integer in [16, 16384]; got 15"),
    ("jpeg_quality", 0, "must be an integer in [1, 100]; got 0"),
    ("jpeg_quality", 101, "must be an integer in [1, 100]; got 101"),
    ("workers", 0, "must be an integer in [1, 1024]; got 0"),
    ("retries", -1, "must be an integer in [0, 100]; got -1"),
    ("backoff", -0.5, "must be a number in [0, 3600]; got -0.5"),
    ("timeout", 0, "must be a number in (0, 3600]; got 0"),
    ("img2dataset_threshold", -1, "must be an integer in [0, 1000000000000]; got -1"),
    ("verify", "full", "must be one of 'header', 'decode'; got 'full'"),
    ("shard_size", "10", "must be an integer in [1, 100000]; got '10'"),
    ("metadata", {"sha256": "abc"}, None),
    ("metadata", {"size": 3}, None),
]


@pytest.mark.parametrize("key,value,problem", BAD_DATASET_VALUES, ids=[k for k, _, _ in BAD_DATASET_VALUES])
def test_dataset_config_ranges(tmp_path, key, value, problem):
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"name": "d", "source": "folder", key: value}))
    with pytest.raises(ConfigError) as err:
        load_dataset_config(str(path))
    if key == "metadata" and "sha256" in value:
        assert str(err.value) == f"{path}: metadata.sha256: must be 64 hex digits or null; got 'abc'"
    elif key == "metadata":
        assert str(err.value).startswith(f"{path}: metadata.size: unknown key; valid keys here: url, filename")
    else:
        assert str(err.value) == f"{path}: {key}: {problem}"


def test_dataset_config_overrides_are_checked_and_required_keys_named(tmp_path):
    with pytest.raises(ConfigError, match=r"folder\.yaml: shard_size: must be an integer in \[1, 100000\]; got 0$"):
        load_dataset_config("folder", shard_size=0)
    path = tmp_path / "d.yaml"
    path.write_text("name: d\n")
    with pytest.raises(ConfigError, match=r"d\.yaml: source: missing; this key is required \(a string\)$"):
        load_dataset_config(str(path))


def test_encoder_config_ranges(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("name: e\nbatch_size: 0\n")
    with pytest.raises(ConfigError, match=r"e\.yaml: batch_size: must be an integer in \[1, 4096\]; got 0$"):
        load_encoder_config(str(path))
    path.write_text("name: e\ndevice: cuda:x\n")
    with pytest.raises(ConfigError, match=r"e\.yaml: device: must be auto, cpu, cuda, cuda:N or mps or null"):
        load_encoder_config(str(path))


def test_config_classes_keep_dataclass_behaviour():
    # callers save options with dataclasses.asdict and build EncoderConfig(**asdict(cfg)) in Ray actors
    enc = load_encoder_config("clip-vit-l14")
    assert EncoderConfig(**dataclasses.asdict(enc)) == enc
    ds = load_dataset_config("folder")
    assert isinstance(ds, DatasetConfig) and isinstance(ds.metadata, RemoteFile)
