"""Ground truth beside activations: the true feature directions of a synthetic world and,
per row, the true feature activations that made it.

A world (SynthSAEBench's ``sae_lens.synthetic.SyntheticModel``) makes each row as
``x = a @ features + bias`` from sparse feature activations ``a``. A harvest from a world
stores ``a`` beside ``x`` so that an SAE can be scored against the truth (MCC, F1, ...:
:mod:`gs_lightning.evaluation.ground_truth`). These two types are the interface between
the data side and the scoring side.

A world harvest's site folder holds the dictionary in ``ground_truth.safetensors``
(:func:`read_ground_truth`) and each shard the rows' true activations in CSR form
(:func:`read_true_acts`; the layout is in :mod:`gs_lightning.data.shard_format`). Nothing
here needs SAELens: reading a world's harvest does not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

from gs_lightning.data import files
from gs_lightning.data.shard_format import FEATURE_KEYS, MANIFEST, atomic_write, load_shard, read_manifest
from gs_lightning.errors import ConfigError


class GroundTruth(NamedTuple):
    """The world's true dictionary, in the raw units of the stored activations."""

    features: Tensor
    """``[n_features, d]``: the true feature directions (rows)."""
    bias: Tensor
    """``[d]``: the world's bias, added to every row."""


class GroundTruthBatch(NamedTuple):
    """A validation batch that carries the true feature activations of its rows."""

    acts: Tensor
    """``[batch, d]``: the raw activations."""
    true_acts: Tensor
    """``[batch, n_features]`` float32, dense: the true feature activations of each row (0 where off)."""


GROUND_TRUTH = "ground_truth.safetensors"
"""The file in a world harvest's site folder that holds its :class:`GroundTruth`."""


def write_ground_truth(folder: Path, truth: GroundTruth) -> None:
    """Write ``truth`` to ``folder/ground_truth.safetensors`` (float32, atomically)."""
    data = save_bytes({"features": truth.features.float().cpu().contiguous(),
                       "bias": truth.bias.float().cpu().contiguous()})
    atomic_write(folder / GROUND_TRUTH, data)


def read_ground_truth(folder: str | Path) -> GroundTruth | None:
    """The true dictionary stored in a site folder (local or URL); None for a language model's harvest."""
    path = files.join(str(folder), GROUND_TRUTH)
    if files.file_size(path) is None:
        return None
    try:
        tensors = load_bytes(files.read_bytes(path))
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from err
    features, bias = tensors.get("features"), tensors.get("bias")
    if features is None or bias is None or features.dim() != 2 or tuple(bias.shape) != (features.shape[1],):
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ConfigError(f"{path}: needs features [n_features, d] and bias [d], found {found}")
    return GroundTruth(features.float(), bias.float())


@dataclass(frozen=True)
class SparseRows:
    """True feature activations of consecutive rows in CSR form, as a world's shards store them."""

    indptr: Tensor
    """``[rows + 1]`` int64: row i's entries are ``indptr[i]:indptr[i + 1]``."""
    indices: Tensor
    """``[nnz]``: the feature of each entry."""
    values: Tensor
    """``[nnz]`` float32: its activation."""
    n_features: int

    @property
    def rows(self) -> int:
        """Number of rows."""
        return self.indptr.shape[0] - 1

    def dense(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows ``[start, stop)`` as a dense float32 ``[stop - start, n_features]`` tensor (0 where off)."""
        stop = self.rows if stop is None else stop
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        counts = self.indptr[start + 1 : stop + 1] - self.indptr[start:stop]
        rows = torch.repeat_interleave(torch.arange(stop - start), counts)
        out = torch.zeros(stop - start, self.n_features)
        out[rows, self.indices[a:b].long()] = self.values[a:b].float()
        return out

    @staticmethod
    def cat(parts: list[SparseRows]) -> SparseRows:
        """The rows of ``parts`` one after another (at least one part, all of one width)."""
        offsets = [0]
        for part in parts[:-1]:
            offsets.append(offsets[-1] + int(part.indptr[-1]))
        indptr = torch.cat([parts[0].indptr[:1]] + [p.indptr[1:] + o for p, o in zip(parts, offsets)])
        return SparseRows(indptr, torch.cat([p.indices for p in parts]), torch.cat([p.values for p in parts]),
                          parts[0].n_features)


def world_features(folder: str | Path, manifest: dict[str, Any]) -> int:
    """The number of true features of a world harvest's manifest; a ConfigError for any other harvest."""
    world = manifest.get("world")
    if not isinstance(world, dict) or "n_features" not in world:
        raise ConfigError(f"{files.join(str(folder), MANIFEST)}: not a harvest of a synthetic world "
                          "(no true feature activations)")
    return int(world["n_features"])


def sparse_true_acts(tensors: dict[str, Tensor], n_features: int, where: str) -> SparseRows:
    """A loaded world shard's true feature activations, checked for consistency (``where`` names the shard)."""
    missing = [k for k in FEATURE_KEYS if k not in tensors]
    if missing:
        raise ConfigError(f"{where}: no true feature activations ({missing} missing)")
    indptr, indices, values = (tensors[k] for k in FEATURE_KEYS)
    rows, nnz = tensors["acts"].shape[0], indices.shape[0]
    shapes_ok = indptr.shape == (rows + 1,) and values.shape == (nnz,) and indices.dim() == 1
    if not shapes_ok or int(indptr[0]) != 0 or int(indptr[-1]) != nnz or bool((indptr.diff() < 0).any()):
        raise ConfigError(f"{where}: inconsistent true feature activations (indptr {tuple(indptr.shape)}, "
                          f"indices {tuple(indices.shape)}, values {tuple(values.shape)}, {rows} rows)")
    if nnz and not 0 <= int(indices.min()) <= int(indices.max()) < n_features:
        raise ConfigError(f"{where}: a feature index outside 0..{n_features - 1}")
    return SparseRows(indptr, indices, values, n_features)


def read_sparse_true_acts(folder: str, entry: dict[str, Any], manifest: dict[str, Any],
                          verify: bool = True) -> SparseRows:
    """A world shard's true feature activations in CSR form; the shard is checked as
    :func:`~gs_lightning.data.shard_format.load_shard` checks it (checksum when ``verify``)."""
    n_features = world_features(folder, manifest)
    tensors = load_shard(folder, entry, manifest, verify, check_finite=False)
    return sparse_true_acts(tensors, n_features, files.join(str(folder), entry["file"]))


def read_true_acts(folder: str, entry: dict[str, Any], manifest: dict[str, Any], verify: bool = True) -> Tensor:
    """A world shard's true feature activations as a dense float32 ``[rows, n_features]`` tensor."""
    return read_sparse_true_acts(folder, entry, manifest, verify).dense()


class GroundTruthBatches:
    """Validation rows in order, as :class:`GroundTruthBatch` es of ``batch_size`` (the last may be short).

    The true activations stay sparse in memory and become dense one batch at a time: a
    dense validation set of a 16k-feature world would take gigabytes.
    """

    def __init__(self, acts: Tensor, true_acts: SparseRows, batch_size: int) -> None:
        if true_acts.rows != acts.shape[0]:
            raise ValueError(f"{acts.shape[0]} rows of activations but {true_acts.rows} of true activations")
        self.acts, self.true_acts, self.batch_size = acts, true_acts, batch_size

    def __len__(self) -> int:
        return math.ceil(self.acts.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[GroundTruthBatch]:
        for start in range(0, self.acts.shape[0], self.batch_size):
            stop = min(start + self.batch_size, self.acts.shape[0])
            yield GroundTruthBatch(self.acts[start:stop], self.true_acts.dense(start, stop))


def world_batches(folder: str, n_rows: int, batch_rows: int) -> Iterator[GroundTruthBatch]:
    """The last ``n_rows`` rows of a world harvest in file order, ``batch_rows`` at a time (batches
    end at shard ends), each shard read and checked once."""
    manifest = read_manifest(folder)
    n_features = world_features(folder, manifest)
    chosen, rows = [], 0
    for entry in reversed(manifest["shards"]):
        if rows >= n_rows:
            break
        chosen.append(entry)
        rows += entry["tokens"]
    skip = max(0, rows - n_rows)  # leading rows of the earliest shard chosen
    for entry in reversed(chosen):
        tensors = load_shard(folder, entry, manifest, verify=True)
        acts = tensors["acts"].float()
        true_acts = sparse_true_acts(tensors, n_features, files.join(folder, entry["file"]))
        for start in range(skip, acts.shape[0], batch_rows):
            stop = min(start + batch_rows, acts.shape[0])
            yield GroundTruthBatch(acts[start:stop], true_acts.dense(start, stop))
        skip = 0
