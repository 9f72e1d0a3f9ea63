"""A trained CS-UNet samples its posterior: on a synthetic conditional with a known answer (one embedding whose
locations are three places at 0.5 / 0.3 / 0.2, one whose location is a single place), the default sampler's
samples fall on the places in those shares, and the single place stays single."""

import numpy as np
import pytest
import torch

from locdiff import shdd
from locdiff.geo import haversine_km
from locdiff.model.config import load_config
from locdiff.model.locdiff_method import LocDiffMethod
from locdiff.model.predict import row_noise, row_seeds, sample_codes
from locdiff.tables import EmbeddingTable

from .conftest import ROOT

PLACES = np.array([[48.85, 2.35], [-33.87, 151.21], [-22.91, -43.21], [-1.29, 36.82]])  # Paris, Sydney, Rio, Nairobi
SHARES = np.array([0.5, 0.3, 0.2])
# base.yaml's network, objective and regularisation (dropout, embedding noise, weight decay), scaled down
# to train in seconds; the sampler at the config defaults (K = 16 samples of S = 50 DDIM steps)
OVERRIDES = ["shdd.degree=8", "shdd.kl_grid_size=162", "network.widths=[64,32]", "network.cond_dim=64",
             "network.time_dim=32", "network.head_width=64", "network.head_depth=1", "train.steps=600",
             "train.batch_size=128", "train.lr=0.003", "train.warmup_steps=20", "train.ema_decay=0.98",
             "train.checkpoint_every=600", "train.log_every=100", "train.val_share=0", "predict.samples=16",
             "predict.steps=50", "hybrid.tune_on_val=false"]


def _conditional(n: int = 4000, dim: int = 16, seed: int = 0) -> tuple[EmbeddingTable, np.ndarray]:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((2, dim)).astype(np.float32)
    which = np.arange(n) % 2
    place = np.where(which == 0, rng.choice(3, n, p=SHARES), 3)
    table = EmbeddingTable(ids=np.asarray([f"r{i}" for i in range(n)], dtype=object), lat=PLACES[place, 0],
                           lon=PLACES[place, 1], embedding=emb[which], source="conditional")
    return table, emb


def _shares(method: LocDiffMethod, emb: np.ndarray, samples: int) -> np.ndarray:
    """Share of `samples` samples of one embedding decoded (as predict decodes its votes) within 1,500 km of
    each place, and the share near none (last)."""
    pc = method.config.predict
    noise = row_noise(row_seeds(emb[None], 0, method.model.emb_mean.double().numpy(),
                                method.model.emb_std.double().numpy()), samples, method.model.dim)
    z = sample_codes(method.model, torch.as_tensor(emb[None]), method.config, samples=samples, steps=pc.steps,
                     noise=noise)[0]
    lat, lon, _ = shdd.decode((z / shdd.SCALE).double(), candidates=1, iterations=1, smoothing=pc.decode_smoothing)
    d = haversine_km(lat.numpy()[:, None], lon.numpy()[:, None], PLACES[None, :, 0], PLACES[None, :, 1])
    near, ok = d.argmin(1), d.min(1) < 1500
    return np.array([((near == j) & ok).mean() for j in range(len(PLACES))] + [(~ok).mean()])


@pytest.mark.slow
@pytest.mark.parametrize("components", [1, 4])
def test_samples_follow_a_known_posterior(tmp_path, components):
    """components 1: base.yaml's single-Gaussian skeleton; 4: the mixture skeleton (network.head_components)."""
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "model" / "base.yaml", [*OVERRIDES, f"network.head_components={components}"])
    table, emb = _conditional()
    method = LocDiffMethod(cfg)
    method.fit(table, None, tmp_path, progress=False)
    three = _shares(method, emb[0], 3000)  # binomial sd <= 0.009 (800 samples of the exact denoiser: +-0.03)
    np.testing.assert_allclose(three[:3], SHARES, atol=0.05)
    assert three[3:].sum() <= 0.02
    one = _shares(method, emb[1], 200)
    assert one[3] >= 0.98
    # predict's answers at the default K = 16: the heaviest place, and the single one
    pred = method.predict(EmbeddingTable(ids=np.asarray(["a", "b"], dtype=object), lat=None, lon=None,
                                         embedding=emb), aggregation="support")
    assert (haversine_km(pred.lat, pred.lon, PLACES[[0, 3], 0], PLACES[[0, 3], 1]) < 500).all()
