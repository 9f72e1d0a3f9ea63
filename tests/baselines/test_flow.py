import numpy as np
import pytest

from locdiff.methods import get_method
from locdiff.tables import EmbeddingTable

from .common import fit_and_check

OPTS = {"epochs": 60, "hidden": 128, "depth": 2, "lr": 3e-3, "samples": 8, "steps": 8}


@pytest.mark.slow  # over 3 s: `make test` runs it, `make test-fast` does not
def test_flow_beats_chance_round_trips_and_is_seeded(tiny_bench, chance, tmp_path):
    method, _ = fit_and_check("flow", OPTS, tiny_bench, chance, tmp_path, min_gain_750=15)
    test = tiny_bench["test"]
    a, b = method.predict(test), method.predict(test)
    np.testing.assert_array_equal(a.lat, b.lat)  # sampling is seeded
    c = method.predict(test, aggregation="mean", samples=4, steps=4, seed=1)
    assert np.isfinite(c.lat).all() and (c.confidence <= 1 + 1e-9).all()
    # one photo, one answer: an image's noise comes from the seed and its own embedding, not its batch
    def rows(idx):
        return EmbeddingTable(test.ids[idx], None, None, test.embedding[idx].copy())

    reverse = method.predict(rows(np.arange(len(test))[::-1]))
    np.testing.assert_allclose(reverse.lat[::-1], a.lat, atol=1e-6)
    np.testing.assert_allclose(reverse.lon[::-1], a.lon, atol=1e-6)
    alone = method.predict(rows(np.array([3])))
    np.testing.assert_allclose([alone.lat[0], alone.lon[0]], [a.lat[3], a.lon[3]], atol=1e-4)  # float32 batches


def test_flow_sampler_shapes(tiny_bench, tmp_path):
    import torch

    method = get_method("flow").from_config({"baselines": {"flow": {**OPTS, "epochs": 1}}})
    method.fit(tiny_bench["train"], None, tmp_path, progress=False)
    emb = torch.from_numpy(tiny_bench["test"].embedding[:5])
    u = method.sample(emb, 4, torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(0)))
    assert u.shape == (5, 3, 3)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(5, 3, dtype=u.dtype))
