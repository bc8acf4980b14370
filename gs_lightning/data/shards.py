"""Stream harvested activation shards: exact resume, the same order on any number of ranks.

Each epoch has one global sequence of rows (see :mod:`gs_lightning.data.reader`): the
training shards in a seeded per-epoch permutation, grouped into windows of about
``window_tokens``, each window's rows permuted. That sequence is cut into global
batches; on ``world_size`` ranks, rank r takes global batches r, r + W, r + 2W, ... so
the order does not depend on the number of ranks (or of DataLoader workers), and the
stream's state is one position in it: ``(epoch, window, offset)`` plus the seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from gs_lightning.data import files
from gs_lightning.data.base import ActivationDataModule, as_is, data_parallel_rank
from gs_lightning.data.ground_truth import (
    GroundTruth,
    GroundTruthBatch,
    GroundTruthBatches,
    SparseRows,
    read_ground_truth,
    read_sparse_true_acts,
)
from gs_lightning.data.memory import OrderedBatches
from gs_lightning.data.reader import (
    Batch,
    Block,
    EpochPlan,
    WindowReader,
    blocks_per_window,
)
from gs_lightning.data.scaling import SCHEMES, ScalingScheme
from gs_lightning.data.shard_format import (
    MANIFEST,
    check_header,
    read_manifest,
    scale_from_statistics,
)
from gs_lightning.errors import ConfigError


class _WorkerShare(IterableDataset):
    """One rank's epoch split over DataLoader workers: worker j yields steps j, j + n, ...

    The DataLoader takes one batch from each worker in turn, so the batches arrive in the
    same order as with no workers.
    """

    def __init__(self, reader: WindowReader, plan: EpochPlan, rank: int) -> None:
        self.reader, self.plan, self.rank = reader, plan, rank

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        every, phase = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.reader.batches(self.plan, self.rank, every, phase)


class _EpochStream:
    """One rank's batches from the current position to the end of the epoch (sized for Lightning)."""

    def __init__(self, dm: ShardedActivationDataModule, rank: int, world_size: int, track: bool,
                 as_float: bool) -> None:
        self.dm, self.rank, self.world_size, self.track, self.as_float = dm, rank, world_size, track, as_float

    def __len__(self) -> int:
        return self.dm.batches_per_epoch() // self.world_size

    def __iter__(self) -> Iterator[Batch]:
        dm = self.dm
        plan = dm.reader.plan(dm._state, self.rank, self.world_size)
        if self.track:
            dm._plan, dm._consumed = plan, 0
        if dm.num_workers == 0:
            batches: Any = dm.reader.batches(plan, self.rank)
        else:
            batches = DataLoader(_WorkerShare(dm.reader, plan, self.rank), batch_size=None,
                                 num_workers=dm.num_workers, pin_memory=dm.reader.pin_memory, collate_fn=as_is)
        for batch in batches:
            yield dm.finish_batch(batch) if self.as_float else batch


class ShardedActivationDataModule(ActivationDataModule):
    """Batches of raw activations read from a harvested site folder (or several).

    Validation reads ``val_path`` (a harvest of held-out text) or, without it, the last
    ``val_shards`` shards of ``path``. The training shards are streamed in a seeded order
    that a checkpoint restores exactly (Lightning saves :meth:`state_dict`). Batches leave
    the DataModule in the storage dtype (half the bytes for bf16) and become float32 on
    the device.

    A harvest of a synthetic world (``python -m gs_lightning harvest --world ...``) trains
    the same way; its true dictionary is :attr:`ground_truth`, and its validation batches
    are :class:`~gs_lightning.data.ground_truth.GroundTruthBatch` es that carry each row's
    true feature activations (training batches stay plain activations).

    Args:
        path: A site folder written by ``python -m gs_lightning harvest`` (a local path or an
            fsspec URL such as ``s3://bucket/run/blocks.12.hook_resid_post``), or a list of
            them (same site and width) read as one data set.
        batch_size: Activations per batch (per rank).
        input_scaling: Scaling scheme; the scale comes from the manifests' statistics of the training shards.
        seed: Seed of the shard permutation and of the window shuffle.
        val_path: Site folder(s) of a held-out harvest used as the validation set.
        val_shards: Trailing shards of ``path`` held out for validation; default 1 without
            ``val_path`` and 0 with it.
        window_tokens: Rows shuffled together in memory: whole shards, at least one. Two
            windows are held at a time (the one being batched and the next, read ahead).
        verify_checksums: Check each shard's sha256 against the manifest the first time this
            process reads it (NaN/Inf are checked then too; sizes and headers on every read).
        model: If set, every manifest must name this model.
        target_path: Folder(s) of a second site from the same harvest (e.g. the MLP output
            when ``path`` is the MLP input, for a transcoder), aligned shard by shard with
            ``path``; batches are then ``(input, target)`` pairs.
        num_workers: DataLoader worker processes. Each worker reads every window and cuts
            every n-th batch, so the order is the same as with 0; 0 (the default) reads
            the next window in a background thread, which is enough for local disks.
        pin_memory: Gather batches into pinned host memory for asynchronous copies to the
            GPU; default: when training on CUDA.
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
        target_path: str | list[str] | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if input_scaling not in SCHEMES:
            raise ConfigError(f"input_scaling={input_scaling!r} is not one of {list(SCHEMES)}")
        if val_shards is None:
            val_shards = 0 if val_path is not None else 1
        if batch_size < 1 or val_shards < 0 or window_tokens < 1 or num_workers < 0:
            raise ConfigError("batch_size and window_tokens must be >= 1, val_shards and num_workers >= 0")
        self.paths, self.val_paths, self.target_paths = _as_list(path), _as_list(val_path), _as_list(target_path)
        self.batch_size, self.input_scaling, self.seed = batch_size, input_scaling, seed
        self.val_shards, self.window_tokens, self.num_workers = val_shards, window_tokens, num_workers
        self.verify_checksums, self.model, self.pin_memory = verify_checksums, model, pin_memory
        self.manifests: list[dict[str, Any]] = []
        site_paths = self._site_paths()
        sites = [self._split(self._blocks(paths), paths) for paths in site_paths]
        for (other, _), paths in zip(sites[1:], site_paths[1:]):
            _check_aligned(sites[0][0], other, paths)
        train = [t for t, _ in sites]
        self._val_blocks: list[list[Block]] = [v for _, v in sites]
        if self.val_paths:
            if len(sites) > 1:
                raise ConfigError("val_path with several sites is not supported; hold out val_shards instead")
            self._val_blocks[0] += self._blocks(self.val_paths, self.paths[0])
        self.reader = WindowReader(train, batch_size, seed, blocks_per_window(train[0], window_tokens),
                                   verify_checksums)
        self._state = {"epoch": 0, "window": 0, "offset": 0}
        self._plan: EpochPlan | None = None
        self._consumed = 0
        self._val: tuple[Tensor, ...] | None = None
        self._val_truth: SparseRows | None = None
        self._truth: GroundTruth | None = None
        self._truth_read = False

    def _site_paths(self) -> list[list[str]]:
        """The folders of each site streamed, the first site first (the others align with it)."""
        return [self.paths] + ([self.target_paths] if self.target_paths else [])

    def _blocks(self, paths: list[str], like: str | None = None) -> list[Block]:
        """Every shard of ``paths``: folders of one site and width (those of folder ``like``, or of the first)."""
        blocks: list[Block] = []
        reference = read_manifest(like) if like is not None else None
        for path in paths:
            manifest = read_manifest(path)
            if self.model is not None and manifest["model"] != self.model:
                raise ConfigError(f"{files.join(path, MANIFEST)}: harvested from model {manifest['model']!r}, "
                                  f"but the config names {self.model!r}")
            reference, like = reference or manifest, like or path
            if (manifest["site"], manifest["d"]) != (reference["site"], reference["d"]):
                raise ConfigError(f"{files.join(path, MANIFEST)}: site/d differ from {like}")
            self.manifests.append(manifest)
            blocks += [(path, entry, manifest) for entry in manifest["shards"]]
        return blocks

    def _split(self, blocks: list[Block], paths: list[str]) -> tuple[list[Block], list[Block]]:
        if len(blocks) <= self.val_shards:
            raise ConfigError(f"{paths}: {len(blocks)} shards leave none for training after "
                              f"val_shards={self.val_shards}")
        cut = len(blocks) - self.val_shards
        return blocks[:cut], blocks[cut:]

    # -- the interface -------------------------------------------------------------

    @property
    def d_in(self) -> int:
        """Width of the stored activations (from the manifest)."""
        return int(self.manifests[0]["d"])

    @property
    def d_out(self) -> int:
        """Width of the target site (``target_path``), or ``d_in`` without one."""
        return int(self.reader.sites[-1][0][2]["d"])

    @property
    def paired(self) -> bool:
        """Whether a ``target_path`` makes batches ``(input, target)`` pairs."""
        return bool(self.target_paths)

    @property
    def ground_truth(self) -> GroundTruth | None:
        """The true dictionary of a world harvest (from the first folder of ``path``); None for a
        language model's harvest."""
        if not self._truth_read:
            self._truth, self._truth_read = read_ground_truth(self.paths[0]), True
        return self._truth

    @property
    def metadata(self) -> dict[str, Any]:
        """Model, site and text of the harvest, and the scaling."""
        first = self.manifests[0]
        harvest = first.get("harvest", {})
        meta = {
            "model": first["model"], "revision": first.get("revision"), "site": first["site"],
            "context_size": first.get("context_size"), "text": harvest.get("text"),
            "text_split": harvest.get("text_split"), "text_column": harvest.get("text_column", "text"),
            "val_split": self._val_split(), "world": harvest.get("world"),
            "source": self.paths, "input_scaling": self.input_scaling,
            "input_scale": None if self._scales is None else self._scales[0], "d_in": self.d_in,
        }
        if self.target_paths:
            meta.update(target_site=self.reader.sites[1][0][2]["site"], d_out=self.d_out,
                        target_scale=None if self._scales is None else self._scales[1])
        return meta

    def _val_split(self) -> str:
        """The text split validation activations come from (the held-out harvest's, if any)."""
        if self.val_paths:
            return self.manifests[-1].get("harvest", {}).get("text_split", "validation")
        return "validation"

    def setup(self, stage: str | None = None) -> None:
        """Check every shard's size and header, compute the scales, load the validation shards."""
        for train, val in zip(self.reader.sites, self._val_blocks):
            for folder, entry, manifest in train + val:
                check_header(files.join(folder, entry["file"]), entry, manifest)
        self._scales = [self._scale_of(train) for train in self.reader.sites]
        if self.pin_memory is None:
            on_cuda = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
            self.reader.pin_memory = on_cuda
        else:
            self.reader.pin_memory = self.pin_memory
        if self._val is None:
            self._val = tuple(self._load_val(s, val) for s, val in enumerate(self._val_blocks))
            self._val_truth = self._load_val_truth(self._val_blocks[0]) if not self.target_paths else None

    def _scale_of(self, blocks: list[Block]) -> float:
        stats = {"count": 0, "sum_sq_norm": 0.0, "sum_norm": 0.0}
        for folder, entry, _ in blocks:
            if not math.isfinite(entry["sum_sq_norm"]):
                raise ConfigError(f"{files.join(folder, entry['file'])}: activations contain NaN or Inf "
                                  f"(per {MANIFEST})")
            stats["count"] += entry["tokens"]
            stats["sum_sq_norm"] += entry["sum_sq_norm"]
            stats["sum_norm"] += entry["sum_norm"]
        return scale_from_statistics(stats, int(blocks[0][2]["d"]), self.input_scaling)

    def _load_val(self, site: int, blocks: list[Block]) -> Tensor:
        """A site's validation rows, every shard fully checked (they are read once)."""
        reader = WindowReader([blocks], self.batch_size, self.seed, 1, self.verify_checksums)
        rows = [reader.check(0, i) for i in range(len(blocks))]
        d = int(self.reader.sites[site][0][2]["d"])
        return torch.cat(rows).float() if rows else torch.empty(0, d)

    def _load_val_truth(self, blocks: list[Block]) -> SparseRows | None:
        """The true feature activations of the validation rows, when every validation shard has them."""
        if not blocks or not all("world" in manifest for _, _, manifest in blocks):
            return None
        # A second read of each validation shard (once per run): _load_val kept only the acts.
        return SparseRows.cat([read_sparse_true_acts(folder, entry, manifest, verify=False)
                               for folder, entry, manifest in blocks])

    def train_dataloader(self) -> _EpochStream:
        """This rank's batches for one epoch, from the current (restored) position."""
        rank, world = data_parallel_rank(self.trainer)
        return _EpochStream(self, rank, world, track=True, as_float=False)

    def val_dataloader(self) -> OrderedBatches | GroundTruthBatches:
        """The validation shards, in order; the last batch may be smaller. A world's validation
        batches carry the rows' true feature activations."""
        if self._val is None:
            raise RuntimeError("the validation set is loaded in setup(); call setup() first")
        if self._val_truth is not None:
            return GroundTruthBatches(self._val[0], self._val_truth, self.batch_size)
        return OrderedBatches(self._val if len(self._val) > 1 else self._val[0], self.batch_size)

    def stream(self, rank: int = 0, world_size: int = 1, as_float: bool = True) -> _EpochStream:
        """One rank's epoch of batches without a Trainer (tests, benchmarks); does not move the state.

        ``as_float=False`` yields batches in the storage dtype, as the training loop gets them.
        """
        return _EpochStream(self, rank, world_size, track=False, as_float=as_float)

    def batches_per_epoch(self) -> int:
        """Global batches in one epoch (a final partial batch is dropped)."""
        return self.reader.batches_per_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Position of the last batch the training loop consumed: epoch, window, offset, seed."""
        return {**self._state, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from a saved position; the next training epoch stream starts there."""
        self.seed = self.reader.seed = int(state_dict["seed"])
        self._state = {k: int(state_dict[k]) for k in ("epoch", "window", "offset")}
        self._plan = None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning prefetches batches, so the stream runs ahead of training; a batch
        # reaches this hook right before its training step, so the state advances here
        # (in the main process, whether or not workers produced the batch).
        if self._plan is not None and (self.trainer is None or self.trainer.training):
            self._state = self._plan.position(self._consumed, self.batch_size)
            self._consumed += 1
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Training batches travel in the storage dtype and become float32 on the device,
        # where the conversion is cheap.
        return self.finish_batch(batch)

    def finish_batch(self, batch: Batch) -> Any:
        """A batch as the training module takes it: float32 (done on the device in training)."""
        return _to_float(batch)


def _to_float(batch: Batch | GroundTruthBatch) -> Batch | GroundTruthBatch:
    if isinstance(batch, GroundTruthBatch):  # a tuple too, but not an (input, target) pair
        return GroundTruthBatch(batch.acts.float(), batch.true_acts)
    return tuple(b.float() for b in batch) if isinstance(batch, tuple) else batch.float()


def _check_aligned(first: list[Block], other: list[Block], paths: list[str]) -> None:
    """Every site streamed with the first must list the same shards with the same token counts."""
    counts = [e["tokens"] for _, e, _ in first], [e["tokens"] for _, e, _ in other]
    if counts[0] != counts[1]:
        raise ConfigError(f"{files.join(paths[0], MANIFEST)}: its shards do not line up with "
                          f"{files.join(first[0][0], MANIFEST)} (token counts differ); sites streamed "
                          "together must come from the same harvest")


def _as_list(path: str | list[str] | None) -> list[str]:
    if path is None:
        return []
    return [str(path)] if isinstance(path, str) else [str(p) for p in path]
