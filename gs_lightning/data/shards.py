"""Stream harvested activation shards: exact resume, the same order on any number of ranks.

Each epoch has one global sequence of rows: the training shards (blocks) in a seeded
per-epoch permutation, grouped into windows of about ``window_tokens``, each window's
rows permuted in memory. That sequence is cut into global batches; on ``world_size``
ranks, rank r takes global batches r, r + W, r + 2W, ... so the order does not depend
on the number of ranks, and the stream's state is one position in it:
``(epoch, window, offset)`` plus the seed.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gs_lightning.data.base import ActivationDataModule
from gs_lightning.data.memory import OrderedBatches
from gs_lightning.data.shard_format import (
    MANIFEST,
    check_header,
    generator,
    load_shard,
    read_manifest,
    scale_from_statistics,
)
from gs_lightning.errors import ConfigError
from gs_lightning.scaling import SCHEMES, ScalingScheme

_Block = tuple[Path, dict[str, Any], dict[str, Any]]  # folder, shard entry, manifest


class _EpochStream:
    """One rank's batches from the current position to the end of the epoch (sized for Lightning)."""

    def __init__(self, dm: ShardedActivationDataModule, rank: int, world_size: int, track: bool) -> None:
        self.dm, self.rank, self.world_size, self.track = dm, rank, world_size, track

    def __len__(self) -> int:
        return self.dm.batches_per_epoch() // self.world_size

    def __iter__(self) -> Iterator[Tensor]:
        return self.dm._batches(self.rank, self.world_size, self.track)


class ShardedActivationDataModule(ActivationDataModule):
    """Batches of raw float32 activations read from a harvested site folder (or several).

    Validation reads ``val_path`` (a harvest of held-out text) or, without it, the last
    ``val_shards`` shards of ``path``. The training shards are streamed in a seeded order
    that a checkpoint restores exactly (Lightning saves :meth:`state_dict`).

    Args:
        path: A site folder written by ``python -m gs_lightning harvest``, or a list of them
            (same site and width) read as one data set.
        batch_size: Activations per batch (per rank).
        input_scaling: Scaling scheme; the scale comes from the manifests' statistics of the training shards.
        seed: Seed of the shard permutation and of the window shuffle.
        val_path: Site folder(s) of a held-out harvest used as the validation set.
        val_shards: Trailing shards of ``path`` held out for validation; default 1 without
            ``val_path`` and 0 with it.
        window_tokens: Rows shuffled together in memory: whole shards, at least one.
        verify_checksums: Check each shard's sha256 against the manifest the first time this
            process reads it (NaN/Inf are checked then too; sizes on every read).
        model: If set, every manifest must name this model.
    """

    def __init__(
        self,
        path: str | list[str],
        batch_size: int = 4096,
        input_scaling: ScalingScheme = "unit_mean_squared_norm",
        seed: int = 0,
        val_path: str | list[str] | None = None,
        val_shards: int | None = None,
        window_tokens: int = 1_048_576,
        verify_checksums: bool = True,
        model: str | None = None,
    ) -> None:
        super().__init__()
        if input_scaling not in SCHEMES:
            raise ConfigError(f"input_scaling={input_scaling!r} is not one of {list(SCHEMES)}")
        if val_shards is None:
            val_shards = 0 if val_path is not None else 1
        if batch_size < 1 or val_shards < 0 or window_tokens < 1:
            raise ConfigError("batch_size and window_tokens must be >= 1, val_shards >= 0")
        self.paths = _as_list(path)
        self.val_paths = _as_list(val_path)
        self.batch_size, self.input_scaling, self.seed = batch_size, input_scaling, seed
        self.val_shards, self.window_tokens = val_shards, window_tokens
        self.verify_checksums, self.model = verify_checksums, model
        self.manifests: list[dict[str, Any]] = []
        blocks = self._blocks(self.paths)
        if len(blocks) <= val_shards:
            raise ConfigError(f"{self.paths}: {len(blocks)} shards leave none for training after val_shards={val_shards}")
        self._train: list[_Block] = blocks[: len(blocks) - val_shards]
        self._val_blocks: list[_Block] = blocks[len(blocks) - val_shards :] + self._blocks(self.val_paths)
        largest = max(e["tokens"] for _, e, _ in self._train)
        self._blocks_per_window = max(1, window_tokens // largest)
        self._state = {"epoch": 0, "window": 0, "offset": 0}
        self._yielded: deque[dict[str, int]] = deque()
        self._windows: dict[tuple[int, int], Tensor] = {}
        self._verified: set[Path] = set()  # shards whose checksum and values passed once
        self._val: Tensor | None = None
        self._scale: float | None = None

    def _blocks(self, paths: list[str]) -> list[_Block]:
        blocks = []
        for path in paths:
            manifest = self._manifest(Path(path))
            self.manifests.append(manifest)
            blocks += [(Path(path), entry, manifest) for entry in manifest["shards"]]
        return blocks

    def _manifest(self, folder: Path) -> dict[str, Any]:
        manifest = read_manifest(folder)
        if self.model is not None and manifest["model"] != self.model:
            raise ConfigError(
                f"{folder / MANIFEST}: harvested from model {manifest['model']!r}, but the config names {self.model!r}"
            )
        first = self.manifests
        if first and (manifest["site"], manifest["d"]) != (first[0]["site"], first[0]["d"]):
            raise ConfigError(f"{folder / MANIFEST}: site/d differ from {self.paths[0]}")
        return manifest

    # -- the interface -------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Width of the stored activations (from the manifest)."""
        return int(self.manifests[0]["d"])

    @property
    def input_scale(self) -> float:
        """Scale from the training shards' statistics in the manifests (valid after ``setup``)."""
        if self._scale is None:
            raise RuntimeError("input_scale is known after setup()")
        return self._scale

    @property
    def metadata(self) -> dict[str, Any]:
        """Model, site and text of the harvest, and the scaling."""
        first = self.manifests[0]
        harvest = first.get("harvest", {})
        return {
            "model": first["model"], "revision": first.get("revision"), "site": first["site"],
            "context_size": first.get("context_size"), "text": harvest.get("text"),
            "text_split": harvest.get("text_split"), "text_column": harvest.get("text_column", "text"),
            "val_split": self._val_split(),
            "source": self.paths, "input_scaling": self.input_scaling, "input_scale": self._scale,
            "d_in": self.d_in,
        }

    def _val_split(self) -> str:
        """The text split validation activations come from (the held-out harvest's, if any)."""
        if self.val_paths:
            return self.manifests[-1].get("harvest", {}).get("text_split", "validation")
        return "validation"

    def setup(self, stage: str | None = None) -> None:
        """Check every shard's size and header, compute the scale, load the validation shards."""
        for folder, entry, manifest in self._train + self._val_blocks:
            check_header(folder / entry["file"], entry, manifest)
        stats = {"count": 0, "sum_sq_norm": 0.0, "sum_norm": 0.0}
        for folder, entry, _ in self._train:
            if not math.isfinite(entry["sum_sq_norm"]):
                raise ConfigError(f"{folder / entry['file']}: activations contain NaN or Inf (per {MANIFEST})")
            stats["count"] += entry["tokens"]
            stats["sum_sq_norm"] += entry["sum_sq_norm"]
            stats["sum_norm"] += entry["sum_norm"]
        self._scale = scale_from_statistics(stats, self.d_in, self.input_scaling)
        if self._val is None:
            rows = [self._load(block) for block in self._val_blocks]
            self._val = torch.cat(rows).float() if rows else torch.empty(0, self.d_in)

    def train_dataloader(self) -> _EpochStream:
        """This rank's batches for one epoch, from the current (restored) position."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return _EpochStream(self, rank, world, track=True)

    def val_dataloader(self) -> OrderedBatches:
        """The validation shards, in order; the last batch may be smaller."""
        if self._val is None:
            raise RuntimeError("the validation set is loaded in setup(); call setup() first")
        return OrderedBatches(self._val, self.batch_size)

    def stream(self, rank: int = 0, world_size: int = 1) -> _EpochStream:
        """One rank's epoch of batches without a Trainer (tests, benchmarks); does not move the state."""
        return _EpochStream(self, rank, world_size, track=False)

    def state_dict(self) -> dict[str, Any]:
        """Position of the last batch the training loop consumed: epoch, window, offset, seed."""
        return {**self._state, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position; the next training epoch stream starts there."""
        self.seed = int(state_dict["seed"])
        self._state = {k: int(state_dict[k]) for k in ("epoch", "window", "offset")}
        self._yielded.clear()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Training batches travel in the storage dtype (half the bytes for bf16) and become
        # float32 on the device, where the conversion is cheap.
        return batch.float()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning prefetches batches, so "yielded" runs ahead of "trained on"; a batch
        # reaches this hook right before its training step, so the state advances here.
        if self._yielded and (self.trainer is None or self.trainer.training):
            self._state = self._yielded.popleft()
        return batch

    # -- the stream ----------------------------------------------------------------

    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (a final partial batch is dropped)."""
        return sum(e["tokens"] for _, e, _ in self._train) // self.batch_size

    def _windows_of(self, epoch: int) -> list[list[_Block]]:
        order = torch.randperm(len(self._train), generator=generator(self.seed, "blocks", epoch)).tolist()
        k = self._blocks_per_window
        return [[self._train[i] for i in order[j : j + k]] for j in range(0, len(order), k)]

    def _batches(self, rank: int, world: int, track: bool) -> Iterator[Tensor]:
        state = dict(self._state)
        epoch = state["epoch"]
        windows = self._windows_of(epoch)
        starts = _cumulative([sum(e["tokens"] for _, e, _ in w) for w in windows])
        if state["window"] >= len(windows):
            raise ConfigError(f"restored stream state {state} has no window {state['window']} in {self.paths} "
                              f"({len(windows)} windows); were the shards or window_tokens changed?")
        first = (starts[state["window"]] + state["offset"]) // self.batch_size
        total = self.batches_per_epoch()
        steps = (total - first) // world
        if track:
            self._yielded.clear()
        for step in range(steps):
            g = first + step * world + rank
            batch = self._rows(epoch, windows, starts, g * self.batch_size, (g + 1) * self.batch_size)
            if track:
                self._yielded.append(self._position(epoch, starts, (first + (step + 1) * world) * self.batch_size,
                                                    last=step == steps - 1))
            # The Trainer's batches are converted on the device (on_after_batch_transfer).
            yield batch if track else batch.float()
        self._windows.clear()

    def _position(self, epoch: int, starts: list[int], row: int, last: bool) -> dict[str, int]:
        if last:  # the epoch's remaining rows (less than one step) are dropped
            return {"epoch": epoch + 1, "window": 0, "offset": 0}
        w = bisect.bisect_right(starts, row) - 1
        return {"epoch": epoch, "window": w, "offset": row - starts[w]}

    def _rows(self, epoch: int, windows: list[list[_Block]], starts: list[int], a: int, b: int) -> Tensor:
        """Rows ``[a, b)`` of the epoch's sequence, which may span windows."""
        parts = []
        w = bisect.bisect_right(starts, a) - 1
        while a < b:
            window = self._window(epoch, w, windows[w])
            take = min(b, starts[w] + len(window)) - a
            parts.append(window[a - starts[w] : a - starts[w] + take])
            a += take
            w += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _window(self, epoch: int, w: int, blocks: list[_Block]) -> Tensor:
        key = (epoch, w)
        if key not in self._windows:
            for old in [k for k in self._windows if k[1] < w - 1 or k[0] != epoch]:
                del self._windows[old]  # keep this window and the previous one only
            rows = torch.cat([self._load(block) for block in blocks])
            order = torch.randperm(len(rows), generator=generator(self.seed, "window", epoch, w))
            self._windows[key] = rows[order]
        return self._windows[key]

    def _load(self, block: _Block) -> Tensor:
        folder, entry, manifest = block
        path = folder / entry["file"]
        first = path not in self._verified
        acts = load_shard(folder, entry, manifest, self.verify_checksums and first, check_finite=first)["acts"]
        self._verified.add(path)
        return acts


def _as_list(path: str | list[str] | None) -> list[str]:
    if path is None:
        return []
    return [path] if isinstance(path, str) else list(path)


def _cumulative(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += size
    return starts
