"""Rebuild the token window around an example from the shards it was harvested into.

A harvest shuffles rows within a bucket, but every row records its context
(``context_ids``) and position, and a context never spans buckets; so the rows of the
wanted contexts are gathered from their buckets' shards, sorted by token key (context,
then position) and encoded again in blocks of whole contexts. Every window is then looked
up at once per block (``searchsorted`` over the sorted keys), with no per-example Python
loop over tensors. Special tokens (BOS, EOS between documents) were never stored: a
window's ``positions`` skip them.
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


ROWS_PER_BLOCK = 4096
"""Rows encoded at once when windows are rebuilt (whole contexts; at least one)."""


def context_rows(source: HarvestSource, context_ids: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """``(keys, token_ids, acts)`` of every stored row of ``context_ids``, sorted by token key
    (so by context, then position); read from the shards of the contexts' buckets only."""
    wanted = torch.tensor(sorted(set(context_ids)), dtype=torch.int64)
    keys, token_ids, acts = [], [], []
    for entry in source.shards_of_contexts(wanted.tolist()):
        rows = source.shard(entry)
        contexts, _ = split_keys(rows.keys, source.context_size)
        hit = torch.isin(contexts, wanted).nonzero().squeeze(1)
        keys.append(rows.keys[hit])
        token_ids.append(rows.token_ids[hit].long())
        acts.append(rows.acts[hit])
    if not keys:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0, source.d)
    all_keys = torch.cat(keys)
    order = all_keys.argsort()
    return all_keys[order], torch.cat(token_ids)[order], torch.cat(acts)[order]


@torch.no_grad()
def rebuild_windows(sae: SAE, folder: str | Path | HarvestSource, examples: list[tuple[int, int, int]],
                    before: int = 16, after: int = 4) -> list[ContextWindow]:
    """Windows of ``before`` positions before and ``after`` after each example
    ``(latent, context_id, position)``; every stored row of the examples' contexts is read
    and encoded once."""
    source = folder if isinstance(folder, HarvestSource) else HarvestSource(folder)
    if not examples:
        return []
    size = source.context_size
    keys, token_ids, acts = context_rows(source, [c for _, c, _ in examples])
    device = next(sae.parameters()).device
    ex = torch.tensor(examples, dtype=torch.int64)
    latent, context, position = ex[:, 0], ex[:, 1], ex[:, 2]
    # Candidate keys of each window, [examples, before + 1 + after]; a candidate is a row
    # when that key was stored (not BOS/EOS) and lies inside the example's context.
    offsets = torch.arange(-before, after + 1)
    wanted = (context * size + position)[:, None] + offsets
    inside = ((position[:, None] + offsets) >= 0) & ((position[:, None] + offsets) < size)
    found = torch.searchsorted(keys, wanted).clamp(max=max(len(keys) - 1, 0))
    valid = inside & (keys[found] == wanted) if len(keys) else torch.zeros_like(inside)
    values = torch.zeros(wanted.shape)
    # Encode in blocks of whole contexts; each example's rows lie in its context's block.
    stored, counts = split_keys(keys, size)[0].unique_consecutive(return_counts=True)
    block_of_context: dict[int, tuple[int, int]] = {}
    start, first, stored_list = 0, 0, stored.tolist()
    for i, end in enumerate(torch.cumsum(counts, 0).tolist()):
        if end - start >= ROWS_PER_BLOCK or i == len(stored_list) - 1:
            block_of_context.update(dict.fromkeys(stored_list[first : i + 1], (start, end)))
            start, first = end, i + 1
    by_block: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(context.tolist()):
        if c in block_of_context:
            by_block.setdefault(block_of_context[c], []).append(i)
    for (a, z), members in by_block.items():
        f = sae.encode(acts[a:z].to(device, torch.float32)).cpu()
        idx = torch.tensor(members)
        rows = (found[idx] - a).clamp(0, z - a - 1)
        values[idx] = torch.where(valid[idx], f[rows, latent[idx, None]], 0.0)
    windows = []
    for i, (lat, ctx, pos) in enumerate(examples):
        keep = valid[i]
        windows.append(ContextWindow(ctx, pos, lat, (pos + offsets)[keep], token_ids[found[i][keep]],
                                     values[i][keep].clone()))
    return windows
