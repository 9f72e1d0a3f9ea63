import json
import os

import numpy as np
import pytest
import torch

from locdiff import shdd
from locdiff.model.config import load_config
from locdiff.model.train import (
    CHECKPOINT,
    EMA,
    METRICS,
    build_model,
    diffusion_loss,
    encode_targets,
    fit,
    make_optimizer,
    train_step,
)

from .conftest import TEST_OVERRIDES, TINY


def _batch(table, n=64, degree=8):
    return {
        "embedding": torch.as_tensor(np.array(table.embedding[:n])),
        "lat": torch.as_tensor(table.lat[:n]),
        "lon": torch.as_tensor(table.lon[:n]),
    }


def test_training_lowers_the_loss(tmp_path, synth_tables, test_config):
    fit(test_config, synth_tables["train"], synth_tables["val"], tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == test_config.train.steps // test_config.train.log_every
    assert losses[-1] < 0.6 * losses[0]
    assert log[-1]["val_loss"] < 0.6 * losses[0]
    assert {"kl", "mse", "lr", "elapsed_s"} <= set(log[0])


def test_loss_objectives():
    cfg = load_config(TINY, TEST_OVERRIDES)
    z0 = encode_targets(np.array([10.0, -40.0]), np.array([20.0, 100.0]), cfg.shdd.degree)
    assert torch.allclose(z0.norm(dim=1) ** 2, torch.full((2,), 81.0), rtol=1e-4)  # D/(4 pi) * 4 pi
    for obj, keys in (("kl", {"kl"}), ("mse", {"mse"}), ("kl+mse", {"kl", "mse"})):
        cfg.train.objective = obj
        loss, parts = diffusion_loss(z0, z0, cfg)
        assert set(parts) == keys
        assert loss.item() == pytest.approx(0.0, abs=1e-5)
    # KL cannot see the constant term; MSE can (LOCDIFF.md 4)
    shifted = z0.clone()
    shifted[:, 0] += 5.0
    cfg.train.objective = "kl"
    assert diffusion_loss(shifted, z0, cfg)[0].item() == pytest.approx(0.0, abs=1e-5)
    cfg.train.objective = "kl+mse"
    assert diffusion_loss(shifted, z0, cfg)[0].item() > 0.2


def test_train_step_is_seeded_and_updates_ema(synth_tables, test_config):
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(test_config, synth_tables["train"].dim)
        opt = make_optimizer(model, test_config)
        ema = EMA(model, 0.9)
        g = torch.Generator().manual_seed(5)
        out = [
            train_step(model, _batch(synth_tables["train"]), opt, test_config, generator=g, ema=ema)
            for _ in range(3)
        ]
        results.append((out, model.state_dict(), ema))
    assert results[0][0] == results[1][0]
    for k, v in results[0][1].items():
        assert torch.equal(v, results[1][1][k])
    model_w = results[0][1]["out_proj.weight"]
    assert not torch.equal(results[0][2].module.out_proj.weight, model_w)  # EMA lags the model
    assert results[0][2].num_updates == 3


def test_train_step_under_ddp(synth_tables, test_config):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(build_model(test_config, synth_tables["train"].dim))
        opt = make_optimizer(model, test_config)
        ema = EMA(model, 0.9)
        out = train_step(
            model,
            _batch(synth_tables["train"]),
            opt,
            test_config,
            generator=torch.Generator().manual_seed(0),
            ema=ema,
        )
        assert np.isfinite(out["loss"])
        assert isinstance(ema.module, type(model.module))
    finally:
        dist.destroy_process_group()


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, synth_tables, test_config):
    test_config.train.steps = 40
    test_config.train.checkpoint_every = 10
    train = synth_tables["train"]
    straight = fit(test_config, train, None, tmp_path / "a", progress=False)
    # "interrupted" after 15 steps: the last checkpoint is at 15 (saved at the stop), resume finishes
    part = fit(test_config, train, None, tmp_path / "b", progress=False, max_steps_this_run=15)
    assert part.step == 15
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["step"] == 15
    resumed = fit(test_config, train, None, tmp_path / "b", progress=False)
    assert resumed.step == 40
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    log_a = (tmp_path / "a" / METRICS).read_text().splitlines()
    log_b = (tmp_path / "b" / METRICS).read_text().splitlines()
    # the same log steps; the averages of the window cut by the interruption may differ
    steps = lambda lines: [(json.loads(x)["step"], json.loads(x).get("lr")) for x in lines]  # noqa: E731
    assert steps(log_a) == steps(log_b)
    # a completed run is not trained again
    again = fit(test_config, train, None, tmp_path / "b", progress=False)
    assert again.step == 40


def test_fit_rejects_unlabelled(tmp_path, synth_tables, test_config):
    from locdiff.tables import EmbeddingTable

    t = synth_tables["train"]
    with pytest.raises(ValueError, match="needs lat and lon"):
        fit(test_config, EmbeddingTable(t.ids, None, None, t.embedding, "x.parquet"), None, tmp_path)


def test_scale_constant():
    assert shdd.SCALE == pytest.approx((4 * np.pi) ** 0.5)


def test_min_train_timestep_restricts_the_training_timesteps(synth_tables, test_config):
    """min_train_timestep = T - 1 (the one-step regressor ablation): every training input is at t = T - 1."""
    cfg = load_config(TINY, [*TEST_OVERRIDES, "diffusion.min_train_timestep=999"])
    torch.manual_seed(0)
    model = build_model(cfg, synth_tables["train"].dim)
    opt = make_optimizer(model, cfg)
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[1].clone()))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        train_step(model, _batch(synth_tables["train"]), opt, cfg, generator=g)
    t = torch.cat(seen)
    assert t.numel() == 3 * 64 and (t == 999).all()
