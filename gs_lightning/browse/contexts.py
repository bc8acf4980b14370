"""Rebuild the token window around an example from the shards it was harvested into.

A harvest shuffles rows within a bucket, but every row records its context
(``context_ids``) and position, and a context never spans buckets; so the rows of a
context are gathered from its bucket's shards, ordered by position and encoded again.
Special tokens (BOS, EOS between documents) were never stored: a window's ``positions``
skip them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gs_lightning.browse.source import HarvestSource, split_keys
from gs_lightning.saes import SAE


@dataclass(frozen=True)
class ContextWindow:
    """The stored tokens of one context around ``position``, with one latent's activations."""

    context_id: int
    position: int
    """Position of the example's token in its context."""
    latent: int
    positions: Tensor
    """``[n]`` int64, ascending: positions of the stored (content) tokens in the window."""
    token_ids: Tensor
    """``[n]`` int64."""
    activations: Tensor
    """``[n]``: the latent's activation on each token."""


def context_rows(source: HarvestSource, context_ids: list[int]) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """``{context_id: (positions, token_ids, acts)}`` in position order, read from the
    shards of the contexts' buckets only (each shard once)."""
    wanted = torch.tensor(sorted(set(context_ids)), dtype=torch.int64)
    found: dict[int, list[tuple[Tensor, Tensor, Tensor]]] = {int(c): [] for c in wanted}
    for entry in source.shards_of_contexts(wanted.tolist()):
        rows = source.shard(entry)
        contexts, positions = split_keys(rows.keys, source.context_size)
        hit = torch.isin(contexts, wanted).nonzero().squeeze(1)
        for c in contexts[hit].unique().tolist():
            pick = hit[contexts[hit] == c]
            found[c].append((positions[pick], rows.token_ids[pick].long(), rows.acts[pick]))
    out = {}
    for c, parts in found.items():
        positions = torch.cat([p for p, _, _ in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        order = positions.argsort()
        token_ids = torch.cat([t for _, t, _ in parts]) if parts else torch.zeros(0, dtype=torch.int64)
        acts = torch.cat([a for _, _, a in parts]) if parts else torch.zeros(0, source.d)
        out[c] = (positions[order], token_ids[order], acts[order])
    return out


@torch.no_grad()
def rebuild_windows(sae: SAE, folder: str | Path | HarvestSource, examples: list[tuple[int, int, int]],
                    before: int = 16, after: int = 4) -> list[ContextWindow]:
    """Windows of ``before`` positions before and ``after`` after each example
    ``(latent, context_id, position)``; every context is read and encoded once."""
    source = folder if isinstance(folder, HarvestSource) else HarvestSource(folder)
    rows = context_rows(source, [c for _, c, _ in examples])
    device = next(sae.parameters()).device
    by_context: dict[int, list[int]] = {}
    for i, (_, context_id, _) in enumerate(examples):
        by_context.setdefault(context_id, []).append(i)
    windows: list[ContextWindow | None] = [None] * len(examples)
    for context_id, members in by_context.items():
        positions, token_ids, acts = rows.pop(context_id)
        # One context's [tokens, d_sae] at a time: only the needed columns are kept.
        f = sae.encode(acts.to(device, torch.float32)).cpu()
        for i in members:
            latent, _, position = examples[i]
            keep = (positions >= position - before) & (positions <= position + after)
            windows[i] = ContextWindow(context_id, position, latent, positions[keep], token_ids[keep],
                                       f[keep, latent].clone())
    return windows  # type: ignore[return-value]
