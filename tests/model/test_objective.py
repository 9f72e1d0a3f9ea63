"""LocDiff's objective: the losses, the timestep range, training through the engine lowers the loss."""

import numpy as np
import pytest
import torch

from locdiff import shdd
from locdiff.model.config import load_config
from locdiff.model.objective import LocDiffTask, diffusion_loss, encode_targets
from locdiff.model.schedule import NoiseSchedule
from locdiff.runs import RunFolder

from .conftest import TEST_OVERRIDES, TINY


def _batch(table, n=64):
    return {"embedding": torch.as_tensor(np.array(table.embedding[:n])),
            "lat": torch.as_tensor(table.lat[:n]), "lon": torch.as_tensor(table.lon[:n])}


def test_loss_objectives():
    cfg = load_config(TINY, TEST_OVERRIDES)
    z0 = encode_targets(np.array([10.0, -40.0]), np.array([20.0, 100.0]), cfg.shdd.degree)
    assert torch.allclose(z0.norm(dim=1) ** 2, torch.full((2,), 81.0), rtol=1e-4)  # D/(4 pi) * 4 pi
    for obj, keys in (("kl", {"kl"}), ("mse", {"mse"}), ("kl+mse", {"kl", "mse"})):
        cfg.train.objective = obj
        loss, parts = diffusion_loss(z0, z0, cfg)
        assert set(parts) == keys and all(isinstance(v, torch.Tensor) for v in parts.values())
        assert loss.item() == pytest.approx(0.0, abs=1e-5)
    # KL cannot see the constant term; MSE can (LOCDIFF.md 4)
    shifted = z0.clone()
    shifted[:, 0] += 5.0
    cfg.train.objective = "kl"
    assert diffusion_loss(shifted, z0, cfg)[0].item() == pytest.approx(0.0, abs=1e-5)
    cfg.train.objective = "kl+mse"
    assert diffusion_loss(shifted, z0, cfg)[0].item() > 0.2


def test_scale_constant():
    assert shdd.SCALE == pytest.approx((4 * np.pi) ** 0.5)


def test_epsilon_to_x0_lives_in_the_schedule():
    s = NoiseSchedule(1000)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    t = torch.tensor([0, 10, 300, 700, 900])
    zt = s.add_noise(z0, eps, t)
    torch.testing.assert_close(s.predict_x0(eps, zt, t, "epsilon"), z0, rtol=1e-4, atol=1e-4)
    assert s.predict_x0(z0, zt, t, "sample") is z0


def test_min_train_timestep_restricts_the_training_timesteps(synth_tables):
    """min_train_timestep = T - 1 (the one-step regressor ablation): every training input is at t = T - 1."""
    cfg = load_config(TINY, [*TEST_OVERRIDES, "diffusion.min_train_timestep=999"])
    task = LocDiffTask(cfg)
    model = task.build(synth_tables["train"].dim, (np.zeros(32, np.float32), np.ones(32, np.float32)))
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        task.loss(model, _batch(synth_tables["train"]), g)
    t = torch.cat(seen)
    assert t.numel() == 3 * 64 and (t == 999).all()


@pytest.mark.slow  # over 3 s: `make test` runs it, `make test-fast` does not
def test_training_lowers_the_loss(tmp_path, synth_tables, test_config):
    from locdiff.model.locdiff_method import LocDiffMethod

    LocDiffMethod(test_config).fit(synth_tables["train"], synth_tables["val"], tmp_path, progress=False)
    log = RunFolder(tmp_path).read_metrics()
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == test_config.train.steps // test_config.train.log_every
    assert losses[-1] < 0.6 * losses[0]
    assert log[-1]["val_loss"] < 0.6 * losses[0]
    assert {"kl", "mse", "lr", "elapsed_s", "grad_norm"} <= set(log[0])


def test_fit_rejects_unlabelled(tmp_path, synth_tables, test_config):
    from locdiff.model.locdiff_method import LocDiffMethod
    from locdiff.tables import EmbeddingTable

    t = synth_tables["train"]
    with pytest.raises(ValueError, match="needs lat and lon"):
        LocDiffMethod(test_config).fit(EmbeddingTable(t.ids, None, None, t.embedding, "x.parquet"), None,
                                       tmp_path)
