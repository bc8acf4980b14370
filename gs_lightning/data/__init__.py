"""Activation sources: raw ``[batch_size, d_in]`` float batches (or ``(input, target)`` pairs),
or, from :class:`AlignedShardsDataModule`, several aligned sites stacked as ``[batch_size, n, d]``."""

from gs_lightning.data.aligned import AlignedShardsDataModule
from gs_lightning.data.base import ActivationDataModule
from gs_lightning.data.live import LiveActivationDataModule
from gs_lightning.data.shards import ShardedActivationDataModule
from gs_lightning.data.memory import SyntheticActivationDataModule, TensorActivationDataModule

__all__ = [
    "AlignedShardsDataModule",
    "ActivationDataModule",
    "LiveActivationDataModule",
    "ShardedActivationDataModule",
    "SyntheticActivationDataModule",
    "TensorActivationDataModule",
]
