import re
from pathlib import Path

import pytest
import yaml

from locdiff.model.config import Config, config_from_dict, config_to_dict, load_config, save_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


@pytest.mark.parametrize("name,objective", [("tiny", "kl+mse"), ("base", "kl+mse"), ("paper", "kl")])
def test_shipped_configs_load(name, objective):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.method == "locdiff"
    assert cfg.train.objective == objective  # base: chosen on the val splits of synth and realbench


def test_paper_config_is_the_published_method():
    """paper.yaml: the plain CS-UNet (no prior head) trained with SHDD-KL, sampled (K samples of S DDIM
    steps) and decoded by the plain argmax; base.yaml keeps our deviations."""
    paper, base = load_config(CONFIGS / "paper.yaml"), load_config(CONFIGS / "base.yaml")
    assert paper.network.head_width == 0 and paper.network.embedding_noise == 0
    assert paper.train.objective == "kl" and paper.predict.decode_smoothing == 0
    assert paper.predict.samples > 1 and paper.predict.steps > 1 and paper.diffusion.cond_drop_prob == 0
    assert base.network.head_width > 0 and base.train.objective == "kl+mse"


def test_readme_lists_every_deviation_of_base_from_paper():
    """Each setting in which the resolved base.yaml and paper.yaml differ has a row in the README's table
    "base.yaml against the paper" (by its dotted key or its name), but for bookkeeping and speed settings."""
    readme = (CONFIGS.parents[1] / "README.md").read_text()
    table = readme.split("## base.yaml against the paper")[1].split("\n## ")[0]
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")]  # the setting column
    named = {name for row in rows for name in re.findall(r"`([a-z_0-9.]+)`", row)}
    base, paper = (config_to_dict(load_config(CONFIGS / f"{name}.yaml")) for name in ("base", "paper"))
    bookkeeping = {"train.checkpoint_every", "train.log_every", "train.val_samples", "predict.batch_size"}
    missing = [f"{section}.{key}" for section, values in base.items() if isinstance(values, dict)
               for key, value in values.items() if value != paper[section][key]
               and f"{section}.{key}" not in bookkeeping | named and key not in named]
    assert not missing, f"deviations without a README row: {missing}"


def test_config_files_hold_settings_and_one_line_comments():
    """YAML files carry settings; experiment logs live in docs/results.md (no comment-only continuation lines
    under a setting)."""
    for path in (CONFIGS / "base.yaml", CONFIGS / "paper.yaml"):
        lines = path.read_text().splitlines()
        body = lines[next(i for i, line in enumerate(lines) if not line.startswith("#")):]
        for line in body:
            assert not line.lstrip().startswith("#"), f"{path.name}: {line.strip()}"


def test_unknown_key_names_file_and_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"c\.yaml: train\.stepz: unknown key \(did you mean 'steps'\?\); "
                                         r"valid keys here: objective"):
        load_config(path)


def test_type_errors_are_named():
    with pytest.raises(ValueError, match=r"network\.widths\[1\]: must be an integer"):
        config_from_dict({"network": {"widths": [64, "a"]}})
    with pytest.raises(ValueError, match=r"train\.objective: must be one of 'kl', 'mse', 'kl\+mse'"):
        config_from_dict({"train": {"objective": "l1"}})


def test_overrides_typecheck_and_apply(tmp_path):
    cfg = load_config(
        None, ["train.steps=7", "network.widths=[8, 4]", "shdd.kl_tau=0.5", "method=knn", "baselines.knn.k=3"]
    )
    assert (cfg.train.steps, cfg.network.widths, cfg.shdd.kl_tau, cfg.method) == (7, [8, 4], 0.5, "knn")
    assert cfg.baselines == {"knn": {"k": 3}}
    with pytest.raises(ValueError, match=r"^--set train\.steps: must be an integer in \[1, 1000000000\]; got 'abc'$"):
        load_config(None, ["train.steps=abc"])
    with pytest.raises(ValueError, match=r"^--set train\.nope: unknown key; valid keys here: objective"):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ValueError, match=r"^--set train\.steps: expected KEY=VALUE"):
        load_config(None, ["train.steps"])
    with pytest.raises(ValueError, match=r"^--set network\.embedding_noise: must be a number in \[0, 1000\]; got -1$"):
        load_config(None, ["network.embedding_noise=-1"])


def test_save_roundtrip(tmp_path):
    cfg = load_config(CONFIGS / "base.yaml", ["train.lr=0.01"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg
    assert config_to_dict(Config())["shdd"]["degree"] == 32


def test_min_train_timestep_range_is_checked():
    cfg = config_from_dict({"diffusion": {"timesteps": 100, "min_train_timestep": 99}})
    assert cfg.diffusion.min_train_timestep == 99
    with pytest.raises(ValueError, match=r"^x\.yaml: diffusion\.min_train_timestep: must be < diffusion\.timesteps "
                                         r"\(100\); got 100$"):
        config_from_dict({"diffusion": {"timesteps": 100, "min_train_timestep": 100}}, source="x.yaml")


def test_configs_by_name_or_by_the_readme_path_anywhere(tmp_path, monkeypatch):
    """`--config tiny` and `--config configs/model/tiny.yaml` both work outside a checkout (from a wheel, from
    another folder); any other YAML path is taken as it is."""
    from locdiff.resources import config_path, configs_dir

    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    shipped = configs_dir() / "model" / "tiny.yaml"
    assert config_path("model", "tiny") == shipped == config_path("model", "configs/model/tiny.yaml")
    with pytest.raises(FileNotFoundError, match="configs/model/nope.yaml: no such config file"):
        config_path("model", "configs/model/nope.yaml")
    mine = tmp_path / "configs" / "model" / "tiny.yaml"  # a file of that name here wins
    mine.parent.mkdir(parents=True)
    mine.write_text("method: knn\n")
    assert config_path("model", "configs/model/tiny.yaml") == Path("configs/model/tiny.yaml")
