"""``python -m gs_lightning browse``: a static feature browser for one saved SAE.

The steps, each with its own progress line: read the harvest (or harvest the SAE's site
first, when no shards are given), collect per-latent data in two streaming passes
(:func:`gs_lightning.browse.collect`), the decoder's logit effects and nearest latents,
rebuild the context window of every shown example from the shards, then write the site
and, optionally, the Neuronpedia JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from tqdm import tqdm

from gs_lightning import formats
from gs_lightning.browse.collect import LatentData, collect
from gs_lightning.browse.contexts import rebuild_windows
from gs_lightning.browse.decoder import decoder_data, nearest_latents
from gs_lightning.browse.records import (
    example_keys,
    latent_records,
    neuronpedia_feature,
    token_strings,
)
from gs_lightning.browse.site import write_site
from gs_lightning.browse.source import HarvestSource
from gs_lightning.errors import ConfigError
from gs_lightning.formats.io import load_sae, load_sae_config, sae_paths
from gs_lightning.lm.load import shared_language_model
from gs_lightning.lm.sites import site_layer

LATENTS_PER_PASS = 4096
"""Latents whose example windows are rebuilt together: each group re-reads and re-encodes
the contexts its examples come from once, and holds its windows in memory."""


def browse(
    sae: str | list[str],
    shards: str | None = None,
    output: str | None = None,
    tokens: int = 1_000_000,
    text_split: str = "train",
    k: int = 20,
    intervals: int = 10,
    samples: int = 5,
    before: int = 16,
    after: int = 4,
    neighbours: int = 5,
    logits: int = 10,
    neuronpedia: bool = True,
    features_per_batch: int = 128,
    device: str = "cpu",
) -> list[Path]:
    """Build the feature browser of saved SAEs; return the path of each one's ``index.html``.

    Args:
        sae: Saved SAEs: one path, a list ``"[a, b]"`` or a quoted glob ``"runs/*/sae"``; each
            our folder (sae.safetensors + config.json), a SAELens folder or a Gemma Scope
            ``params.npz`` (anything ``gs_lightning.load_sae`` reads).
        shards: The harvested site folder to read (``<harvest>/<site>``, shard format 2).
            Default: harvest the SAE's site from its model and text first, ``tokens`` tokens
            into ``<output>/harvest`` (kept, and reused by a second run).
        output: Folder of the site; default ``<sae>/../browser``. With several SAEs, each
            gets ``<output>/<NN>-<name of the SAE's parent folder>``.
        tokens: Tokens to harvest when ``shards`` is not given.
        text_split: Split of the SAE's text to harvest when ``shards`` is not given.
        k: Top-activating examples kept per latent.
        intervals: Activation intervals (of each latent's max) sampled for examples; 0: none.
        samples: Examples sampled per interval.
        before: Tokens shown before the firing token.
        after: Tokens shown after it.
        neighbours: Nearest latents by decoder cosine shown per latent.
        logits: Promoted and suppressed tokens shown per latent (where the site writes to
            the residual stream).
        neuronpedia: Also write ``neuronpedia/batch-N.json``, the JSON SAEDashboard produces
            for Neuronpedia uploads.
        features_per_batch: Latents per Neuronpedia batch file.
        device: Where the SAE encodes (``cpu``, ``cuda``).
    """
    given = dict(locals())  # first, while the arguments are the only locals
    options = _Options(**{name: value for name, value in given.items() if name not in ("sae", "output")})
    paths = sae_paths(sae, "sae")
    if len(paths) == 1:
        return [_browse_one(Path(paths[0]), output, options)]
    return [_browse_one(Path(p), str(Path(output) / f"{i:02d}-{_parent_name(Path(p))}") if output else None,
                        options) for i, p in enumerate(paths)]


@dataclass(frozen=True)
class _Options:
    """:func:`browse`'s options after ``sae`` and ``output``, as one value for each SAE's build."""

    shards: str | None
    tokens: int
    text_split: str
    k: int
    intervals: int
    samples: int
    before: int
    after: int
    neighbours: int
    logits: int
    neuronpedia: bool
    features_per_batch: int
    device: str


def _parent_name(path: Path) -> str:
    return (path if path.is_dir() else path.parent).parent.name or "sae"


def _browse_one(sae_path: Path, output: str | None, o: _Options) -> Path:
    """:func:`browse` for one SAE."""
    started = time.perf_counter()
    sae = str(sae_path)
    out = Path(output) if output else (sae_path if sae_path.is_dir() else sae_path.parent).parent / "browser"
    model_sae = load_sae(sae)
    meta = _metadata(sae_path)
    folder = Path(o.shards) if o.shards else _harvest(meta, out / "harvest", o.tokens, o.text_split, o.device)
    source = HarvestSource(folder)
    print(f"browse: {sae} over {source.tokens:,} tokens of {folder}")
    data = collect(model_sae, folder, k=o.k, intervals=o.intervals, samples=o.samples, device=o.device)
    model, tokenizer = shared_language_model(source.manifest["model"], source.manifest.get("revision"))
    # A transcoder's decoder writes to its target site: its logit effects are read there.
    data.extras = decoder_data(model_sae.W_dec.detach(), model, meta.get("target_site") or data.site, o.logits,
                               o.neighbours)
    if getattr(model_sae, "is_transcoder", False):  # its input side: latents that read alike
        near = nearest_latents(model_sae.W_enc.detach().T, o.neighbours)
        data.extras.update({f"input_{key}": value for key, value in near.items()})
    strings = token_strings(tokenizer)
    summary = _summary(sae_path, model_sae, data, meta, out)
    dataset = str(source.manifest.get("harvest", {}).get("text", ""))
    # Neuronpedia batches are written as records stream past (never all held), beside the
    # site's folder, which write_site replaces whole; moved in once the site is written.
    batches = _NeuronpediaBatches(out.with_name(out.name + ".neuronpedia.partial"), data, dataset,
                                  o.features_per_batch) if o.neuronpedia else None
    index = write_site(out, summary, _records(model_sae, source, data, strings, o.before, o.after, batches), data.d_sae)
    if batches is not None:
        batches.close(out / "neuronpedia")
    print(f"browse: wrote {index} ({time.perf_counter() - started:.0f} s); open it in a browser (file://)")
    return index


def _records(sae: Any, source: HarvestSource, data: LatentData, strings: list[str], before: int, after: int,
             batches: _NeuronpediaBatches | None):
    """Site records in id order, rebuilding windows ``LATENTS_PER_PASS`` latents at a time."""
    bar = tqdm(total=data.d_sae, desc="browse: examples", unit="latent")
    for start in range(0, data.d_sae, LATENTS_PER_PASS):
        latents = range(start, min(data.d_sae, start + LATENTS_PER_PASS))
        windows = rebuild_windows(sae, source, example_keys(data, latents), before, after)
        for record in latent_records(data, latents, windows, strings):
            if batches is not None:
                batches.add(record)
            bar.update(1)
            yield record
    bar.close()


def _metadata(path: Path) -> dict[str, Any]:
    """Our saved SAE's metadata; empty for the other formats (SAELens, params.npz, ...).

    Asked of the format registry: a Gemma Scope 2 folder has a config.json too, not ours."""
    if formats.format_for(path).name == "native":
        try:
            return dict(load_sae_config(path).get("metadata", {}))
        except (json.JSONDecodeError, AttributeError):
            return {}
    return {}


def _harvest(meta: dict[str, Any], folder: Path, tokens: int, split: str, device: str) -> Path:
    from gs_lightning.harvest.model import HarvestConfig, harvest

    missing = [key for key in ("model", "site", "text", "context_size") if not meta.get(key)]
    if missing:
        raise ConfigError(f"the SAE's config.json does not say {missing}: pass --shards, a harvested site folder")
    config = HarvestConfig(output=str(folder), model=meta["model"], revision=meta.get("revision"),
                           sites=[meta["site"]], text=meta["text"], text_split=split,
                           text_column=meta.get("text_column", "text"), context_size=meta["context_size"],
                           max_tokens=tokens, device="auto" if device != "cpu" else "cpu")
    return harvest(config)[meta["site"]]


def _summary(path: Path, sae: Any, data: LatentData, meta: dict[str, Any], out: Path) -> dict[str, Any]:
    dead = int((data.count == 0).sum())
    l0 = float(data.count.sum()) / max(1, data.tokens)
    final = meta.get("final_metrics", {}) or {}
    facts = [["SAE", str(path)], ["variant", type(sae).__name__], ["d_in / latents", f"{sae.d_in} / {sae.d_sae:,}"],
             ["model", data.model], ["site", data.site], ["tokens browsed", f"{data.tokens:,} from {data.source}"],
             ["L0 (browsed tokens)", f"{l0:.4g}"], ["never fired (browsed tokens)", f"{dead:,} latents"]]
    for key, label in (("val/l0", "L0 (validation, end of training)"), ("val/fvu", "FVU (validation)"),
                       ("val/delta_loss", "delta LM loss (validation)")):
        if key in final:
            facts.append([label, f"{final[key]:.4g}"])
    run = path.parent if path.is_dir() else None
    link = _relative(run, out) if run is not None else None
    return {"name": f"{type(sae).__name__} {sae.d_sae:,} latents, {data.site}", "facts": facts, "run": link}


def _relative(target: Path, start: Path) -> str:
    return os.path.relpath(target.resolve(), start.resolve())


class _NeuronpediaBatches:
    """Neuronpedia's upload JSON, ``batch-N.json`` of ``per_batch`` features, written as they come."""

    def __init__(self, folder: Path, data: LatentData, dataset: str, per_batch: int) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder, self.data, self.dataset, self.per_batch = folder, data, dataset, per_batch
        self.pending: list[dict[str, Any]] = []
        self.written = 0

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(neuronpedia_feature(record, self.data, self.dataset))
        if len(self.pending) == self.per_batch:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        batch = {"model_id": self.data.model.split("/")[-1], "layer": site_layer(self.data.site) or 0,
                 "sae_set": self.data.site, "features": self.pending}
        (self.folder / f"batch-{self.written // self.per_batch}.json").write_text(json.dumps(batch, allow_nan=False))
        self.written += len(self.pending)
        self.pending = []

    def close(self, target: Path) -> None:
        """Write the last batch and move the folder to ``target``."""
        self._flush()
        shutil.rmtree(target, ignore_errors=True)
        self.folder.rename(target)
        print(f"browse: wrote {self.written:,} features to {target} (Neuronpedia's upload JSON)")


def browse_main(args: list[str]) -> list[Path]:
    """Entry point of ``python -m gs_lightning browse``."""
    with torch.no_grad():  # not set_grad_enabled(False): an in-process caller keeps its autograd
        return CLI(browse, args=args, as_positional=False, prog="python -m gs_lightning browse")
