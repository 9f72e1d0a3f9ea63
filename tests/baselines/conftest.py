import numpy as np
import pytest

from locdiff.metrics import geo_metrics
from locdiff.worlds.synth import SynthConfig, make_benchmark


@pytest.fixture(scope="session")
def tiny_bench():
    return make_benchmark(SynthConfig(n_train=3000, n_test=400, n_unseen=200, dim=64, seed=11))


@pytest.fixture(scope="session")
def chance(tiny_bench):
    """Metrics of answering a random training location."""
    train, test = tiny_bench["train"], tiny_bench["test"]
    j = np.random.default_rng(0).integers(0, len(train), len(test))
    return geo_metrics(train.lat[j], train.lon[j], test.lat, test.lon)
