"""``python -m gs_lightning harvest``: run a model over a text once and store shuffled activations.

One forward pass reads every site; each site gets its own folder of shards (see
:mod:`gs_lightning.data.shard_format`). Contexts are grouped into buckets of at least
``shuffle_bucket_tokens`` content tokens; a bucket is shuffled with a generator derived
from ``(seed, bucket index)`` (the same permutation for every site, so row i of a shard
is the same token at every site) and cut into shards. Buckets close only at the end of
a forward group, and the manifest records how many contexts the complete buckets used,
so a killed harvest resumes by skipping those contexts and writes the same bytes as an
uninterrupted one. Each row records its context's index in the context stream
(``context_ids``), so the rows of a context can be gathered back although they are
shuffled; a context never spans two buckets, since buckets close between forward groups.

With ``world`` set there is no language model: a synthetic world's rows and their true
feature activations are sampled into ``output/world`` (:mod:`gs_lightning.harvest.world`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from tqdm import tqdm

from gs_lightning.data.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    STORAGE_DTYPES,
    all_finite,
    atomic_write,
    encode_shard,
    generator,
    read_manifest,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.errors import ConfigError, check_at_least
from gs_lightning.harvest.world import harvest_world
from gs_lightning.lm.load import (
    ModelDtype,
    check_context_size,
    parse_dtype,
    shared_language_model,
)
from gs_lightning.lm.sites import ActivationExtractor, parse_site, site_dim
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts

StorageDtype = Literal["float32", "bfloat16"]
_WORLD_OPTIONS = ("world", "max_tokens", "dtype", "shuffle_bucket_tokens", "shard_tokens", "seed")


@dataclass
class HarvestConfig:
    """Harvest activations of one or more sites into shuffled safetensors shards.

    Args:
        output: Directory that receives one folder of shards per site.
        world: A synthetic world to sample instead of running a model: ``synthsaebench-16k``,
            ``synthsaebench-cpu``, a folder saved by SAELens' ``SyntheticModel.save``, or a
            YAML/JSON file of a ``SyntheticModelConfig`` dict (needs the bench extra). Its
            ``max_tokens`` rows (required) and their true feature activations go to
            ``output/world``; the model, text and site options are then ignored.
        model: Embedded model name, local directory or Hugging Face hub name.
        revision: Hub revision (branch, tag or commit) of the model.
        model_dtype: Dtype the language model runs in.
        sites: Sites read in the same forward pass (e.g. blocks.1.hook_resid_post).
        text: ``kjv``, a local .txt file or directory, or a Hugging Face datasets name.
        text_split: Split of ``text`` to harvest.
        text_column: Column holding the text in a datasets dataset.
        context_size: Tokens per context, BOS included (Gemma Scope uses 1024).
        model_batch_size: Contexts per forward pass of the language model.
        max_tokens: Content tokens to harvest (BOS/EOS/pad excluded), or rows to sample from a
            world; None reads the whole split.
        dtype: Storage dtype of the activations.
        shuffle_bucket_tokens: Tokens are shuffled within buckets of at least this many before writing.
        shard_tokens: Most tokens per shard; a bucket is cut into equal shards of at most this many.
        seed: Seed of the bucket shuffles.
        device: Where the model runs: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or
            ``cuda:N``. Not part of the harvest's identity: a harvest resumed on another
            device continues it (its shards then agree to rounding, not bit for bit).
    """

    output: str
    world: str | None = None
    model: str = "gs-lightning/tiny-gemma2-kjv"
    revision: str | None = None
    model_dtype: ModelDtype = "float32"
    sites: list[str] = field(default_factory=lambda: ["blocks.1.hook_resid_post"])
    text: str = "kjv"
    text_split: str = "train"
    text_column: str = "text"
    context_size: int = 1024
    model_batch_size: int = 8
    max_tokens: int | None = None
    dtype: StorageDtype = "bfloat16"
    shuffle_bucket_tokens: int = 1_048_576
    shard_tokens: int = 131_072
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        """Raise a ConfigError naming the first bad option."""
        check_at_least(self, {"context_size": 2, "model_batch_size": 1, "shuffle_bucket_tokens": 1,
                              "shard_tokens": 1, "max_tokens": 1})
        if self.world is not None and self.max_tokens is None:
            raise ConfigError(f"max_tokens: world={self.world!r} is sampled, not read to its end: "
                              "set max_tokens (the number of rows)")
        if not self.sites:
            raise ConfigError("sites: give at least one site")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {list(STORAGE_DTYPES)}")
        parse_dtype(self.model_dtype)
        self.torch_device()
        for site in self.sites:
            parse_site(site)

    def identity(self) -> dict[str, Any]:
        """The options that decide the shards' bytes (all but ``output`` and ``device``; for a
        world, only those a world uses): resume requires equality."""
        config = dataclasses.asdict(self)
        if self.world is not None:
            return {key: config[key] for key in _WORLD_OPTIONS}
        del config["output"], config["device"], config["world"]  # a model's harvest records no world
        return config

    def torch_device(self) -> torch.device:
        """The device the model runs on; ``auto`` is CUDA when one is present."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError as err:
            raise ConfigError(f"device={self.device!r} is not a device ({err})") from err


def site_folder(output: str | Path, site: str) -> Path:
    """The folder of one site's shards: the site name with path-unsafe characters replaced."""
    return Path(output) / safe_name(site)


def safe_name(name: str) -> str:
    """``name`` with every character but letters, digits, ``_``, ``.`` and ``-`` replaced by ``_``."""
    return re.sub(r"[^\w.\-]", "_", name)


@dataclass
class _Bucket:
    rows: dict[str, torch.Tensor]  # site -> [n, d] in the storage dtype
    token_ids: torch.Tensor
    positions: torch.Tensor
    context_ids: torch.Tensor  # index of each row's context in the context stream
    contexts_end: int  # contexts consumed once this bucket is written


def harvest(config: HarvestConfig, on_shard: Callable[[Path], None] | None = None) -> dict[str, Path]:
    """Run the harvest (resuming a killed one in the same ``output``); return ``{site: folder}``.

    ``on_shard`` is called with each shard's path after the shard and the manifest that
    lists it are written (tests raise from it to simulate a kill).
    """
    if config.world is not None:  # no language model: sample the world
        return harvest_world(config, on_shard)
    config.validate()
    lm, tokenizer = shared_language_model(config.model, config.revision, config.model_dtype)
    lm.to(config.torch_device())
    check_context_size(lm.config, config.context_size, config.model)
    sites = list(dict.fromkeys(config.sites))
    manifests = {site: _start_manifest(config, site, site_dim(lm, site)) for site in sites}
    folders = {site: site_folder(config.output, site) for site in sites}
    done_buckets = min(len(m["bucket_ends"]) for m in manifests.values())
    if all(m.get("complete") for m in manifests.values()):
        print(f"harvest in {config.output} is already complete")
        return folders
    for site, manifest in manifests.items():  # forget shards of a bucket cut short by a kill
        _rewind(manifest, done_buckets)
        folders[site].mkdir(parents=True, exist_ok=True)
    first = next(iter(manifests.values()))
    texts = iter_texts(config.text, split=config.text_split, column=config.text_column)
    contexts = islice(iter_contexts(texts, tokenizer, config.context_size), first["contexts"], None)
    total = config.max_tokens
    with ActivationExtractor(lm, sites) as extract, tqdm(
        total=total, initial=first["tokens"], unit="tok", unit_scale=True, desc="harvest", smoothing=0.1
    ) as bar:
        buckets = _buckets(config, contexts, extract, tokenizer, first["contexts"], first["tokens"], bar.update)
        # Written in the forward loop's thread: a writer thread overlapping the next
        # bucket's forward passes measured 13% slower on 2 cores (its tensor ops contend
        # with the forward's intra-op threads), and writing is ~5% of the time anyway.
        for index, bucket in enumerate(buckets, start=done_buckets):
            _write_bucket(config, index, bucket, manifests, folders, on_shard)
    for site, manifest in manifests.items():
        manifest["complete"] = True
        write_manifest(folders[site], manifest)
    return folders


def _start_manifest(config: HarvestConfig, site: str, d: int) -> dict[str, Any]:
    """The manifest to continue from: the one on disk if it is this harvest's, else a new one."""
    folder = site_folder(config.output, site)
    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)
        if manifest.get("harvest") != config.identity():
            raise ConfigError(
                f"{folder / MANIFEST}: holds a harvest with other options; resume needs the same "
                f"options (only output may differ), or choose another output"
            )
        version = manifest.get("format_version", 1)
        if version != FORMAT_VERSION and not manifest.get("complete"):
            # Resuming would mix shard layouts in one folder.
            raise ConfigError(
                f"{folder / MANIFEST}: an unfinished harvest in shard format version {version}; this "
                f"version writes {FORMAT_VERSION}: choose another output (or delete {folder})"
            )
        return manifest
    return {
        "format_version": FORMAT_VERSION, "model": config.model, "revision": config.revision,
        "site": site, "layer": parse_site(site).layer, "d": d, "dtype": config.dtype,
        "context_size": config.context_size, "tokens": 0, "contexts": 0, "bucket_ends": [],
        "complete": False, "shards": [], "harvest": config.identity(),
    }


def _rewind(manifest: dict[str, Any], buckets: int) -> None:
    """Keep only the first ``buckets`` complete buckets of a manifest."""
    ends = manifest["bucket_ends"][:buckets]
    manifest["bucket_ends"] = ends
    manifest["shards"] = [s for s in manifest["shards"] if s["bucket"] < buckets]
    manifest["contexts"] = ends[-1]["contexts"] if ends else 0
    manifest["tokens"] = ends[-1]["tokens"] if ends else 0


def _buckets(
    config: HarvestConfig, contexts: Iterator[torch.Tensor], extract: ActivationExtractor,
    tokenizer: Any, contexts_done: int, tokens_done: int, progress: Callable[[int], Any],
) -> Iterator[_Bucket]:
    """Group forward passes into buckets; a bucket closes only at the end of a forward group.

    ``progress`` is told the number of new content tokens after every forward pass.
    """
    storage = STORAGE_DTYPES[config.dtype]
    limit = config.max_tokens if config.max_tokens is not None else math.inf
    pending: list[tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]] = []
    count = 0
    device = next(extract.model.parameters()).device
    while tokens_done + count < limit and (group := list(islice(contexts, config.model_batch_size))):
        ids = torch.stack(group).to(device)
        acts = extract(ids, torch.ones_like(ids))
        mask = content_mask(ids, tokenizer)
        positions = torch.arange(ids.shape[1], device=device).expand_as(ids)[mask]
        context_ids = torch.arange(contexts_done, contexts_done + len(group), device=device)[:, None]
        context_ids = context_ids.expand_as(ids)[mask]
        rows = {site: _content_rows(config, site, a, mask, storage) for site, a in acts.items()}
        pending.append((rows, ids[mask].cpu(), positions.cpu(), context_ids.cpu()))
        new = int(mask.sum())
        progress(int(min(new, limit - tokens_done - count)))
        count += new
        contexts_done += len(group)
        if count >= config.shuffle_bucket_tokens or tokens_done + count >= limit:
            keep = int(min(count, limit - tokens_done))
            yield _close(pending, keep, contexts_done)
            tokens_done += keep
            pending, count = [], 0
    if pending:  # the text ran out before max_tokens
        yield _close(pending, count, contexts_done)


def _content_rows(config: HarvestConfig, site: str, acts: torch.Tensor, mask: torch.Tensor,
                  storage: torch.dtype) -> torch.Tensor:
    rows = acts[mask]
    if not all_finite(rows):
        raise ConfigError(
            f"model {config.model!r} produced NaN or Inf activations at site {site!r} "
            f"(model_dtype={config.model_dtype!r}; try float32)"
        )
    return rows.to("cpu", storage)


def _close(pending: list, keep: int, contexts_end: int) -> _Bucket:
    sites = pending[0][0].keys()
    rows = {site: torch.cat([p[0][site] for p in pending])[:keep] for site in sites}
    token_ids = torch.cat([p[1] for p in pending])[:keep]
    positions = torch.cat([p[2] for p in pending])[:keep]
    context_ids = torch.cat([p[3] for p in pending])[:keep]
    return _Bucket(rows, token_ids, positions, context_ids, contexts_end)


def _write_bucket(
    config: HarvestConfig, index: int, bucket: _Bucket, manifests: dict[str, dict[str, Any]],
    folders: dict[str, Path], on_shard: Callable[[Path], None] | None,
) -> None:
    """Shuffle a bucket and write it as shards, one site after another, manifest after each shard."""
    n = len(bucket.token_ids)
    order = torch.randperm(n, generator=generator(config.seed, "bucket", index))
    parts = order.tensor_split(math.ceil(n / config.shard_tokens))
    for site, manifest in manifests.items():
        for k, part in enumerate(parts):
            # index_select: several times faster than advanced indexing for a row gather.
            acts = bucket.rows[site].index_select(0, part)
            name = shard_name(len(manifest["shards"]))
            data = encode_shard(acts, bucket.token_ids.index_select(0, part), bucket.positions.index_select(0, part),
                                bucket.context_ids.index_select(0, part))
            atomic_write(folders[site] / name, data)
            manifest["shards"].append(shard_entry(name, data, acts, index))
            if k == len(parts) - 1:
                tokens = (manifest["bucket_ends"][-1]["tokens"] if manifest["bucket_ends"] else 0) + n
                manifest["bucket_ends"].append({"contexts": bucket.contexts_end, "tokens": tokens})
                manifest["contexts"] = bucket.contexts_end
            write_manifest(folders[site], manifest)
            if on_shard is not None:
                on_shard(folders[site] / name)


def build_parser() -> ArgumentParser:
    """The jsonargparse parser of ``python -m gs_lightning harvest``; ``--help`` documents every option."""
    parser = ArgumentParser(
        prog="python -m gs_lightning harvest",
        description="Harvest language-model activations into shuffled safetensors shards, one folder per site "
                    "(or sample a synthetic world's rows with their true feature activations: --world).",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file of the options below.")
    parser.add_class_arguments(HarvestConfig)
    return parser


def harvest_main(args: list[str]) -> dict[str, Path]:
    """Parse ``args`` (what follows ``harvest``) and run the harvest."""
    parser = build_parser()
    cfg = parser.parse_args(args)
    names = [f.name for f in dataclasses.fields(HarvestConfig)]
    config = HarvestConfig(**{name: cfg[name] for name in names})
    folders = harvest(config)
    for site, folder in folders.items():
        manifest = read_manifest(folder)
        unit = "rows" if "world" in manifest else "tokens"
        print(f"{site}: {manifest['tokens']} {unit} in {len(manifest['shards'])} shards -> {folder}")
    return folders
