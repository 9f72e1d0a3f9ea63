import numpy as np
import pytest

from locdiff.baselines.knn import cosine_topk
from locdiff.methods import get_method

from .common import fit_and_check


def test_top1_beats_chance_and_round_trips(tiny_bench, chance, tmp_path):
    _, m = fit_and_check("knn", {"backend": "torch"}, tiny_bench, chance, tmp_path, min_gain_750=40)
    assert m["acc_25km"] > 5


def test_topk_mode(tiny_bench, chance, tmp_path):
    fit_and_check("knn", {"k": 10, "aggregation": "mode", "backend": "torch"}, tiny_bench, chance, tmp_path)
    fit_and_check("knn", {"k": 10, "aggregation": "mean", "backend": "torch"}, tiny_bench, chance,
                  tmp_path / "mean")


def test_torch_search_matches_brute_force_and_faiss():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=(300, 16)).astype(np.float32)
    sims, idx = cosine_topk(q, g, 5, backend="torch", chunk=7)
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    ref = np.argsort(-(qn @ gn.T), axis=1)[:, :5]
    np.testing.assert_array_equal(idx, ref)
    pytest.importorskip("faiss")
    _, fidx = cosine_topk(q, g, 5, backend="faiss")
    np.testing.assert_array_equal(fidx, ref)


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match=r"baselines\.knn\.kk: unknown key"):
        get_method("knn").from_config({"baselines": {"knn": {"kk": 3}}})
    with pytest.raises(ValueError, match=r"baselines\.knn\.aggregation: must be one of"):
        get_method("knn").from_config({"baselines": {"knn": {"aggregation": "median"}}})
