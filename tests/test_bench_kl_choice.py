"""`bench_kl_choice`: its grid is the config's own setting, a 4x sharper SHDD-KL target, a 10x KL weight and
both, each a valid override of base.yaml."""

import math
from pathlib import Path

from benchmarks import bench_kl_choice
from locdiff.model.config import load_config

BASE = Path(__file__).resolve().parents[1] / "configs/model/base.yaml"


def test_grid_overrides_load_into_the_settings_they_name():
    base = load_config(BASE, [])
    grid = bench_kl_choice.grid(base.shdd.degree)
    assert list(grid) == ["locdiff", "kl_tau/4", "kl_weight=10", "kl_tau/4+kl_weight=10"]
    default_tau = (base.shdd.degree + 1) ** 2 / (16 * math.pi)  # LOCDIFF.md: D / 16 pi
    got = {name: load_config(BASE, overrides) for name, overrides in grid.items()}
    assert got["locdiff"].shdd.kl_tau is None and got["locdiff"].train.kl_weight == base.train.kl_weight
    assert math.isclose(got["kl_tau/4"].shdd.kl_tau, default_tau / 4, rel_tol=1e-5)
    assert got["kl_tau/4"].train.kl_weight == base.train.kl_weight
    assert got["kl_weight=10"].shdd.kl_tau is None and got["kl_weight=10"].train.kl_weight == 10
    both = got["kl_tau/4+kl_weight=10"]
    assert math.isclose(both.shdd.kl_tau, default_tau / 4, rel_tol=1e-5) and both.train.kl_weight == 10
