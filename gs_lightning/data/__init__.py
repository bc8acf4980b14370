"""Activation sources: all yield raw ``[batch_size, d_in]`` float batches."""

from gs_lightning.data.base import ActivationDataModule
from gs_lightning.data.live import LiveActivationDataModule
from gs_lightning.data.shards import ShardedActivationDataModule
from gs_lightning.data.memory import SyntheticActivationDataModule, TensorActivationDataModule

__all__ = [
    "ActivationDataModule",
    "LiveActivationDataModule",
    "ShardedActivationDataModule",
    "SyntheticActivationDataModule",
    "TensorActivationDataModule",
]
