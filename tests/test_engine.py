"""The one training loop: exact resume, two DDP processes end with identical weights, clear errors when a
checkpoint does not fit, the epsilon conversion in one place."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from locdiff import engine
from locdiff.data.stream import TableSource
from locdiff.runs import RunFolder
from locdiff.tables import EmbeddingTable


def _table(n=600, d=8, seed=0):
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)
    emb = np.stack([np.sin(np.radians(lat)), np.cos(np.radians(lon)), np.sin(np.radians(lon))], 1)
    emb = np.concatenate([emb, rng.normal(scale=0.1, size=(n, d - 3))], 1).astype(np.float32)
    return EmbeddingTable(np.array([f"i{i}" for i in range(n)], object), lat, lon, emb, "toy")


class Toy(engine.Task):
    """Regress the unit vector with dropout and noise: uses both the global RNG and the generator."""

    name = "toy"

    def build(self, embed_dim, stats):
        return nn.Sequential(nn.Linear(embed_dim, 32), nn.GELU(), nn.Dropout(0.2), nn.Linear(32, 3))

    def loss(self, model, batch, generator):
        from locdiff.geo import latlon_to_unit

        x = batch["embedding"]
        x = x + 0.01 * torch.randn(x.shape, generator=generator)
        u = latlon_to_unit(batch["lat"], batch["lon"]).float()
        mse = ((model(x) - u) ** 2).sum(1).mean()
        return mse, {"mse": mse.detach()}


SETTINGS = dict(steps=40, batch_size=64, lr=1e-2, warmup_steps=5, checkpoint_every=10, log_every=5,
                ema_decay=0.9, window_rows=128)


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    src = TableSource(_table(), piece_rows=100)
    s = engine.Settings(**SETTINGS)
    a = engine.train(Toy(), src, s, store=engine.RunStore(RunFolder(tmp_path / "a")), progress=False)
    store = engine.RunStore(RunFolder(tmp_path / "b"))
    part = engine.train(Toy(), src, s, store=store, progress=False, max_steps_this_run=15)
    assert part.step == 15 and RunFolder(tmp_path / "b").load_checkpoint()["step"] == 15
    b = engine.train(Toy(), src, s, store=store, progress=False)
    assert b.step == 40 and b.restored_from_step == 15
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    log_a = [(r["step"], r.get("lr")) for r in RunFolder(tmp_path / "a").read_metrics()]
    log_b = [(r["step"], r.get("lr")) for r in RunFolder(tmp_path / "b").read_metrics()]
    assert log_a == log_b  # the log is cut back to the checkpoint and written once
    again = engine.train(Toy(), src, s, store=store, progress=False)
    assert again.step == 40 and again.restored_from_step == 40  # a finished run is not trained again


def test_checkpoint_of_other_data_or_task_is_a_clear_error(tmp_path):
    s = engine.Settings(**{**SETTINGS, "steps": 10})
    store = engine.RunStore(RunFolder(tmp_path))
    engine.train(Toy(), TableSource(_table()), s, store=store, progress=False)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: trained on 8-d embeddings, but toy has 5-d"):
        engine.train(Toy(), TableSource(_table(d=5)), s, store=store, progress=False)

    class Other(Toy):
        name = "other"

    with pytest.raises(ValueError, match="checkpoint of .*toy"):
        engine.train(Other(), TableSource(_table()), s, store=store, progress=False)


def _ddp_worker(rank: int, world: int, port: int, out: str, steps_this_run: int | None = None) -> None:
    """One DDP rank of a 20-step run (`steps_this_run`: stop early, as an interruption); it saves its final
    weights, the step it restored from and the step it reached to OUT/final{rank}.pt."""


    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        d = engine.Distributed(rank, world, wrap=lambda m: nn.parallel.DistributedDataParallel(m))
        s = engine.Settings(**{**SETTINGS, "steps": 20})
        res = engine.train(Toy(), TableSource(_table(), piece_rows=100), s,
                           store=engine.RunStore(RunFolder(f"{out}/rank{rank}")), dist=d, progress=False,
                           max_steps_this_run=steps_this_run)
        torch.save({"weights": res.model.state_dict(), "restored": res.restored_from_step, "step": res.step},
                   f"{out}/final{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # over 3 s: `make test` runs it, `make test-fast` does not
def test_two_ddp_processes_end_with_identical_weights(tmp_path):
    import torch.multiprocessing as mp

    from tests.orchestration.conftest import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"final{r}.pt", weights_only=True)["weights"] for r in range(2))
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # and training moved them (not two copies of the initial weights)
    init = Toy().build(8, None).state_dict()
    assert not all(torch.equal(init[k], w0[k]) for k in init)


class Recorder(engine.Callback):
    """Records what the engine hands its callbacks and keeps an entry of its own in each checkpoint."""

    def __init__(self):
        self.rows, self.checkpoints, self.resumed = [], [], []

    def on_log(self, rows):
        self.rows.extend(rows)

    def on_checkpoint(self, state):
        self.checkpoints.append(int(state["step"]))
        state["recorder_rows"] = len(self.rows)

    def on_resume(self, state):
        self.resumed.append((int(state["step"]), state.get("recorder_rows")))


def test_callbacks_see_the_log_and_every_checkpoint_and_get_their_entries_back(tmp_path):
    """The engine hands its callbacks exactly the rows the store logs and every checkpoint; what a callback
    adds to a checkpoint is stored with it and handed back on resume."""
    src = TableSource(_table(), piece_rows=100)
    s = engine.Settings(**{**SETTINGS, "steps": 30})
    run = RunFolder(tmp_path)
    first = Recorder()
    engine.train(Toy(), src, s, store=engine.RunStore(run), progress=False, max_steps_this_run=20,
                 callbacks=[first])
    assert first.rows == run.read_metrics() and first.checkpoints == [10, 20] and first.resumed == []
    assert run.load_checkpoint()["recorder_rows"] == len(first.rows)
    second = Recorder()
    engine.train(Toy(), src, s, store=engine.RunStore(run), progress=False, callbacks=[second])
    assert second.resumed == [(20, len(first.rows))] and second.checkpoints == [30]
    assert first.rows + second.rows == run.read_metrics()


def test_cpu_threads_leaves_the_loader_its_core(monkeypatch):
    """A setting wins, then OMP_NUM_THREADS (Ray sets it per worker), else the usable CPUs minus the loader
    threads, never below 1."""


    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert engine.cpu_threads(3, 1) == 3
    assert engine.cpu_threads(0, 1) == max(1, cpus - 1)
    assert engine.cpu_threads(0, cpus + 4) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert engine.cpu_threads(0, 1) == 5 and engine.cpu_threads(2, 1) == 2


def test_training_restores_the_callers_thread_count(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    s = engine.Settings(**{**SETTINGS, "steps": 5, "threads": 1})
    engine.train(Toy(), TableSource(_table(), piece_rows=100), s, store=engine.RunStore(RunFolder(tmp_path)),
                 progress=False)
    assert torch.get_num_threads() == before
