"""Per-latent accumulators that see a stream of activation batches in bounded memory.

Each takes ``f [B, d_sae]`` (latent activations; a latent *fires* where ``f > 0``) and the
batch's int64 token keys, and holds state whose size does not depend on the number of
tokens: :class:`FiringStats` O(d_sae * bins), :class:`TopKMerge` O(d_sae * k),
:class:`IntervalSampler` O(d_sae * intervals * samples).
"""

from __future__ import annotations

import torch
from torch import Tensor

HIST_EDGES = torch.logspace(-4, 4, 81, dtype=torch.float64)
"""Histogram bin edges shared by every latent: 80 log-spaced bins from 1e-4 to 1e4 (10 per
decade). One pass cannot know each latent's range beforehand, so the bins are fixed; a
firing value below 1e-4 counts in the first bin, one above 1e4 in the last."""

_EMPTY = -1  # token key of an unused top-k / sample slot
_LAST_PRIORITY = torch.iinfo(torch.int64).max


class FiringStats:
    """Firing count, sum, max and a histogram over the fixed :data:`HIST_EDGES`, per latent."""

    def __init__(self, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self.bins = len(HIST_EDGES) - 1
        self.histogram = torch.zeros(d_sae * self.bins, dtype=torch.int64, device=device)
        self._inner = HIST_EDGES[1:-1].float().to(device)
        self.tokens = 0

    def update(self, f: Tensor, batch_max: Tensor, rows: Tensor, latents: Tensor) -> None:
        """``batch_max``: ``f.amax(0)``; ``rows, latents``: where ``f > 0`` (``(f > 0).nonzero(as_tuple=True)``)."""
        self.tokens += f.shape[0]
        self.count += torch.bincount(latents, minlength=len(self.count))
        # A float32 sum per batch (8x faster than a float64 one here), accumulated in float64.
        self.sum += f.sum(0)
        torch.maximum(self.max, batch_max.clamp(min=0), out=self.max)
        bins = torch.bucketize(f[rows, latents], self._inner, right=True)
        self.histogram += torch.bincount(latents * self.bins + bins, minlength=len(self.histogram))

    def mean(self) -> Tensor:
        """Mean activation over firing tokens (0 for a latent that never fired)."""
        return (self.sum / self.count.clamp(min=1)).float()


class TopKMerge:
    """The ``k`` largest activations of every latent and their token keys.

    Each batch is merged by one ``topk`` over the running top-k concatenated with the
    batch's values, for the latents whose batch max beats their current k-th value only.
    """

    def __init__(self, d_sae: int, k: int, device: torch.device | str = "cpu") -> None:
        self.k = k
        self.values = torch.zeros(d_sae, k, device=device)  # sorted descending; 0 = empty
        self.keys = torch.full((d_sae, k), _EMPTY, dtype=torch.int64, device=device)

    def update(self, f: Tensor, keys: Tensor, batch_max: Tensor) -> None:
        active = (batch_max > self.values[:, -1]).nonzero().squeeze(1)
        if len(active) == 0:
            return
        candidates = torch.cat([self.values[active], f.index_select(1, active).T], dim=1)
        values, idx = candidates.topk(self.k, dim=1)
        from_batch = idx >= self.k
        old = self.keys[active].gather(1, idx.clamp(max=self.k - 1))
        new = keys[(idx - self.k).clamp(min=0)]
        self.values[active] = values
        self.keys[active] = torch.where(from_batch, new, old)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(values, keys)``, each ``[d_sae, k]``, descending; unused slots: value 0, key -1."""
        keys = self.keys.masked_fill(self.values <= 0, _EMPTY)
        return self.values.clone(), keys


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (values stay below 2^32, products below 2^63: no int64 overflow)."""
    mask = 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    x = ((x >> 16) ^ x) * 0x45D9F3B & mask
    return (x >> 16) ^ x


def key_hash(keys: Tensor, seed: int = 0) -> Tensor:
    """A 32-bit hash of each token key (computed once per row of a batch)."""
    h = _mix32((keys >> 32) & 0xFFFFFFFF ^ (seed & 0xFFFFFFFF))
    return _mix32(h ^ (keys & 0xFFFFFFFF))


def latent_salt(latents: Tensor, seed: int = 0) -> Tensor:
    """A 32-bit hash of each latent id, XORed into the key hash to give each latent its own order."""
    return _mix32(_mix32(latents.to(torch.int64) ^ (seed & 0xFFFFFFFF)) ^ 0x9E3779B9)


def priority(keys: Tensor, latents: Tensor, seed: int = 0, hashed: Tensor | None = None,
             salt: Tensor | None = None) -> Tensor:
    """A pseudo-random int64 priority per (token key, latent), unique within a latent for
    token keys below 2^32: a 31-bit hash in the high bits, the key's low 32 bits below.

    The hash is ``key_hash(key) ^ latent_salt(latent)``: for one latent, XOR with a constant
    permutes the hash values, so its order is as random as the key hash, and a batch hashes
    each row once instead of each (row, latent) pair. ``hashed`` and ``salt``: the two
    hashes, when the caller has them already (same result).
    """
    hashed = key_hash(keys, seed) if hashed is None else hashed
    salt = latent_salt(latents, seed) if salt is None else salt
    return (((hashed ^ salt) & 0x7FFFFFFF) << 32) | (keys & 0xFFFFFFFF)


class IntervalSampler:
    """Uniform samples of each latent's firing tokens within intervals of its activation range.

    Interval ``i`` of ``n`` holds the values in ``(i * max / n, (i + 1) * max / n]`` (``max``
    from a previous pass). The sample of an interval is the ``s`` tokens of lowest
    :func:`priority`: bottom-s of a random key is a uniform sample without replacement
    (reservoir sampling) and, being a pure function of the tokens, it does not depend on
    the batch order, so a brute-force computation over all rows gives the same sample.
    """

    def __init__(self, max_values: Tensor, intervals: int, samples: int, seed: int = 0) -> None:
        d_sae, self.n, self.s, self.seed = len(max_values), intervals, samples, seed
        self.max = max_values.float()
        shape, device = (d_sae * intervals, samples), max_values.device
        self.priority = torch.full(shape, _LAST_PRIORITY, dtype=torch.int64, device=device)
        self.values = torch.zeros(shape, device=device)
        self.keys = torch.full(shape, _EMPTY, dtype=torch.int64, device=device)
        self._salt = latent_salt(torch.arange(d_sae, device=device), seed)

    def interval(self, values: Tensor, latents: Tensor) -> Tensor:
        """Interval index of firing ``values`` of ``latents``."""
        top = self.max[latents].clamp(min=torch.finfo(torch.float32).tiny)
        return (torch.ceil(values / top * self.n).long() - 1).clamp(0, self.n - 1)

    def update(self, f: Tensor, keys: Tensor, rows: Tensor, latents: Tensor) -> None:
        values = f[rows, latents]
        group = latents * self.n + self.interval(values, latents)
        row_hash = key_hash(keys, self.seed)  # one hash per row, then one XOR per firing entry
        prio = priority(keys[rows], latents, hashed=row_hash[rows], salt=self._salt[latents])
        keep = prio < self.priority[group, -1]  # beats the current s-th lowest of its group
        if not keep.any():
            return
        group, prio, values, keys = group[keep], prio[keep], values[keep], keys[rows[keep]]
        # Sort by (group, priority); keep at most s per group; pad into a [groups, s] block.
        order = prio.argsort()
        order = order[group[order].argsort(stable=True)]
        group, prio, values, keys = group[order], prio[order], values[order], keys[order]
        groups, counts = torch.unique_consecutive(group, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(group), device=group.device) - torch.repeat_interleave(starts, counts)
        first = rank < self.s
        slot = torch.repeat_interleave(torch.arange(len(groups), device=group.device), counts)[first]
        rank = rank[first]
        block_p = torch.full((len(groups), self.s), _LAST_PRIORITY, dtype=torch.int64, device=group.device)
        block_v, block_k = torch.zeros(block_p.shape, device=group.device), torch.full_like(block_p, _EMPTY)
        block_p[slot, rank], block_v[slot, rank], block_k[slot, rank] = prio[first], values[first], keys[first]
        merged_p = torch.cat([self.priority[groups], block_p], dim=1)
        best, idx = merged_p.topk(self.s, dim=1, largest=False)
        self.priority[groups] = best
        self.values[groups] = torch.cat([self.values[groups], block_v], dim=1).gather(1, idx)
        self.keys[groups] = torch.cat([self.keys[groups], block_k], dim=1).gather(1, idx)

    def result(self) -> tuple[Tensor, Tensor]:
        """``(values, keys)``, each ``[d_sae, intervals, samples]`` in priority order; empty: 0, -1."""
        shape = (-1, self.n, self.s)
        return self.values.view(shape).clone(), self.keys.view(shape).clone()
