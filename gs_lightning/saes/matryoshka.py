"""Matryoshka SAEs (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs"):
BatchTopK as in the paper, and JumpReLU as Gemma Scope 2 trains its dictionaries.

The Matryoshka loss asks every nested prefix of the dictionary to reconstruct on its own:
for prefix sizes ``m_1 < ... < m_n < d_sae`` it adds, to the full dictionary's ``mse``,

    mse_prefix_<m> = mean_b || y_b - (f_b[:m] @ W_dec[:m] + b_dec (+ x_b @ W_skip)) ||^2

with equal weights (the paper's sum over its nested sizes, the full width included). Early
latents thus learn general features that later ones refine, instead of being absorbed
by them. The sparsity and dead-latent terms are the base variant's, computed once on the
full dictionary: the latents are shared by every prefix, only the reconstruction is nested.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from gs_lightning.saes.batchtopk import BatchTopKSAE
from gs_lightning.saes.jumprelu import JumpReLUSAE
from gs_lightning.saes.topk import DEAD_TOKENS


def check_prefixes(prefixes: list[int], d_sae: int) -> list[int]:
    """The prefix sizes as ints; a ValueError unless they increase strictly within ``1..d_sae-1``."""
    prefixes = [int(m) for m in prefixes]
    if not prefixes or prefixes != sorted(set(prefixes)) or not 0 < prefixes[0] or prefixes[-1] >= d_sae:
        raise ValueError(f"prefixes must increase strictly within 1..d_sae-1={d_sae - 1}, got {prefixes}")
    return prefixes


def prefix_losses(target: Tensor, f: Tensor, W_dec: Tensor, offset: Tensor, prefixes: list[int]) -> dict[str, Tensor]:
    """``mse_prefix_<m>``: ``||target - (offset + f[..., :m] @ W_dec[:m])||^2`` summed over the
    model dimension, averaged over tokens, for each prefix size ``m``. ``offset`` is what every
    prefix's reconstruction shares (``b_dec``, plus the skip path of a skip-transcoder)."""
    losses = {}
    # Grow the reconstruction one group of latents at a time: each prefix costs one
    # [batch, group] @ [group, d_out] product.
    partial, start = offset, 0
    for m in prefixes:
        partial = partial + f[..., start:m] @ W_dec[start:m]
        losses[f"mse_prefix_{m}"] = (partial - target).pow(2).sum(-1).mean()
        start = m
    return losses


class MatryoshkaLosses:
    """Adds the prefix terms to a variant's reconstruction losses; mixed in before the SAE class."""

    prefixes: list[int]

    def reconstruction_losses(self, x: Tensor, target: Tensor, f: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        losses = super().reconstruction_losses(x, target, f, x_hat)  # type: ignore[misc]
        offset = self.b_dec if self.W_skip is None else self.b_dec + x @ self.W_skip  # type: ignore[attr-defined]
        return {**losses, **prefix_losses(target, f, self.decoder_rows(), offset, self.prefixes)}  # type: ignore[attr-defined]


class MatryoshkaBatchTopKSAE(MatryoshkaLosses, BatchTopKSAE):
    """BatchTopK whose loss also asks each nested prefix of the dictionary to reconstruct alone.

    For each ``m`` in ``prefixes`` the term ``mse_prefix_<m>`` is the reconstruction error of
    latents ``[0, m)`` only; ``mse`` is the full dictionary's (see the module docstring).

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        k: Mean active latents per token.
        prefixes: Increasing prefix sizes, each below ``d_sae`` (the full dictionary is ``mse``).
        aux_k: Dead latents used by the AuxK reconstruction; ``None``: half the reconstruction's
            width (as in :class:`TopKSAE`).
        aux_coefficient: Weight of the AuxK loss.
        dead_tokens: A latent that has not fired for this many training tokens is dead (as in :class:`TopKSAE`).
        threshold_decay: Decay of the moving average that estimates the inference threshold.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        encoder_init_scale: Norm of the encoder columns at initialisation (as in :class:`TopKSAE`).
        skip_connection: A skip-transcoder (needs ``d_out``): every prefix's reconstruction
            includes ``x @ W_skip``, as it includes ``b_dec``.
        dead_steps_threshold: The window in training steps instead (as in :class:`TopKSAE`).
        subtract_decoder_bias: Encode ``x - b_dec`` (as in :class:`TopKSAE`).
        bias_lr_scale: Learning-rate multiplier of the biases (as in :class:`TopKSAE`).
        normalize_gradient: Rescale the gradient to unit norm before each step (as in :class:`TopKSAE`).
        normalize_decoder: Hold decoder rows at unit norm; ``False``: free rows read as
            normalised (as in :class:`TopKSAE`).
        decoder_init_norm: Norm of free decoder rows at initialisation (as in :class:`TopKSAE`).
        aux_relu: AuxK on the positive dead pre-activations only (as in :class:`TopKSAE`).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        prefixes: list[int],
        aux_k: int | None = None,
        aux_coefficient: float = 1.0,
        dead_tokens: int = DEAD_TOKENS,
        threshold_decay: float = 0.99,
        d_out: int | None = None,
        encoder_init_scale: float | None = None,
        skip_connection: bool = False,
        dead_steps_threshold: int | None = None,
        subtract_decoder_bias: bool | None = None,
        bias_lr_scale: float | None = None,
        normalize_gradient: bool = True,
        normalize_decoder: bool | None = None,
        decoder_init_norm: float = 0.1,
        aux_relu: bool = False,
    ) -> None:
        prefixes = check_prefixes(prefixes, d_sae)
        super().__init__(d_in, d_sae, k, aux_k, aux_coefficient, dead_tokens, threshold_decay, d_out,
                         encoder_init_scale, skip_connection, dead_steps_threshold, subtract_decoder_bias,
                         bias_lr_scale, normalize_gradient, normalize_decoder, decoder_init_norm, aux_relu)
        self.prefixes = prefixes


class MatryoshkaJumpReLUSAE(MatryoshkaLosses, JumpReLUSAE):
    """JumpReLU with Matryoshka prefix losses, as Gemma Scope 2 trains its SAEs and transcoders.

    Gemma Scope 2 (McDougall et al., December 2025; announcement "Announcing Gemma Scope 2")
    states that all its dictionaries are JumpReLU trained with a quadratic L0 penalty, a
    frequency penalty and Matryoshka losses, without publishing the prefix sizes or
    weights; the loss here is Bussmann et al.'s (see the module docstring) on top of
    :class:`JumpReLUSAE`'s terms: the L0 term (mean L0 or ``target_l0``'s quadratic
    penalty), ``dense_coefficient``'s penalty and the dead-latent remedies act once on the
    full dictionary, and AuxK reconstructs the full dictionary's residual. The prefix terms
    reach each threshold through the JumpReLU's pseudo-derivative as ``mse`` does.

    Trained through autograd: the fused step computes the full reconstruction only, and
    each prefix term needs its own reconstruction and gradient.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        prefixes: Increasing prefix sizes, each below ``d_sae`` (the full dictionary is ``mse``).
        sparsity_coefficient: lambda, the weight of the sparsity term; ``None`` as in :class:`JumpReLUSAE`.
        bandwidth: eps of the pseudo-derivatives; ``None`` as in :class:`JumpReLUSAE`.
        threshold_init: Initial threshold; ``None`` as in :class:`JumpReLUSAE`.
        threshold_parameterization: ``raw`` trains the threshold, ``log`` log(threshold).
        encoder_init_scale: Norm of the encoder columns at initialisation (as in :class:`JumpReLUSAE`).
        target_l0: Train towards this L0 with the quadratic penalty; ``None``: mean L0.
        target_per_token: With ``target_l0``, penalise each token's L0 (else the batch's mean).
        dense_coefficient: Weight of the penalty on latents firing above ``dense_threshold``.
        dense_threshold: Firing frequency above which a latent is penalised as dense.
        dead_coefficient: Weight of the pre-activation loss on dead latents.
        dead_pull_encoder: Let the pre-activation loss move the encoder too.
        aux_coefficient: Weight of the AuxK loss on dead latents.
        aux_k: Dead latents per token in the AuxK reconstruction.
        dead_tokens: A latent that has not fired for this many training tokens is dead.
        d_out: Width of the reconstruction target; set for a transcoder, default ``d_in``.
        skip_connection: A skip-transcoder (needs ``d_out``): every prefix's reconstruction
            includes ``x @ W_skip``, as it includes ``b_dec``.
        subtract_decoder_bias: Encode ``x - b_dec``; ``None``: on for an SAE, off for a
            transcoder (as in :class:`JumpReLUSAE`).
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        prefixes: list[int],
        sparsity_coefficient: float | None = None,
        bandwidth: float | None = None,
        threshold_init: float | None = None,
        threshold_parameterization: Literal["log", "raw"] = "raw",
        encoder_init_scale: float | None = None,
        target_l0: float | None = None,
        target_per_token: bool = True,
        dense_coefficient: float = 0.0,
        dense_threshold: float = 0.1,
        dead_coefficient: float = 0.1,
        dead_pull_encoder: bool = False,
        aux_coefficient: float = 1.0,
        aux_k: int = 256,
        dead_tokens: int = 32_768,
        d_out: int | None = None,
        skip_connection: bool = False,
        subtract_decoder_bias: bool | None = None,
    ) -> None:
        prefixes = check_prefixes(prefixes, d_sae)
        super().__init__(
            d_in, d_sae, sparsity_coefficient, bandwidth, threshold_init, threshold_parameterization,
            encoder_init_scale, target_l0, target_per_token, dense_coefficient, dense_threshold, dead_coefficient,
            dead_pull_encoder, aux_coefficient, aux_k, dead_tokens, fused=False, d_out=d_out,
            skip_connection=skip_connection, subtract_decoder_bias=subtract_decoder_bias,
        )
        self.prefixes = prefixes
