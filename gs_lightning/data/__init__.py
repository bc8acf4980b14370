"""Activation sources: all yield raw ``[batch_size, d_in]`` float batches."""

from gs_lightning.data.base import ActivationDataModule

__all__ = ["ActivationDataModule"]
