"""A token-level shuffle buffer for activations that arrive sequence by sequence.

Activations of one context are strongly correlated, so a live stream must be mixed
before an SAE sees it. The buffer uses the usual refill scheme: fill to capacity,
emit a random half in batches, refill the emitted slots, repeat. Every batch is then
drawn from at least half a buffer of tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gs_lightning.errors import ConfigError


class ShuffleBuffer:
    """Fixed-capacity shuffle buffer of ``[capacity, d]`` rows, seeded and deterministic.

    Storage is allocated once; rows are written into free slots and emitted batches
    are gathered with ``index_select`` (one ``[batch_size, d]`` allocation per batch)::

        buf = ShuffleBuffer(capacity=262144, d=2304, batch_size=4096, seed=0)
        for chunk in chunks:
            buf.add(chunk)
            yield from buf.batches()
        yield from buf.drain()
    """

    def __init__(
        self,
        capacity: int,
        d: int,
        batch_size: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1 or capacity < 2 * batch_size:
            raise ConfigError(
                f"buffer capacity {capacity} must hold two batches of batch_size={batch_size}"
            )
        self.capacity = capacity
        self.batch_size = batch_size
        # Emit a whole number of batches per refill, about half the buffer.
        self.emit_rows = (capacity // 2) // batch_size * batch_size
        self.storage = torch.empty(capacity, d, dtype=dtype, device=device)
        self.generator = torch.Generator().manual_seed(seed)
        self._free = torch.arange(capacity)  # slot indices not holding a row, in fill order
        self._n_free = capacity
        self._pending: list[torch.Tensor] = []  # rows added while the buffer was full

    def __len__(self) -> int:
        """Rows held in storage (not counting rows still pending)."""
        return self.capacity - self._n_free

    def add(self, x: torch.Tensor) -> None:
        """Store ``[N, d]`` rows. Rows beyond the free space wait (as views) for :meth:`batches`."""
        if x.ndim != 2 or x.shape[1] != self.storage.shape[1]:
            raise ValueError(f"expected [N, {self.storage.shape[1]}] rows, got {list(x.shape)}")
        self._pending.append(x)
        self._absorb_pending()

    def _absorb_pending(self) -> None:
        while self._pending and self._n_free:
            x = self._pending[0]
            k = min(len(x), self._n_free)
            start = self.capacity - self._n_free
            slots = self._free[start : start + k].to(self.storage.device)
            self.storage.index_copy_(0, slots, x[:k].to(self.storage))
            self._n_free -= k
            if k == len(x):
                self._pending.pop(0)
            else:
                self._pending[0] = x[k:]

    def batches(self) -> Iterator[torch.Tensor]:
        """Yield ``[batch_size, d]`` batches for as long as the buffer can be kept full.

        Consume it before the next :meth:`add`: emitted slots are refilled afterwards.
        """
        while self._n_free == 0:
            perm = torch.randperm(self.capacity, generator=self.generator)
            emit = perm[: self.emit_rows]
            # Mark the emitted slots free before yielding, so a consumer that stops
            # early loses rows instead of seeing them twice.
            self._free = torch.cat([perm[self.emit_rows :], emit])
            self._n_free = self.emit_rows
            yield from self._gather(emit, self.emit_rows)
            self._absorb_pending()

    def drain(self, drop_last: bool = True) -> Iterator[torch.Tensor]:
        """At the end of a finite stream: shuffle everything left and emit it.

        The last, partial batch is dropped unless ``drop_last`` is False.
        """
        yield from self.batches()  # afterwards nothing is pending: the buffer is not full
        held = self._free[: self.capacity - self._n_free]
        order = held[torch.randperm(len(held), generator=self.generator)]
        stop = len(order) // self.batch_size * self.batch_size if drop_last else len(order)
        self._free = torch.arange(self.capacity)
        self._n_free = self.capacity
        yield from self._gather(order, stop)

    def _gather(self, slots: torch.Tensor, stop: int) -> Iterator[torch.Tensor]:
        for i in range(0, stop, self.batch_size):
            idx = slots[i : min(i + self.batch_size, stop)].to(self.storage.device)
            yield self.storage.index_select(0, idx)
