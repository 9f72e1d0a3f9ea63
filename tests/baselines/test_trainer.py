"""The shared epoch loop: an interrupted run resumes and ends with the same weights."""

import pytest
import torch

from locdiff.baselines.options import MLPOptions
from locdiff.baselines.trainer import CHECKPOINT, METRICS, ResidualMLP, train_epochs


class Interrupt(Exception):
    pass


def _problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randn(200, 2, generator=g)
    return x, y


def _run(run_dir, fail_at=None):
    x, y = _problem()
    opts = MLPOptions(hidden=16, depth=1, dropout=0.2, epochs=4, batch_size=32, warmup_steps=3)
    torch.manual_seed(0)
    net = ResidualMLP(8, 2, 16, 1, 0.2)
    calls = {"n": 0}

    def loss_fn(idx):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise Interrupt
        return ((net(x[idx]) - y[idx]) ** 2).mean()

    train_epochs(net, loss_fn, len(x), opts, run_dir, name="toy", progress=False)
    return net


def test_resume_gives_the_same_weights(tmp_path):
    ref = _run(tmp_path / "a")
    with pytest.raises(Interrupt):
        _run(tmp_path / "b", fail_at=20)  # during epoch 3 (7 steps per epoch)
    assert (tmp_path / "b" / CHECKPOINT).exists()
    resumed = _run(tmp_path / "b")
    for p, q in zip(ref.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q)
    lines = (tmp_path / "b" / METRICS).read_text().splitlines()
    assert len(lines) == 4  # one per epoch, none duplicated


def test_checkpoint_of_another_method_is_refused(tmp_path):
    _run(tmp_path)
    x, _ = _problem()
    net = ResidualMLP(8, 2, 16, 1, 0.2)
    with pytest.raises(ValueError, match="checkpoint of method 'toy', not 'other'"):
        train_epochs(net, lambda idx: net(x[idx]).mean(), 200, MLPOptions(epochs=1), tmp_path, name="other",
                     progress=False)
