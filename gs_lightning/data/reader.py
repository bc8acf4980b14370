"""The epoch sequence of a harvested data set, and the batches cut from it.

One epoch is one global sequence of rows: the training shards (blocks) in a seeded
per-epoch permutation, grouped into windows of ``blocks_per_window`` shards, each
window's rows in a seeded permutation. Global batch ``g`` is rows
``[g * batch_size, (g + 1) * batch_size)`` of that sequence, so a position in the
stream is a row index (stored as ``(epoch, window, offset)``) and any rank or worker can
compute any batch without talking to the others.

Reading is the expensive part, so a window is read with one ``readinto`` per shard
straight into its buffer (after a shard has passed its checksum and NaN check once)
while a background thread reads the next window; a batch is then one ``index_select``
of the window's permutation. Several aligned sites (the same tokens in the same order,
as one harvest writes them) are read together and batched as a tuple.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gs_lightning.data import files
from gs_lightning.data.shard_format import STORAGE_DTYPES, generator, load_shard, read_acts_into
from gs_lightning.errors import ConfigError

Block = tuple[str, dict[str, Any], dict[str, Any]]
"""A shard: its folder (path or URL), its manifest entry, and the folder's manifest."""

Batch = Tensor | tuple[Tensor, ...]


@dataclass(frozen=True)
class EpochPlan:
    """Where one rank's stream starts in an epoch and how long it runs."""

    epoch: int
    starts: list[int]
    """First row of each window in the epoch's sequence."""
    first: int
    """Global batch the stream starts at."""
    steps: int
    """Batches this rank yields (each rank yields the same number)."""
    world: int

    def position(self, step: int, batch_size: int) -> dict[str, int]:
        """The stream state once ``step + 1`` of this rank's batches have been consumed."""
        if step == self.steps - 1:  # the epoch's remaining rows (less than one step) are dropped
            return {"epoch": self.epoch + 1, "window": 0, "offset": 0}
        row = (self.first + (step + 1) * self.world) * batch_size
        w = bisect.bisect_right(self.starts, row) - 1
        return {"epoch": self.epoch, "window": w, "offset": row - self.starts[w]}


class WindowReader:
    """Reads windows of one or more aligned sites and cuts batches from them.

    Picklable (the loader thread is created on first use), so DataLoader workers can
    each hold a copy.
    """

    def __init__(self, sites: list[list[Block]], batch_size: int, seed: int, blocks_per_window: int,
                 verify_checksums: bool, pin_memory: bool = False) -> None:
        self.sites, self.batch_size, self.seed = sites, batch_size, seed
        self.blocks_per_window, self.verify_checksums, self.pin_memory = blocks_per_window, verify_checksums, pin_memory
        self._checked: set[tuple[int, int]] = set()  # (site, block) that passed the full check
        self._windows: dict[tuple[int, int], tuple[tuple[Tensor, ...], Tensor]] = {}
        self._ahead: tuple[tuple[int, int], Future] | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Rows of the first site loaded from shards by this process (read-ahead included;
        # DataLoader workers count in their own copies): how a suite shows that one packed
        # run read each shard once for all its SAEs.
        self.rows_read = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_windows={}, _ahead=None, _pool=None)
        return state

    @property
    def blocks(self) -> list[Block]:
        """The first site's training shards (the others are aligned with them)."""
        return self.sites[0]

    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (a final partial batch is dropped)."""
        return sum(e["tokens"] for _, e, _ in self.blocks) // self.batch_size

    def windows_of(self, epoch: int) -> list[list[int]]:
        """Block indices of each window of ``epoch``."""
        order = torch.randperm(len(self.blocks), generator=generator(self.seed, "blocks", epoch)).tolist()
        k = self.blocks_per_window
        return [order[j : j + k] for j in range(0, len(order), k)]

    def plan(self, state: dict[str, int], rank: int, world: int) -> EpochPlan:
        """The rest of the epoch from a saved position, for one of ``world`` ranks."""
        windows = self.windows_of(state["epoch"])
        starts = _cumulative([sum(self.blocks[i][1]["tokens"] for i in w) for w in windows])
        if state["window"] >= len(windows):
            raise ConfigError(f"restored stream state {state} has no window {state['window']} "
                              f"({len(windows)} windows); were the shards or window_tokens changed?")
        first = (starts[state["window"]] + state["offset"]) // self.batch_size
        steps = (self.batches_per_epoch() - first) // world
        return EpochPlan(state["epoch"], starts, first, steps, world)

    def batches(self, plan: EpochPlan, rank: int, every: int = 1, phase: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``plan``, in storage dtype; with ``every > 1`` only steps
        ``phase, phase + every, ...`` (one DataLoader worker's share)."""
        windows = self.windows_of(plan.epoch)
        try:
            for step in range(phase, plan.steps, every):
                g = plan.first + step * plan.world + rank
                yield self._rows(plan, windows, g * self.batch_size, (g + 1) * self.batch_size)
        finally:
            self._windows.clear()

    # -- windows ----------------------------------------------------------------------

    def _rows(self, plan: EpochPlan, windows: list[list[int]], a: int, b: int) -> Batch:
        """Rows ``[a, b)`` of the epoch's sequence, which may span windows."""
        w = bisect.bisect_right(plan.starts, a) - 1
        parts: list[tuple[tuple[Tensor, ...], Tensor]] = []
        while a < b:
            data, order = self._window(plan.epoch, w, windows)
            take = min(b, plan.starts[w] + len(order)) - a
            parts.append((data, order[a - plan.starts[w] : a - plan.starts[w] + take]))
            a += take
            w += 1
        for key in [k for k in self._windows if k[1] < w - 1]:
            del self._windows[key]  # every later batch starts in window w - 1 or after
        out = tuple(self._gather([(data[s], idx) for data, idx in parts]) for s in range(len(self.sites)))
        return out[0] if len(out) == 1 else out

    def _gather(self, parts: list[tuple[Tensor, Tensor]]) -> Tensor:
        rows = sum(len(idx) for _, idx in parts)
        src = parts[0][0]
        out = torch.empty(rows, src.shape[1], dtype=src.dtype, pin_memory=self.pin_memory)
        done = 0
        for data, idx in parts:
            torch.index_select(data, 0, idx, out=out[done : done + len(idx)])
            done += len(idx)
        return out

    def _window(self, epoch: int, w: int, windows: list[list[int]]) -> tuple[tuple[Tensor, ...], Tensor]:
        key = (epoch, w)
        if key not in self._windows:
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead[0] == key:
                self._windows[key] = ahead[1].result()
            else:
                if ahead is not None:
                    ahead[1].result()  # never two reads at once; surface its error if any
                self._windows[key] = self._load(epoch, w, windows[w])
            if w + 1 < len(windows):  # read the next window while this one is batched
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="gs-shard-reader")
                self._ahead = ((epoch, w + 1), self._pool.submit(self._load, epoch, w + 1, windows[w + 1]))
        return self._windows[key]

    def _load(self, epoch: int, w: int, blocks: list[int]) -> tuple[tuple[Tensor, ...], Tensor]:
        data = tuple(self._read_site(s, blocks) for s in range(len(self.sites)))
        self.rows_read += len(data[0])
        order = torch.randperm(len(data[0]), generator=generator(self.seed, "window", epoch, w))
        return data, order

    def _read_site(self, site: int, blocks: list[int]) -> Tensor:
        entries = [self.sites[site][i] for i in blocks]
        manifest = entries[0][2]
        out = torch.empty(sum(e["tokens"] for _, e, _ in entries), manifest["d"],
                          dtype=STORAGE_DTYPES[manifest["dtype"]])
        row = 0
        for i, (folder, entry, shard_manifest) in zip(blocks, entries):
            rows = out[row : row + entry["tokens"]]
            if (site, i) in self._checked:
                read_acts_into(folder, entry, shard_manifest, rows)
            else:
                rows.copy_(self.check(site, i))
            row += entry["tokens"]
        return out

    def check(self, site: int, i: int) -> Tensor:
        """Read shard ``i`` of ``site`` whole: size, checksum, dtype, shape, finiteness, and for a
        second site the same tokens as the first; returns its activations."""
        folder, entry, manifest = self.sites[site][i]
        tensors = load_shard(folder, entry, manifest, self.verify_checksums, check_finite=True)
        if site > 0:
            ref_folder, ref_entry, ref_manifest = self.sites[0][i]
            ref = load_shard(ref_folder, ref_entry, ref_manifest, False, check_finite=False)
            if not torch.equal(ref["token_ids"], tensors["token_ids"]):
                raise ConfigError(
                    f"{files.join(folder, entry['file'])}: holds other tokens than "
                    f"{files.join(ref_folder, ref_entry['file'])}; sites streamed together must come "
                    "from one harvest"
                )
        self._checked.add((site, i))
        return tensors["acts"]


def _cumulative(sizes: list[int]) -> list[int]:
    """Start of each part: ``[0, s0, s0 + s1, ...]`` without the total."""
    return list(itertools.accumulate(sizes, initial=0))[:-1]


def blocks_per_window(blocks: list[Block], window_tokens: int) -> int:
    """Whole shards per window: as many of the largest shard as fit in ``window_tokens``, at least one."""
    largest = max(e["tokens"] for _, e, _ in blocks)
    return max(1, math.floor(window_tokens / largest))
