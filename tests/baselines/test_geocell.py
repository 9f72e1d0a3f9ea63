import numpy as np

from locdiff.baselines.geocell import build_cells
from locdiff.geo import random_points

from .common import fit_and_check

OPTS = {"epochs": 8, "hidden": 128, "depth": 1, "max_cell_size": 60, "lr": 3e-3}


def test_cells_are_adaptive_and_bounded():
    lat, lon = (x.numpy() for x in random_points(5000, seed=0))
    lat[:2500] = lat[:2500] * 0.01 + 48.8  # half the points in one small area
    lon[:2500] = lon[:2500] * 0.01 + 2.3
    labels = build_cells(lat, lon, 100)
    counts = np.bincount(labels)
    assert counts.max() <= 100 and counts.min() >= 50
    # the dense area gets about half of the cells
    assert 0.4 < len(np.unique(labels[:2500])) / len(counts) < 0.6


def test_geocell_beats_chance_and_round_trips(tiny_bench, chance, tmp_path):
    fit_and_check("geocell", OPTS, tiny_bench, chance, tmp_path)


def test_geocell_retrieval_refinement(tiny_bench, chance, tmp_path):
    method, m = fit_and_check("geocell", {**OPTS, "refine": "retrieval", "label_smoothing_km": 0.0},
                              tiny_bench, chance, tmp_path)
    assert m["acc_25km"] > 1.0
