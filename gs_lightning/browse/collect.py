"""Collect what a feature browser shows about every latent of an SAE, from harvested shards.

:func:`collect` makes two streaming passes over one site folder (rows in harvest order):

1. firing count, sum and max, the fixed-bin histogram, and the top-k activations with
   their token keys (:mod:`gs_lightning.browse.streaming`);
2. samples from activation intervals ``(i * max / n, (i + 1) * max / n]``. The intervals
   need each latent's final max, which only the end of pass 1 knows; a one-pass scheme
   would have to guess the range and either bias or waste samples. Pass 2 re-encodes the
   rows (cheaper than keeping them) and is skipped when ``intervals=0``.

Memory is O(batch_size * d_sae) for one encoded batch plus O(d_sae * (k + bins +
intervals * samples)) of state: independent of the number of tokens.

The result, :class:`LatentData`, is plain tensors plus :meth:`LatentData.latent`, one
latent's JSON-ready dict: what the static site, the Neuronpedia export and the callback
consume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gs_lightning.browse.source import HarvestSource, split_keys
from gs_lightning.browse.streaming import (
    HIST_EDGES,
    FiringStats,
    IntervalSampler,
    TopKMerge,
)
from gs_lightning.errors import ConfigError
from gs_lightning.saes import SAE

BATCH_ELEMENTS = 1 << 23
"""Latent activations per encoded batch (32 MiB in float32): rows per batch is this over d_sae."""


@dataclass
class LatentData:
    """Per-latent statistics and examples of one SAE on one harvested site.

    Tensors are indexed by latent first. Examples are token keys
    (``context_id * context_size + position``; -1 marks an unused slot; see
    :func:`gs_lightning.browse.source.split_keys`).
    """

    site: str
    model: str
    source: str
    """The site folder the rows came from."""
    context_size: int
    tokens: int
    """Rows read."""
    count: Tensor
    """``[d_sae]`` int64: tokens on which the latent fired (``f > 0``)."""
    mean: Tensor
    """``[d_sae]``: mean activation over firing tokens."""
    max: Tensor
    """``[d_sae]``: largest activation."""
    hist_edges: Tensor
    """``[bins + 1]``: the fixed bin edges (:data:`gs_lightning.browse.streaming.HIST_EDGES`)."""
    histogram: Tensor
    """``[d_sae, bins]`` int64: firing activations per bin."""
    top_values: Tensor
    """``[d_sae, k]``, descending."""
    top_keys: Tensor
    """``[d_sae, k]`` int64."""
    interval_values: Tensor
    """``[d_sae, intervals, samples]``: samples of interval ``(i * max / n, (i + 1) * max / n]``."""
    interval_keys: Tensor
    """``[d_sae, intervals, samples]`` int64."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """Decoder-side data added later (``promoted_ids`` ..., ``neighbour_ids`` ...; see
    :mod:`gs_lightning.browse.decoder`)."""

    @property
    def d_sae(self) -> int:
        return len(self.count)

    @property
    def frequency(self) -> Tensor:
        """``[d_sae]``: fraction of tokens on which the latent fired."""
        return self.count.double() / max(self.tokens, 1)

    def examples(self, keys: Tensor) -> list[dict[str, int]]:
        """``[{"context_id", "position"}]`` for the used slots of ``keys``."""
        keys = keys[keys >= 0]
        contexts, positions = split_keys(keys, self.context_size)
        return [{"context_id": int(c), "position": int(p)} for c, p in zip(contexts, positions)]

    def latent(self, i: int) -> dict[str, Any]:
        """Everything about latent ``i`` as plain Python values (JSON-ready)."""
        used = self.top_keys[i] >= 0
        out: dict[str, Any] = {
            "index": i, "count": int(self.count[i]), "frequency": float(self.frequency[i]),
            "mean": float(self.mean[i]), "max": float(self.max[i]),
            "histogram": self.histogram[i].tolist(),
            "top": [{**e, "value": float(v)} for e, v in zip(self.examples(self.top_keys[i]),
                                                              self.top_values[i][used])],
            "intervals": [],
        }
        n = self.interval_values.shape[1]
        for j in range(n):
            keys, values = self.interval_keys[i, j], self.interval_values[i, j]
            out["intervals"].append({
                "low": float(self.max[i]) * j / n, "high": float(self.max[i]) * (j + 1) / n,
                "examples": [{**e, "value": float(v)} for e, v in zip(self.examples(keys), values[keys >= 0])],
            })
        for name, tensor in self.extras.items():
            out[name] = tensor[i].tolist()
        return out


@torch.no_grad()
def collect(sae: SAE, folder: str | Path, k: int = 20, intervals: int = 10, samples: int = 5,
            batch_size: int | None = None, seed: int = 0, verify_checksums: bool = True,
            device: torch.device | str = "cpu") -> LatentData:
    """Stream the shards of ``folder`` through ``sae`` and collect per-latent data.

    ``sae`` takes raw activations (as :func:`gs_lightning.load_sae` returns it: a saved
    SAE has its input scale folded in). ``batch_size`` defaults to ``BATCH_ELEMENTS // d_sae``
    rows. ``seed`` picks the interval samples.
    """
    source = HarvestSource(folder, verify_checksums)
    if source.d != sae.d_in:
        raise ConfigError(f"{folder}: activations have d={source.d}, the SAE reads d_in={sae.d_in}")
    if k < 1 or intervals < 0 or samples < 1:
        raise ConfigError(f"k={k} and samples={samples} must be >= 1, intervals={intervals} >= 0")
    sae = sae.to(device).eval()
    rows = batch_size or max(1, BATCH_ELEMENTS // sae.d_sae)
    stats, top = FiringStats(sae.d_sae, device), TopKMerge(sae.d_sae, k, device)
    for f, keys in _encoded(sae, source, rows, device):
        batch_max = f.amax(0)
        stats.update(f, batch_max, *(f > 0).nonzero(as_tuple=True))
        top.update(f, keys, batch_max)
    sampler = IntervalSampler(stats.max, intervals, samples, seed) if intervals else None
    if sampler is not None and int(stats.count.sum()) > 0:
        for f, keys in _encoded(sae, source, rows, device):
            sampler.update(f, keys, *(f > 0).nonzero(as_tuple=True))
    top_values, top_keys = top.result()
    if sampler is not None:
        interval_values, interval_keys = sampler.result()
    else:
        interval_values = torch.zeros(sae.d_sae, 0, samples)
        interval_keys = torch.zeros(sae.d_sae, 0, samples, dtype=torch.int64)
    manifest = source.manifest
    return LatentData(
        site=manifest["site"], model=manifest["model"], source=str(folder), context_size=source.context_size,
        tokens=stats.tokens, count=stats.count.cpu(), mean=stats.mean().cpu(), max=stats.max.cpu(),
        hist_edges=HIST_EDGES.float(), histogram=stats.histogram.view(sae.d_sae, -1).cpu(),
        top_values=top_values.cpu(), top_keys=top_keys.cpu(),
        interval_values=interval_values.cpu(), interval_keys=interval_keys.cpu(),
    )


def _encoded(sae: SAE, source: HarvestSource, rows: int, device: torch.device | str):
    """``(f, keys)`` per batch of rows, in harvest order."""
    for batch in source.batches(rows):
        x = batch.acts.to(device, torch.float32, non_blocking=True)
        yield sae.encode(x), batch.keys.to(device)
