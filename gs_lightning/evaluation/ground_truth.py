"""Scores of an SAE against the true features of a synthetic world.

A world (:mod:`gs_lightning.data.ground_truth`) makes each row from sparse true feature
activations along known directions, so an SAE trained on its rows can be graded against
the truth, as SynthSAEBench does (Chanin et al. 2026, arXiv 2602.14687). With ``W_dec``
the SAE's decoder rows, ``features`` the true directions and ``|cos|`` the absolute
cosine similarity of every decoder row with every true direction (a zero row has cosine
0 with everything):

* **MCC**: the one-to-one matching of decoder rows to true features that maximises the
  summed ``|cos|`` (the Hungarian algorithm; ``min(d_sae, F)`` pairs), and the mean ``|cos|``
  of the matched pairs (O'Neill et al. 2025, arXiv 2505.20254).
* **uniqueness**: each latent's best match is the true feature of largest ``|cos|``;
  uniqueness is the number of distinct best matches over ``d_sae`` (1: no two latents
  track the same feature).
* **precision, recall, F1, accuracy**: each latent is read as a detector of its best
  match: it fires when ``f != 0``, the feature is on when its activation is ``> 0``. Per
  latent, precision ``TP / (TP + FP)`` and recall ``TP / (TP + FN)`` count as 0 where the
  denominator is 0 (so a latent that never fires scores 0 on both), F1 is their harmonic
  mean (0 where both are 0), accuracy ``(TP + TN) / rows``; each is averaged over latents.
* **explained variance**: ``1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2)``, pooled over
  every row (``1 - FVU`` about the mean, in raw units); where the rows have no variance
  (below 1e-10) it is 1 if the reconstruction is exact (MSE below 1e-10), else 0.
* **shrinkage**: the mean of ``||x_hat|| / ||x||`` over the rows with ``||x|| > 1e-6``
  (1: the reconstruction keeps the input's norm; below 1: it shrinks it).
* **L0** and **true L0**: mean firing latents and mean true features on, per row.
* **dead latents**: latents that never fire on the rows scored (count and fraction).

The decoder-only scores (MCC, uniqueness) are computed once, in :meth:`GroundTruthScorer.compute`;
the rest are streamed: counts and float64 sums that add up across batches and ranks.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric

from gs_lightning.data.ground_truth import GroundTruth
from gs_lightning.saes import SAE

MIN_INPUT_NORM = 1e-6
"""Rows with a smaller norm are left out of the shrinkage (its ratio is undefined there)."""

MIN_VARIANCE = 1e-10
"""Below this total variance (and MSE) the explained variance is taken as degenerate."""


class GroundTruthScores(NamedTuple):
    """An SAE's scores against a world's true features (definitions: module docstring)."""

    mcc: float
    uniqueness: float
    precision: float
    recall: float
    f1: float
    accuracy: float
    explained_variance: float
    shrinkage: float
    l0: float
    true_l0: float
    dead_latents: int
    dead_frac: float
    tokens: int


def abs_cosines(a: Tensor, b: Tensor) -> Tensor:
    """``[n_a, n_b]`` absolute cosine similarity of the rows of ``a`` and ``b``, float32.

    Norms are clamped at 1e-8, so a zero row has cosine 0 with every row.
    """
    a, b = a.detach().float(), b.detach().float().to(a.device)
    a = a / a.norm(dim=1, keepdim=True).clamp(min=1e-8)
    b = b / b.norm(dim=1, keepdim=True).clamp(min=1e-8)
    return (a @ b.T).abs()


def best_matches(W_dec: Tensor, features: Tensor) -> Tensor:
    """``[d_sae]``: the index of each latent's best-matching true feature (largest ``|cos|``,
    the first one on ties)."""
    return abs_cosines(W_dec, features).argmax(dim=1)


def mean_correlation_coefficient(W_dec: Tensor, features: Tensor) -> float:
    """Mean ``|cos|`` over the Hungarian one-to-one match of decoder rows to true features."""
    if W_dec.shape[0] == 0 or features.shape[0] == 0:
        return 0.0
    # The cost matrix is float64 (scipy's solver works in float64 and would copy anything
    # else): d_sae x F x 8 bytes, 0.5 GB for 4,096 latents against 16,384 features, on top
    # of the float32 cosines (0.25 GB) while it is made. Minimising 1 - |cos| rather than
    # asking scipy to maximise |cos| spares its negated copy.
    cost = abs_cosines(W_dec, features).cpu().numpy().astype(np.float64)
    np.subtract(1.0, cost, out=cost)
    rows, cols = linear_sum_assignment(cost)
    return float((1.0 - cost[rows, cols]).mean())


def feature_uniqueness(matches: Tensor, d_sae: int) -> float:
    """Distinct best-matching true features over the number of latents."""
    return len(torch.unique(matches)) / d_sae if d_sae else 0.0


class GroundTruthScorer(Metric):
    """Streams an SAE's rows and scores the SAE against a world's true features.

    States are counts and float64 sums (torchmetrics states with ``sum`` reduction), so
    the scores pool every batch and, under DDP, every rank. The scorer is made for one
    decoder: each latent's best-matching feature is fixed at construction; make a new
    scorer after the decoder changes.

    Args:
        W_dec: ``[d_sae, d]``: the SAE's decoder rows.
        features: ``[F, d]``: the true feature directions.
        kwargs: Passed to torchmetrics' ``Metric`` (e.g. ``sync_on_compute=False``).
    """

    full_state_update = False

    def __init__(self, W_dec: Tensor, features: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if W_dec.dim() != 2 or features.dim() != 2 or W_dec.shape[1] != features.shape[1]:
            raise ValueError(f"W_dec {tuple(W_dec.shape)} and the true features {tuple(features.shape)} must be "
                             "[d_sae, d] and [F, d] with the same d (a single-site SAE of the world's width)")
        self.d_sae, self.n_features = W_dec.shape[0], features.shape[0]
        self.register_buffer("W_dec", W_dec.detach().clone(), persistent=False)
        self.register_buffer("features", features.detach().to(W_dec.device), persistent=False)
        self.register_buffer("matches", best_matches(W_dec, features), persistent=False)
        d = W_dec.shape[1]
        for name, shape in (("true_positives", self.d_sae), ("fire_counts", self.d_sae), ("on_counts", self.d_sae),
                            ("sum_x", d), ("tokens", ()), ("true_on", ()), ("sum_sq", ()), ("sse", ()),
                            ("shrinkage_sum", ()), ("shrinkage_rows", ())):
            # float64 counts are exact up to 2^53 rows; sums of squares keep their digits.
            self.add_state(name, torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.to(W_dec.device)

    def update(self, x: Tensor, x_hat: Tensor, f: Tensor, true_acts: Tensor) -> None:  # type: ignore[override]
        """Add a batch: raw rows ``x [B, d]``, their reconstruction in raw units ``x_hat [B, d]``,
        the SAE's latents ``f [B, d_sae]`` and the true feature activations ``true_acts [B, F]``."""
        batch = x.shape[0]
        expected = {"x": (batch, self.W_dec.shape[1]), "x_hat": (batch, self.W_dec.shape[1]),
                    "f": (batch, self.d_sae), "true_acts": (batch, self.n_features)}
        for name, tensor in (("x", x), ("x_hat", x_hat), ("f", f), ("true_acts", true_acts)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected[name]}")
        fires, on = f.detach() != 0, true_acts.detach() > 0
        matched_on = on[:, self.matches]
        self.true_positives += (fires & matched_on).sum(0)
        self.fire_counts += fires.sum(0)
        self.on_counts += matched_on.sum(0)
        self.true_on += on.sum()
        self.tokens += batch
        x64, x_hat64 = x.detach().double(), x_hat.detach().double()
        self.sum_x += x64.sum(0)
        self.sum_sq += x64.pow(2).sum()
        self.sse += (x64 - x_hat64).pow(2).sum()
        norms = x64.norm(dim=-1)
        valid = norms > MIN_INPUT_NORM
        self.shrinkage_sum += (x_hat64.norm(dim=-1)[valid] / norms[valid]).sum()
        self.shrinkage_rows += valid.sum()

    def compute(self) -> GroundTruthScores:  # type: ignore[override]
        """The scores of every row added so far (MCC's Hungarian match runs here, once)."""
        tokens = float(self.tokens)
        tp, fires, on = self.true_positives, self.fire_counts, self.on_counts
        precision = torch.where(fires > 0, tp / fires.clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(on > 0, tp / on.clamp(min=1), torch.zeros_like(tp))
        both = precision + recall
        f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-300), torch.zeros_like(tp))
        # TN = rows - TP - FP - FN, so TP + TN = rows - FP - FN.
        correct = tokens - (fires - tp) - (on - tp)
        dead = int((fires == 0).sum())
        return GroundTruthScores(
            mcc=mean_correlation_coefficient(self.W_dec, self.features),
            uniqueness=feature_uniqueness(self.matches, self.d_sae),
            precision=_mean(precision), recall=_mean(recall), f1=_mean(f1),
            accuracy=_mean(correct / tokens) if tokens else 0.0,
            explained_variance=self._explained_variance(),
            shrinkage=float(self.shrinkage_sum / self.shrinkage_rows) if self.shrinkage_rows > 0 else 0.0,
            l0=float(fires.sum()) / tokens if tokens else 0.0,
            true_l0=float(self.true_on) / tokens if tokens else 0.0,
            dead_latents=dead, dead_frac=dead / self.d_sae if self.d_sae else 0.0, tokens=int(tokens),
        )

    def _explained_variance(self) -> float:
        if self.tokens == 0:
            return 0.0
        n = float(self.tokens)
        variance = float(self.sum_sq) / n - float((self.sum_x / n).pow(2).sum())
        mse = float(self.sse) / n
        if variance < MIN_VARIANCE:  # constant rows: only an exact reconstruction explains them
            return 1.0 if mse < MIN_VARIANCE else 0.0
        return 1.0 - mse / variance


def _mean(per_latent: Tensor) -> float:
    """Mean over latents (0 for no latents)."""
    return float(per_latent.mean()) if per_latent.numel() else 0.0


@torch.no_grad()
def score(sae: SAE, acts: Tensor, true_acts: Tensor, ground_truth: GroundTruth, batch_size: int = 4096,
          input_scale: float = 1.0) -> GroundTruthScores:
    """Score ``sae`` on the raw rows ``acts [N, d]`` of a world, whose true feature activations
    are ``true_acts [N, F]``, in batches of ``batch_size`` rows on the SAE's device.

    ``input_scale`` multiplies the rows before the SAE sees them (1 for a saved SAE, which
    has its scale folded in; the training module's ``input_scale`` for one in training).
    """
    if acts.shape[0] != true_acts.shape[0]:
        raise ValueError(f"{acts.shape[0]} rows of activations but {true_acts.shape[0]} rows of true activations")
    device = sae.W_dec.device
    scorer = GroundTruthScorer(sae.W_dec, ground_truth.features.to(device), sync_on_compute=False)
    for start in range(0, acts.shape[0], batch_size):
        raw = acts[start : start + batch_size].to(device).float()
        x = raw * input_scale
        f = sae.encode(x)
        scorer.update(raw, sae.decode(f, x) / input_scale, f, true_acts[start : start + batch_size].to(device))
    return scorer.compute()
