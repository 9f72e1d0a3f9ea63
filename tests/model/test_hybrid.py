"""LocDiff-H holds the retrieval gallery: with an untrained diffusion model it falls back to retrieval."""

import numpy as np

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
