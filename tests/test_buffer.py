"""The shuffle buffer emits every row once, in a seeded order, in full batches."""

from __future__ import annotations

import pytest
import torch

from gs_lightning.data.buffer import ShuffleBuffer
from gs_lightning.errors import ConfigError


def run(n_rows: int, chunk: int, *, seed: int, capacity: int = 96, batch: int = 16) -> list:
    """Feed rows whose first column is their id; return every emitted batch."""
    buf = ShuffleBuffer(capacity, d=3, batch_size=batch, seed=seed)
    out = []
    for start in range(0, n_rows, chunk):
        ids = torch.arange(start, min(start + chunk, n_rows), dtype=torch.float32)
        buf.add(torch.stack([ids, -ids, ids * 2], dim=1))
        out += list(buf.batches())
    return out + list(buf.drain(drop_last=False))


@pytest.mark.parametrize("chunk", [1, 7, 40, 500])
def test_every_row_once(chunk):
    batches = run(1000, chunk, seed=0)
    rows = torch.cat(batches)
    ids = rows[:, 0].long()
    assert sorted(ids.tolist()) == list(range(1000))
    torch.testing.assert_close(rows[:, 1], -rows[:, 0])  # rows stay whole
    assert all(len(b) == 16 for b in batches[:-1]) and len(batches[-1]) == 1000 % 16


def test_batches_exactly_batch_size_while_streaming():
    buf = ShuffleBuffer(100, d=2, batch_size=16, seed=0)
    assert buf.emit_rows == 48  # a whole number of batches, about half the buffer
    sizes = []
    for _ in range(50):
        buf.add(torch.randn(13, 2))
        sizes += [len(b) for b in buf.batches()]
    assert sizes and set(sizes) == {16}
    held = len(buf)
    assert [len(b) for b in buf.drain()] == [16] * (held // 16)


def test_first_batch_waits_for_a_full_buffer():
    buf = ShuffleBuffer(64, d=1, batch_size=8, seed=0)
    buf.add(torch.zeros(63, 1))
    assert list(buf.batches()) == []
    buf.add(torch.zeros(1, 1))
    assert len(list(buf.batches())) == 4  # half the buffer


def test_same_seed_same_order_different_seed_different_order():
    a = torch.cat(run(500, 23, seed=3))
    b = torch.cat(run(500, 23, seed=3))
    c = torch.cat(run(500, 23, seed=4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rows_are_mixed_across_chunks():
    # The first batch is drawn from a whole buffer, not from the latest chunk.
    first = run(1000, 8, seed=0)[0][:, 0]
    assert first.max() - first.min() > 48


def test_too_small_capacity_is_refused():
    with pytest.raises(ConfigError, match="batch_size=16"):
        ShuffleBuffer(31, d=2, batch_size=16)


def test_wrong_width_is_refused():
    buf = ShuffleBuffer(32, d=2, batch_size=8)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        buf.add(torch.zeros(4, 3))
