"""Ground truth beside activations: the true feature directions of a synthetic world and,
per row, the true feature activations that made it.

A world (SynthSAEBench's ``sae_lens.synthetic.SyntheticModel``) makes each row as
``x = a @ features + bias`` from sparse feature activations ``a``. A harvest from a world
stores ``a`` beside ``x`` so that an SAE can be scored against the truth (MCC, F1, ...:
:mod:`gs_lightning.evaluation.ground_truth`). These two types are the interface between
the data side and the scoring side.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class GroundTruth(NamedTuple):
    """The world's true dictionary, in the raw units of the stored activations."""

    features: Tensor
    """``[n_features, d]``: the true feature directions (rows)."""
    bias: Tensor
    """``[d]``: the world's bias, added to every row."""


class GroundTruthBatch(NamedTuple):
    """A validation batch that carries the true feature activations of its rows."""

    acts: Tensor
    """``[batch, d]``: the raw activations."""
    true_acts: Tensor
    """``[batch, n_features]`` float32, dense: the true feature activations of each row (0 where off)."""
