"""Training batches from a data source (`locdiff.data.datasource`) in bounded memory.

A `BatchStream` turns a source into training batches for one rank of `world_size`:
- every epoch the pieces are permuted (seeded by epoch) and dealt to ranks balancing their row counts;
- each rank reads its pieces in windows of about `window_rows` rows (the shuffle buffer), shuffles the
  rows of a window (seeded by epoch, rank and window) and cuts batches;
- every epoch has the same number of steps on every rank, S = ceil(N / (world_size * batch_size)); rank r's
  batch k is rows [k n_r / S, (k+1) n_r / S) of its epoch stream, so every row is read exactly once per
  epoch, and the stream at global step s is a pure function of s: a resumed run re-opens the window that
  held its position and continues at the exact row;
- the next windows are read by a background thread while the current one trains (prefetch).
Memory per rank is (prefetch + 1) windows, whatever the size of the data set.

The sources themselves (`open_source`, `DataSource`, `Rows`, ...) live in `locdiff.data.datasource`; they
are importable from here too.
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from locdiff.data.datasource import (
    PIECE_ROWS,
    DataSource,
    Holdout,
    ParquetSource,
    Piece,
    Rows,
    ShardSource,
    TableSource,
    open_source,
    read_table,
)

__all__ = ["PIECE_ROWS", "BatchStream", "DataSource", "EpochPlan", "Holdout", "ParquetSource", "Piece", "Rows",
           "ShardSource", "TableSource", "open_source", "read_table"]

# -- the batch stream ------------------------------------------------------------------------------------------


@dataclass
class EpochPlan:
    pieces: list[list[Piece]]  # per rank, in reading order
    rows: list[int]  # per rank


@dataclass
class BatchStream:
    """Training batches of one rank (see the module docstring). Iterate with `batches(start_step)`."""

    source: DataSource
    batch_size: int  # per rank
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    window_rows: int = 16_384  # rows shuffled together (the shuffle buffer)
    prefetch: int = 2  # windows read ahead by a background thread
    workers: int = 1  # threads reading windows (in order; memory: prefetch + workers windows ahead)
    _plans: dict[int, EpochPlan] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1; got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} must be in [0, {self.world_size})")
        pieces = [p for p in self.source.pieces if self.source.rows_in(p)]
        # enough pieces that every rank gets rows
        while 0 < len(pieces) < 4 * self.world_size and max(p.rows for p in pieces) > 1:
            finer = []
            for p in pieces:
                if p.rows > 1:
                    mid = p.start + p.rows // 2
                    finer += [replace(p, stop=mid), replace(p, start=mid, offset=p.offset + (mid - p.start))]
                else:
                    finer.append(p)
            pieces = [p for p in finer if self.source.rows_in(p)]
        self.pieces = pieces
        self.total = int(sum(self.source.rows_in(p) for p in pieces))
        if self.total == 0:
            raise ValueError(f"{self.source.describe()}: no rows to train on")
        self.steps_per_epoch = max(1, math.ceil(self.total / (self.world_size * self.batch_size)))

    def plan(self, epoch: int) -> EpochPlan:
        """Pieces of every rank for one epoch: a seeded permutation dealt greedily to the rank with the
        fewest rows (identical on every rank)."""
        if epoch in self._plans:
            return self._plans[epoch]
        order = np.random.default_rng([self.seed, epoch, 7919]).permutation(len(self.pieces))
        per_rank: list[list[Piece]] = [[] for _ in range(self.world_size)]
        rows = [0] * self.world_size
        for i in order:
            r = int(np.argmin(rows))
            per_rank[r].append(self.pieces[int(i)])
            rows[r] += self.source.rows_in(self.pieces[int(i)])
        if min(rows) < self.steps_per_epoch:
            raise ValueError(f"{self.source.describe()}: {self.total} rows are too few for {self.world_size} "
                             f"workers with batches of {self.batch_size}; use fewer workers or more data")
        self._plans = {epoch: EpochPlan(per_rank, rows)}  # keep one: plans are cheap to recompute
        return self._plans[epoch]

    def _windows(self, pieces: list[Piece]) -> list[list[Piece]]:
        windows, cur, n = [], [], 0
        for p in pieces:
            cur.append(p)
            n += self.source.rows_in(p)
            if n >= self.window_rows:
                windows.append(cur)
                cur, n = [], 0
        if cur:
            windows.append(cur)
        return windows

    def _load_window(self, epoch: int, w: int, pieces: list[Piece]) -> Rows:
        rows = Rows.concat([self.source.read(p) for p in pieces], self.source.dim)
        perm = np.random.default_rng([self.seed, epoch, self.rank, w, 104729]).permutation(len(rows))
        return rows.take(perm)

    def position(self, step: int) -> dict[str, Any]:
        """Where global step `step` starts in this rank's stream: epoch, batch, window, first piece, row."""
        epoch, k = divmod(step, self.steps_per_epoch)
        plan = self.plan(epoch)
        n_r = plan.rows[self.rank]
        row = k * n_r // self.steps_per_epoch
        seen = 0
        for w, pieces in enumerate(self._windows(plan.pieces[self.rank])):
            size = sum(self.source.rows_in(p) for p in pieces)
            if row < seen + size:
                return {"epoch": epoch, "batch": k, "window": w, "row_in_window": row - seen,
                        "piece": pieces[0].url, "piece_start": pieces[0].start}
            seen += size
        return {"epoch": epoch, "batch": k, "window": None}

    def batches(self, start_step: int = 0) -> Iterator[Rows]:
        """Batches from global step `start_step` on, forever (the caller stops at its last step)."""
        epoch, k = divmod(start_step, self.steps_per_epoch)
        while True:
            yield from self._epoch(epoch, k)
            epoch, k = epoch + 1, 0

    def _epoch(self, epoch: int, first_batch: int) -> Iterator[Rows]:
        plan = self.plan(epoch)
        n_r, s = plan.rows[self.rank], self.steps_per_epoch
        windows = self._windows(plan.pieces[self.rank])
        sizes = [sum(self.source.rows_in(p) for p in w) for w in windows]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        row = first_batch * n_r // s  # first row of the first batch in this rank's epoch stream
        w0 = int(np.searchsorted(starts, row, side="right") - 1)
        loaded = self._prefetched(epoch, windows, w0)
        buf = next(loaded).take(slice(row - int(starts[w0]), None))
        for k in range(first_batch, s):
            need = (k + 1) * n_r // s - k * n_r // s
            while len(buf) < need:
                buf = Rows.concat([buf, next(loaded)], self.source.dim)
            yield buf.take(slice(0, need))
            buf = buf.take(slice(need, None))

    def _prefetched(self, epoch: int, windows: list[list[Piece]], first: int) -> Iterator[Rows]:
        """Windows first.. of the epoch, loaded and shuffled by a background thread."""
        if self.prefetch <= 0:
            for w in range(first, len(windows)):
                yield self._load_window(epoch, w, windows[w])
            return
        if self.workers > 1:
            yield from self._pooled(epoch, windows, first)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for w in range(first, len(windows)):
                    item = self._load_window(epoch, w, windows[w])
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.2)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
                q.put(err)

        thread = threading.Thread(target=work, name=f"stream-r{self.rank}-e{epoch}", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _pooled(self, epoch: int, windows: list[list[Piece]], first: int) -> Iterator[Rows]:
        """`_prefetched` with `workers` threads: windows load in parallel and are yielded in order."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"stream-r{self.rank}-e{epoch}")
        pending: deque[Future] = deque()
        nxt = first
        try:
            while True:
                while nxt < len(windows) and len(pending) < self.prefetch + self.workers:
                    pending.append(pool.submit(self._load_window, epoch, nxt, windows[nxt]))
                    nxt += 1
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
