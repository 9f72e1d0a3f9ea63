"""`make bench` (benchmarks/run.py): every benchmark runs on its own, reuses bench_model's runs after it, or is
named with the command to run it by hand; none fails for want of an argument."""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

from benchmarks import run


class Parsed(Exception):
    """Raised once a benchmark's command line parsed: nothing runs."""


def test_every_benchmark_has_a_place():
    for n in run.REUSE + tuple(run.BY_HAND):
        assert n in run.names(), n
    assert "model" in run.names() and "model" not in run.REUSE and "model" not in run.BY_HAND


@pytest.mark.parametrize("name", [n for n in run.names() if n not in run.BY_HAND])
def test_make_bench_gives_each_benchmark_every_argument_it_requires(name, monkeypatch):
    """The command `make bench` runs parses (required arguments given); a benchmark without a command line is fine."""
    module = f"benchmarks.bench_{name}"
    source = (Path(run.HERE) / f"bench_{name}.py").read_text()
    if "parse_args(" not in source:
        return  # takes no arguments
    commands, _ = run.plan([], "WORK")
    (cmd,) = [c for c in commands if c[2] == module]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *cmd[3:]])
    with pytest.raises(Parsed):
        importlib.import_module(module).main()


def test_the_plan_runs_bench_model_with_a_work_folder_before_the_benchmarks_that_reuse_it():
    commands, skipped = run.plan([], "W")
    order = [c[2].removeprefix("benchmarks.bench_") for c in commands]
    assert order.index("model") < min(order.index(n) for n in run.REUSE)
    assert commands[order.index("model")][3:] == ["--work", "W"]
    assert not set(order) & set(run.BY_HAND)
    assert len(skipped) == len(run.BY_HAND) and all("python -m benchmarks." in s for s in skipped)
    only, _ = run.plan(["heldout"], "W")  # bench_model comes along for the runs it needs
    assert [c[2] for c in only] == ["benchmarks.bench_model", "benchmarks.bench_heldout"]
    alone, _ = run.plan(["model"], "W")  # on its own it keeps nothing
    assert alone == [[sys.executable, "-m", "benchmarks.bench_model"]]


def test_an_unknown_name_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run", "nosuch"])
    assert run.main() == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unknown benchmark(s): nosuch; choose from "), err


def test_help_prints_the_usage_and_starts_nothing(capsys):
    with pytest.raises(SystemExit) as stop:
        run.main(["--help"])
    assert stop.value.code == 0 and "python -m benchmarks.run" in capsys.readouterr().out


@pytest.mark.parametrize("name", [*(f"bench_{n}" for n in run.names()), "gpu_check"])
def test_every_benchmark_answers_help_before_it_starts(name, monkeypatch, capsys):
    """`python -m benchmarks.NAME --help` prints the usage and exits 0, with nothing measured."""
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"benchmarks.{name}").main()
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
