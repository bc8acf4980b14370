"""``python -m gs_lightning harvest --world ...``: sample a synthetic world once into shards, with its truth.

A world's rows cost ~0.4 ms each on a CPU, far more than reading them back, so a world is
sampled once into the shard format that training streams (:mod:`gs_lightning.data.shard_format`).
Everything goes to one site folder, ``<output>/world``:

- ``shard_*.safetensors``: ``acts [N, d]`` and the rows' true feature activations in CSR
  form (``feature_indptr``, ``feature_indices``, ``feature_values``); no token fields;
- ``manifest.json``: as a language model's harvest's, with ``model: null`` and a ``world``
  key (``source``, the ``config`` dict, ``n_features``, ``sample_rows``);
- ``ground_truth.safetensors``: ``features [n_features, d]`` and ``bias [d]`` (float32);
- ``model/``: the world as SAELens saves it, built (or copied) by the first run.

Rows are independent draws, so nothing is shuffled. Bucket ``b`` (``shuffle_bucket_tokens``
rows, the last one fewer) is drawn from torch's global generator seeded with
``derive_seed(seed, b)``, shard by shard in calls of at most :data:`SAMPLE_ROWS` rows, and
the manifest records where each bucket ends. A killed harvest run again with the same
options forgets the shards of its unfinished bucket and goes on from the bucket after the
last complete one: its files are byte for byte those of an uninterrupted run on the same
device (another device draws other, equally valid, rows).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from gs_lightning.data.ground_truth import write_ground_truth
from gs_lightning.data.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    STORAGE_DTYPES,
    all_finite,
    atomic_write,
    derive_seed,
    encode_world_shard,
    read_manifest,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.data.worlds import SITE, SyntheticWorld, World
from gs_lightning.errors import ConfigError


class HarvestConfig(Protocol):
    """The options of :class:`gs_lightning.harvest.model.HarvestConfig` a world harvest reads (named here,
    not imported, so that ``harvest`` imports this module and not the other way round)."""

    output: str
    world: str | None
    max_tokens: int | None
    dtype: str
    shuffle_bucket_tokens: int
    shard_tokens: int
    seed: int

    def validate(self) -> None: ...
    def identity(self) -> dict[str, Any]: ...
    def torch_device(self) -> torch.device: ...

SAMPLE_ROWS = 4096
"""Rows per call to the world: bounds its dense ``[rows, n_features]`` temporaries (268 MB at 16k
features). The draws depend on it, so the manifest records it and a resume checks it."""


def harvest_world(config: HarvestConfig, on_shard: Callable[[Path], None] | None = None,
                  world: World | None = None) -> dict[str, Path]:
    """Sample ``config.world`` into ``<output>/world`` (resuming a killed run); return ``{"world": folder}``.

    ``on_shard`` is called with each shard's path once the shard and the manifest that
    lists it are written; ``world`` replaces the world ``config.world`` names (tests).
    """
    config.validate()
    folder = Path(config.output) / SITE
    world = world if world is not None else SyntheticWorld(str(config.world))
    manifest = _start_manifest(config, folder, world)
    if manifest.get("complete"):
        print(f"harvest in {config.output} is already complete")
        return {SITE: folder}
    folder.mkdir(parents=True, exist_ok=True)
    device = config.torch_device()
    with _own_rng(device):
        world.prepare(folder, device)
        write_ground_truth(folder, world.ground_truth())
        _rewind(manifest)
        with tqdm(total=config.max_tokens, initial=manifest["tokens"], unit="row", unit_scale=True,
                  desc="harvest world", smoothing=0.1) as bar:
            _write_buckets(config, world, manifest, folder, on_shard, bar.update)
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return {SITE: folder}


def _start_manifest(config: HarvestConfig, folder: Path, world: World) -> dict[str, Any]:
    """The manifest to continue from: the one on disk if it is this harvest's, else a new one."""
    record = {**world.record, "n_features": world.n_features, "sample_rows": SAMPLE_ROWS}
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        if manifest.get("harvest") != config.identity() or manifest.get("world") != record:
            raise ConfigError(
                f"{folder / MANIFEST}: holds a harvest with other options or another world; resume needs "
                f"the same options (only output and device may differ), or choose another output"
            )
        return manifest
    return {
        "format_version": FORMAT_VERSION, "model": None, "site": SITE, "d": world.d, "dtype": config.dtype,
        "tokens": 0, "bucket_ends": [], "complete": False, "shards": [], "harvest": config.identity(),
        "world": record,
    }


def _rewind(manifest: dict[str, Any]) -> None:
    """Forget the shards of a bucket that a kill cut short."""
    buckets = len(manifest["bucket_ends"])
    manifest["shards"] = [s for s in manifest["shards"] if s["bucket"] < buckets]
    manifest["tokens"] = manifest["bucket_ends"][-1]["tokens"] if buckets else 0


def _write_buckets(config: HarvestConfig, world: World, manifest: dict[str, Any], folder: Path,
                   on_shard: Callable[[Path], None] | None, progress: Callable[[int], Any]) -> None:
    """Sample the buckets after the last complete one; write each as equal shards, manifest after each."""
    assert config.max_tokens is not None  # validate() requires it for a world
    bucket, done = len(manifest["bucket_ends"]), manifest["tokens"]
    while done < config.max_tokens:
        n = min(config.shuffle_bucket_tokens, config.max_tokens - done)
        torch.manual_seed(derive_seed(config.seed, bucket))  # a bucket's rows depend on nothing before it
        sizes = _equal_parts(n, math.ceil(n / config.shard_tokens))
        for k, size in enumerate(sizes):
            acts, csr = _sample(config, world, size)
            name = shard_name(len(manifest["shards"]))
            data = encode_world_shard(acts, *csr)
            atomic_write(folder / name, data)
            manifest["shards"].append(shard_entry(name, data, acts, bucket))
            if k == len(sizes) - 1:
                manifest["bucket_ends"].append({"tokens": done + n})
            write_manifest(folder, manifest)
            progress(size)
            if on_shard is not None:
                on_shard(folder / name)
        done += n
        bucket += 1


def _equal_parts(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` near-equal parts of ``n`` rows (as ``tensor_split`` cuts a language model's bucket)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _sample(config: HarvestConfig, world: World, n: int) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """``n`` rows in the storage dtype and their true activations as CSR ``(indptr, indices, values)``."""
    storage = STORAGE_DTYPES[config.dtype]
    acts, counts, indices, values = [], [], [], []
    for start in range(0, n, SAMPLE_ROWS):
        rows, features = world.sample(min(SAMPLE_ROWS, n - start))
        on = features != 0  # nonzero() and boolean indexing both walk row-major: entries line up
        acts.append(rows.to("cpu", storage))
        counts.append(on.sum(1).cpu())
        indices.append(on.nonzero()[:, 1].to("cpu", torch.int32))
        values.append(features[on].to("cpu", torch.float32))
    out = torch.cat(acts)
    if not all_finite(out):
        raise ConfigError(f"world={config.world!r} produced NaN or Inf activations")
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    indptr[1:] = torch.cat(counts).cumsum(0)
    return out, (indptr, torch.cat(indices), torch.cat(values))


@contextmanager
def _own_rng(device: torch.device) -> Iterator[None]:
    """Seeding buckets uses torch's global generator (the world draws from it); restore the caller's state."""
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=cuda):
        yield
