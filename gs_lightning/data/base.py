"""The interface every activation source offers the training module."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def as_is(batch: Any) -> Any:
    """A DataLoader ``collate_fn`` that keeps a batch unchanged (the default turns the
    ``(input, target)`` tuples of paired sites into lists)."""
    return batch


def data_parallel_rank(trainer: pl.Trainer | None) -> tuple[int, int]:
    """``(rank, ranks)`` among the replicas that read different batches.

    Under DDP that is the global rank and world size. Under a strategy that shards the
    model (Lightning's ``ModelParallelStrategy``, used for ``model.latent_parallel``) the
    ranks that hold parts of one replica must read the same batches, so it is the position
    on the data-parallel dimension: the strategy's own ``distributed_sampler_kwargs``.
    """
    if trainer is None:
        return 0, 1
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    if kwargs:
        return int(kwargs["rank"]), int(kwargs["num_replicas"])
    return trainer.global_rank, trainer.world_size


class ActivationDataModule(pl.LightningDataModule):
    """A LightningDataModule whose batches are raw ``[batch_size, d_in]`` activations.

    Batches are *unscaled*: the training module multiplies them by ``input_scale``, so
    metrics can be reported on either scale and the saved SAE takes raw activations.
    """

    _scales: list[float] | None = None
    """One scale per site streamed, the input's first: estimated by ``setup``."""

    @property
    def d_in(self) -> int:
        """Width of one activation vector."""
        raise NotImplementedError

    @property
    def paired(self) -> bool:
        """Whether batches are ``(input, target)`` pairs of two sites (for transcoders)."""
        return False

    @property
    def stacked_sites(self) -> int | None:
        """Number of aligned input sites stacked in each batch (``[batch, n, d_in]``), or
        None when a batch holds one site (``[batch, d_in]``)."""
        return None

    @property
    def input_scale(self) -> float:
        """Scalar applied to every activation before the SAE sees it (valid after ``setup``)."""
        return self._known_scales("input_scale")[0]

    @property
    def target_scale(self) -> float:
        """The same for the target site of paired batches (``input_scale`` without one)."""
        return self._known_scales("target_scale")[-1]

    def _known_scales(self, name: str) -> list[float]:
        if self._scales is None:
            raise RuntimeError(f"{name} is estimated in setup(); call setup() first")
        return self._scales

    @property
    def metadata(self) -> dict[str, Any]:
        """Where the activations come from (model, site, context size, text, scaling)."""
        return {}
