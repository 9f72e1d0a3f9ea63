"""Checkpoints are device-independent: a checkpoint written by a GPU worker (a CUDA generator's state is 16
bytes, the CPU's 5056) resumes on a CPU, for one process and for two DDP ranks; each rank draws its own
random stream; a CPU resume stays bit-exact (tests/test_engine.py)."""

from __future__ import annotations

import logging

import pytest
import torch

from locdiff import engine
from locdiff.data.stream import TableSource
from locdiff.runs import RunFolder
from tests.test_engine import SETTINGS, Toy, _ddp_worker, _table


def _cuda_state(seed: int) -> torch.Tensor:
    """What a CUDA (Philox) generator's get_state returns: seed and offset, 16 bytes on the CPU."""
    return torch.tensor([seed, 4 * seed], dtype=torch.int64).view(torch.uint8).clone()


def _as_if_written_on_gpu(run: RunFolder) -> dict:
    """Rewrite the run's checkpoint with the random state a GPU worker saves (per rank)."""
    state = run.load_checkpoint()
    ranks = []
    for r, rng in enumerate(state["rank_rng"]):
        ranks.append({"torch": rng["torch"], "generator": _cuda_state(11 + r), "cuda": _cuda_state(23 + r)})
    state.update(rank_rng=ranks, rank_generators=[r["generator"] for r in ranks], rng=ranks[0])
    run.save_checkpoint(state)
    return state


def test_checkpoint_holds_cpu_random_state_per_rank(tmp_path):
    run = RunFolder(tmp_path)
    engine.train(Toy(), TableSource(_table()), engine.Settings(**{**SETTINGS, "steps": 10}),
                 store=engine.RunStore(run), progress=False)
    state = run.load_checkpoint()
    assert state["rng"]["generator"].device.type == "cpu" and state["rng"]["torch"].device.type == "cpu"
    assert len(state["rank_rng"]) == 1 and torch.equal(state["rank_rng"][0]["generator"], state["rng"]["generator"])


def test_checkpoint_of_a_gpu_worker_resumes_on_cpu(tmp_path, caplog):
    """The driver's last step after GPU training, and a resume of an interrupted GPU run, on a CPU."""
    src = TableSource(_table(), piece_rows=100)
    s = engine.Settings(**SETTINGS)
    finals = []
    for name in ("a", "b"):  # the same GPU checkpoint resumed twice: the reseeded streams are deterministic
        run = RunFolder(tmp_path / name)
        engine.train(Toy(), src, s, store=engine.RunStore(run), progress=False, max_steps_this_run=15)
        _as_if_written_on_gpu(run)
        with caplog.at_level(logging.INFO, logger="locdiff.engine"):
            res = engine.train(Toy(), src, s, store=engine.RunStore(run), progress=False)
        assert res.step == 40 and res.restored_from_step == 15
        assert "the cpu training generator (16 bytes) does not fit this cpu device" in caplog.text
        finals.append(res.model.state_dict())
        # a finished GPU run: the final step (no training left) loads it without error
        _as_if_written_on_gpu(run)
        again = engine.train(Toy(), src, s, store=engine.RunStore(run), progress=False)
        assert again.step == 40 and again.restored_from_step == 40
    for k, v in finals[0].items():
        assert torch.equal(v, finals[1][k]), k


@pytest.mark.slow  # two spawned DDP processes, twice
def test_two_worker_gpu_checkpoint_resumes_on_cpu(tmp_path):
    import torch.multiprocessing as mp

    from tests.orchestration.conftest import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), 10), nprocs=2, join=True)
    first = RunFolder(tmp_path / "rank0").load_checkpoint()
    assert first["step"] == 10 and len(first["rank_rng"]) == 2
    a, b = first["rank_rng"]
    assert not torch.equal(a["generator"], b["generator"])  # each rank its own stream
    assert not torch.equal(a["torch"], b["torch"])  # dropout and noise too
    for r in range(2):
        _as_if_written_on_gpu(RunFolder(tmp_path / f"rank{r}"))
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), None), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"final{r}.pt", weights_only=True) for r in range(2))
    assert w0["step"] == w1["step"] == 20 and w0["restored"] == w1["restored"] == 10
    for k in w0["weights"]:
        assert torch.equal(w0["weights"][k], w1["weights"][k]), k
