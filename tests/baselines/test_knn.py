import pytest

from locdiff.methods import get_method

from .common import fit_and_check


def test_top1_beats_chance_and_round_trips(tiny_bench, chance, tmp_path):
    _, m = fit_and_check("knn", {}, tiny_bench, chance, tmp_path, min_gain_750=40)
    assert m["acc_25km"] > 5


def test_topk_mode(tiny_bench, chance, tmp_path):
    fit_and_check("knn", {"k": 10, "aggregation": "mode"}, tiny_bench, chance, tmp_path)
    fit_and_check("knn", {"k": 10, "aggregation": "mean"}, tiny_bench, chance,
                  tmp_path / "mean")


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match=r"baselines\.knn\.kk: unknown key"):
        get_method("knn").from_config({"baselines": {"knn": {"kk": 3}}})
    with pytest.raises(ValueError, match=r"baselines\.knn\.aggregation: must be one of"):
        get_method("knn").from_config({"baselines": {"knn": {"aggregation": "median"}}})
