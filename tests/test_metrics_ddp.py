"""Evaluation metrics are pooled across ranks: two gloo processes on CPU, uneven shares."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MeanMetric

from gs_lightning.evaluation.metrics import FiringStatistics, PooledFVU

D, D_SAE = 6, 10


def _data() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches of (x, x_hat, f) of different sizes and means: per-rank figures differ from pooled ones."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for i, n in enumerate((7, 3, 12, 5)):
        x = torch.randn(n, D, generator=g) * (i + 1) + 3 * i
        x_hat = x + (0.3 + 2 * i) * torch.randn(n, D, generator=g)
        f = torch.relu(torch.randn(n, D_SAE, generator=g) - 0.5 - 0.3 * i)
        batches.append((x, x_hat, f))
    return batches


SHARES = {0: [0, 1, 2], 1: [3]}  # rank 0 sees three batches, rank 1 one


def _metrics() -> tuple[PooledFVU, FiringStatistics, MeanMetric]:
    return PooledFVU(D), FiringStatistics(D_SAE), MeanMetric()


def _figures(fvu: PooledFVU, firing: FiringStatistics, l0: MeanMetric) -> dict[str, torch.Tensor]:
    stats = firing.compute()
    return {"fvu": fvu.compute(), "l0": stats["l0"], "dead_frac": stats["dead_frac"],
            "density": stats["density"], "mean_l0": l0.compute()}


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metrics = _metrics()
        batches = _data()
        for i in SHARES[rank]:
            x, x_hat, f = batches[i]
            metrics[0].update(x, x_hat)
            metrics[1].update(f)
            metrics[2].update((f != 0).sum(-1).float())
        torch.save(_figures(*metrics), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_metrics_pool_over_ranks(tmp_path) -> None:
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    pooled = _metrics()
    for x, x_hat, f in _data():
        pooled[0].update(x, x_hat)
        pooled[1].update(f)
        pooled[2].update((f != 0).sum(-1).float())
    expected = _figures(*pooled)
    # Hand-computed pooled FVU over all 27 tokens (variance about the global mean).
    x = torch.cat([b[0] for b in _data()]).double()
    x_hat = torch.cat([b[1] for b in _data()]).double()
    hand = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    torch.testing.assert_close(expected["fvu"].double(), hand, rtol=1e-6, atol=0)
    alone = _metrics()  # what rank 0 would report without the all-reduce
    for i in SHARES[0]:
        alone[0].update(*_data()[i][:2])
        alone[1].update(_data()[i][2])
        alone[2].update((_data()[i][2] != 0).sum(-1).float())
    local = _figures(*alone)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-9, msg=f"rank {rank} {key}")
    assert abs(float(local["fvu"]) / float(expected["fvu"]) - 1) > 0.05  # the reduction mattered
    assert abs(float(local["l0"]) - float(expected["l0"])) > 1e-3
