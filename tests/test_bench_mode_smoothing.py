"""`bench_mode_smoothing`: the probe seeds that choose are given as a list and never include the test probe's."""

import sys

import pytest

from benchmarks import bench_mode_smoothing
from locdiff.shdd.modes import MODE_SMOOTHING


def test_seeds_parse_and_bad_ones_are_refused():
    assert bench_mode_smoothing.parse_seeds("1,2, 3") == [1, 2, 3]
    for bad in ("", "1,x"):
        with pytest.raises(SystemExit, match="--val-seeds"):
            bench_mode_smoothing.parse_seeds(bad)


def test_the_test_probe_cannot_choose(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_mode_smoothing", "--work", "w", "--val-seeds", "0,1"])
    with pytest.raises(SystemExit):
        bench_mode_smoothing.main()
    assert "--test-seed must not be one of --val-seeds" in capsys.readouterr().err


def test_the_default_is_in_the_grid():
    assert MODE_SMOOTHING in bench_mode_smoothing.GRID
