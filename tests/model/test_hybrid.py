"""LocDiff-H holds the retrieval gallery: with an untrained diffusion model it falls back to retrieval; with a
trained one it keeps the gallery's answers where the gallery knows the place and (issue 19 item 5, not yet)
LocDiff's where the gallery has never been."""

import numpy as np
import pytest

from locdiff.metrics import geo_metrics
from locdiff.model.config import load_config

from .conftest import TEST_OVERRIDES, TINY


def test_untrained_diffusion_falls_back_to_retrieval(tmp_path, synth_tables):
    from locdiff.baselines.knn import KNNMethod
    from locdiff.model.method import LocDiffMethod

    # one training step: the density is noise, so validation must choose plain retrieval
    cfg = load_config(TINY, [*TEST_OVERRIDES, "train.steps=1", "train.warmup_steps=1", "train.val_samples=300"])
    method = LocDiffMethod(cfg)
    method.fit(synth_tables["train"], synth_tables["val"], tmp_path / "ld", progress=False)
    assert method.selection["hybrid_weight"] == 0.0 and method.selection["hybrid_radius_km"] == float("inf")
    knn = KNNMethod.from_config({"method": "knn"})
    knn.fit(synth_tables["train"], None, tmp_path / "knn", progress=False)
    test = synth_tables["test"]
    h = method.predict(test, method="locdiff-h")
    r = knn.predict(test)
    np.testing.assert_array_equal(h.lat, r.lat)
    np.testing.assert_array_equal(h.lon, r.lon)
    p = method.predict(test, method="locdiff")
    plain = geo_metrics(p.lat, p.lon, test.lat, test.lon)
    hybrid = geo_metrics(h.lat, h.lon, test.lat, test.lon)
    assert hybrid["acc_25km"] > plain["acc_25km"] + 5  # the untrained density alone is far worse


@pytest.fixture(scope="module")
def trained_h(tmp_path_factory, synth_tables):
    """A LocDiff run (test config, 200 steps) and top-1 retrieval over the same training rows."""
    from locdiff.baselines.knn import KNNMethod
    from locdiff.model.method import LocDiffMethod

    root = tmp_path_factory.mktemp("hybrid")
    method = LocDiffMethod(load_config(TINY, [*TEST_OVERRIDES, "train.val_samples=300"]))
    method.fit(synth_tables["train"], synth_tables["val"], root / "ld", progress=False)
    knn = KNNMethod.from_config({"method": "knn"})
    knn.fit(synth_tables["train"], None, root / "knn", progress=False)
    return method, knn


def _acc(pred, table):
    return geo_metrics(pred.lat, pred.lon, table.lat, table.lon)


@pytest.mark.slow
def test_hybrid_keeps_the_gallery_where_it_knows_the_place(trained_h, synth_tables):
    """On test rows from the training distribution, LocDiff-H places as many photos within 1 and 25 km as
    top-1 retrieval (within a point), far more than LocDiff alone, and keeps LocDiff's 2,500-km accuracy."""
    method, knn = trained_h
    test = synth_tables["test"]
    h, r, p = _acc(method.predict(test, method="locdiff-h"), test), _acc(knn.predict(test), test), \
        _acc(method.predict(test, method="locdiff"), test)
    for k in ("acc_1km", "acc_25km"):
        assert h[k] >= r[k] - 1.0, (k, h[k], r[k])
    assert h["acc_25km"] > p["acc_25km"] + 3
    assert h["acc_2500km"] >= p["acc_2500km"] - 1.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 19 item 5: the blend is chosen on iid validation rows and moves "
                   "answers to gallery points in regions the gallery has never seen (measured here: 23.0 "
                   "against LocDiff's 33.5 % within 750 km on test_unseen)")
def test_hybrid_keeps_locdiff_where_the_gallery_has_never_been(trained_h, synth_tables):
    """On held-out regions (no training row nearby), LocDiff-H is at least LocDiff at 750 and 2,500 km
    (within a point): the gallery's neighbours are all elsewhere, so LocDiff's answer must stand."""
    method, _ = trained_h
    unseen = synth_tables["test_unseen"]
    h, p = _acc(method.predict(unseen, method="locdiff-h"), unseen), _acc(method.predict(unseen, method="locdiff"),
                                                                          unseen)
    for k in ("acc_750km", "acc_2500km"):
        assert h[k] >= p[k] - 1.0, (k, h[k], p[k])
