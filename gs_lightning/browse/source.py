"""Reading one harvested site folder for the browser: rows in harvest order, with provenance.

A row's provenance is one int64 *token key*, ``context_id * context_size + position``: its
place in the harvest's token stream. It is what the streaming accumulators carry around
(one integer instead of two) and :func:`split_keys` turns it back into the pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gs_lightning.data import files
from gs_lightning.data.shard_format import (
    MANIFEST,
    check_header,
    load_shard,
    read_manifest,
    require_provenance,
)
from gs_lightning.errors import ConfigError


@dataclass(frozen=True)
class Rows:
    """A slice of rows of a site folder: raw activations and where each row came from."""

    acts: Tensor
    """``[n, d]`` in the storage dtype."""
    keys: Tensor
    """``[n]`` int64 token keys (``context_id * context_size + position``)."""
    token_ids: Tensor
    """``[n]`` int32."""


class HarvestSource:
    """The shards of one harvested site folder (format version 2 or later), read in manifest order."""

    def __init__(self, folder: str | Path, verify_checksums: bool = True) -> None:
        self.folder = str(folder)
        self.manifest = read_manifest(self.folder)
        require_provenance(self.folder, self.manifest)
        if not self.manifest.get("context_size"):
            raise ConfigError(f"{files.join(self.folder, MANIFEST)}: no context_size; is it a harvest's manifest?")
        self.context_size = int(self.manifest["context_size"])
        self.verify_checksums = verify_checksums
        for entry in self.manifest["shards"]:
            check_header(files.join(self.folder, entry["file"]), entry, self.manifest)

    @property
    def tokens(self) -> int:
        """Rows in the folder."""
        return sum(int(e["tokens"]) for e in self.manifest["shards"])

    @property
    def d(self) -> int:
        """Width of the stored activations."""
        return int(self.manifest["d"])

    def shard(self, entry: dict[str, Any]) -> Rows:
        """One whole shard, checked against the manifest."""
        tensors = load_shard(self.folder, entry, self.manifest, self.verify_checksums)
        path = files.join(self.folder, entry["file"])
        if "context_ids" not in tensors:
            raise ConfigError(f"{path}: no context_ids although {MANIFEST} says format version "
                              f"{self.manifest.get('format_version')}; the folder is damaged, re-harvest it")
        keys = tensors["context_ids"].to(torch.int64) * self.context_size + tensors["positions"].to(torch.int64)
        return Rows(tensors["acts"], keys, tensors["token_ids"])

    def batches(self, batch_size: int, entries: list[dict[str, Any]] | None = None) -> Iterator[Rows]:
        """Rows in manifest order (no shuffle), ``batch_size`` at a time (the last of a shard may be smaller)."""
        for entry in self.manifest["shards"] if entries is None else entries:
            rows = self.shard(entry)
            for a in range(0, len(rows.keys), batch_size):
                yield Rows(rows.acts[a : a + batch_size], rows.keys[a : a + batch_size],
                           rows.token_ids[a : a + batch_size])

    def shards_of_contexts(self, context_ids: list[int]) -> list[dict[str, Any]]:
        """The shards that can hold rows of ``context_ids``: those of the buckets the contexts
        fell in (a context never spans buckets), or every shard when the manifest has no bucket list."""
        ends = self.manifest.get("bucket_ends")
        if not ends:
            return list(self.manifest["shards"])
        bounds = torch.tensor([e["contexts"] for e in ends])
        buckets = set(torch.bucketize(torch.tensor(context_ids), bounds, right=True).tolist())
        return [e for e in self.manifest["shards"] if e.get("bucket") in buckets]


def split_keys(keys: Tensor, context_size: int) -> tuple[Tensor, Tensor]:
    """Token keys back to ``(context_ids, positions)``."""
    return keys.div(context_size, rounding_mode="floor"), keys.remainder(context_size)
