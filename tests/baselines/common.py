"""Shared checks for the baseline tests: train through the public interface, beat chance, round trip."""

from pathlib import Path

import numpy as np

from locdiff.methods import get_method
from locdiff.metrics import geo_metrics


def fit_and_check(name, options, bench, chance, run_dir: Path, *, min_gain_750=25.0):
    cfg = {"method": name, "baselines": {name: options}}
    method = get_method(name).from_config(cfg)
    out = method.fit(bench["train"], bench["test"], run_dir, progress=False)
    assert "val/acc_750km" in out
    test = bench["test"]
    pred = method.predict(test)
    assert pred.lat.shape == (len(test),) and pred.lon.shape == (len(test),)
    assert pred.confidence is not None and np.isfinite(pred.confidence).all()
    m = geo_metrics(pred.lat, pred.lon, test.lat, test.lon)
    assert m["acc_750km"] > chance["acc_750km"] + min_gain_750, m
    assert m["median_km"] < chance["median_km"] / 3, m
    loaded = get_method(name).load(run_dir, cfg)
    again = loaded.predict(test)
    np.testing.assert_allclose(again.lat, pred.lat, atol=1e-6)
    np.testing.assert_allclose(again.lon, pred.lon, atol=1e-6)
    return method, m
