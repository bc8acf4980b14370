"""TopK SAE with the AuxK auxiliary loss (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from gs_lightning.saes.base import SAE
from gs_lightning.saes.dead import DeadLatentTracking, aux_k_loss, data_parallel_world
from gs_lightning.saes.recipe import RecipeOptions

DEAD_TOKENS = 51_200
"""The TopK family's dead window: 50 steps of 1,024 tokens (docs/results/ground_truth.md)."""


class TopKSAE(DeadLatentTracking, RecipeOptions, SAE):
    """``f = TopK(relu(pre))``: the k largest activations of each token; loss MSE + AuxK.

    No sparsity penalty: k fixes L0. AuxK reconstructs the residual ``x - x_hat`` from the
    ``aux_k`` largest pre-activations among *dead* latents (none fired for ``dead_tokens``
    training tokens, :mod:`gs_lightning.saes.dead`), which gives them a gradient back to life.
    It is SAELens' form: signed values, ``aux_k`` half the reconstruction's width, the loss
    scaled by ``min(dead / aux_k, 1)``.

    The defaults are SAELens' TopK recipe in this package's units, as JumpReLU's are: the
    encoder reads ``x - b_dec``, biases train at ``lr / sqrt(d)``, the gradient is normalised
    before each step, and the decoder rows are free from norm 0.1 and read as normalised. On
    the two SynthSAEBench tuning worlds they (with lr 2e-3) lifted BatchTopK's MCC from
    0.604 / 0.463 to 0.697 / 0.667 (docs/results/ground_truth.md). The configs still clip the
    gradient (``model.gradient_clip_norm: 0.03``), which after the normalisation only scales
    the step Adam sees; with ``normalize_gradient=False`` it is the clip that made our TopK
    match SAELens' at k 64 before (FVU 0.0233 to 0.0213 on the quality benchmark's resid site).

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        k: Active latents per token.
        aux_k: Dead latents used by the AuxK reconstruction; ``None``: half the width of the
            reconstruction (SAELens and EleutherAI; Gao et al. use 512). The loss is scaled
            by ``min(dead / aux_k, 1)``, so a few dead latents do not carry the whole residual.
        aux_coefficient: Weight of the AuxK loss (SAELens' 1; Gao et al. use 1/32 with a
            10M-token dead window).
        aux_relu: Keep only the positive dead pre-activations (Gao et al.). ``False`` (the
            default, as SAELens) keeps their sign, so a dead latent whose pre-activations are
            all negative still gets a gradient: on the MLP tuning site of the quality
            benchmark that took never-firing latents from 11-16% to 6-7% at the same weight and
            ``aux_k`` (docs/results/ground_truth.md).
        dead_tokens: A latent that has not fired for this many training tokens is dead.
            51,200 (50 steps at 1,024 per batch): a window as long as the run never lets
            AuxK act, and with SAELens' AuxK 50 steps left fewer latents never firing than
            100 at the same or better FVU and MCC on the tuning sites and worlds.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        encoder_init_scale: Norm of the encoder columns at initialisation (``W_enc =
            scale * W_dec^T``). ``None`` (the default) picks :func:`topk_init_scale`, the
            scale at which the initial reconstruction of an input of unit norm has about
            half its norm: unit columns (Gao et al.'s transpose init) start several times
            too large and ended 30% worse in FVU on the quickstart's 1,000-step benchmark,
            and scales 0.25 to 0.5 there (this rule: 0.35) were equally good. A
            transcoder, on which the rule was not measured, keeps unit columns.
        skip_connection: A skip-transcoder (needs ``d_out``): adds ``x @ W_skip`` to the
            reconstruction, ``W_skip`` zero at first (:class:`~gs_lightning.saes.SAE`).
        dead_steps_threshold: The window counted in training steps instead, as configs
            from before ``dead_tokens`` give it; it becomes tokens at the first training
            batch (this many steps of that batch's global tokens). None: ``dead_tokens``.
        subtract_decoder_bias: Encode ``x - b_dec`` (SAELens' ``apply_b_dec_to_input``); saved
            SAEs hold the folded encoder bias (:class:`~gs_lightning.saes.recipe.RecipeOptions`).
            ``None``: on for an SAE, off for a transcoder.
        bias_lr_scale: Learning-rate multiplier of ``b_enc`` and ``b_dec``; ``None``: ``1 /
            sqrt(d_in)`` and ``1 / sqrt(d_out)`` (as :class:`~gs_lightning.saes.JumpReLUSAE`).
        normalize_gradient: Rescale the SAE's gradient to unit norm before each step, biases
            counted at their lr multiplier (as :class:`~gs_lightning.saes.JumpReLUSAE`).
        normalize_decoder: Hold decoder rows at unit norm. ``False`` leaves them free from
            ``decoder_init_norm`` and reads them as if normalised (SAELens'
            ``rescale_acts_by_decoder_norm``): latent i's activation is ``pre_i ||d_i||``, the
            top k are chosen on it, and it decodes along ``d_i / ||d_i||``. Saved SAEs hold
            that normalised form, so every format reads a plain TopK SAE. ``None``: free for an
            SAE, held at unit norm for a transcoder (on which it was not measured).
        decoder_init_norm: Norm of the free decoder rows at initialisation (SAELens' 0.1); the
            encoder then starts as their transpose unless ``encoder_init_scale`` is given.
            Ignored with ``normalize_decoder``.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        aux_k: int | None = None,
        aux_coefficient: float = 1.0,
        dead_tokens: int = DEAD_TOKENS,
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
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in 1..d_sae={d_sae}, got {k}")
        if aux_k is None:
            aux_k = max(1, (d_out or d_in) // 2)
        if aux_k < 0 or dead_tokens <= 0 or (dead_steps_threshold is not None and dead_steps_threshold <= 0):
            raise ValueError(f"aux_k must be >= 0, dead_tokens and dead_steps_threshold > 0, "
                             f"got {aux_k}, {dead_tokens}, {dead_steps_threshold}")
        subtract_decoder_bias = self.check_recipe(subtract_decoder_bias, d_out, bias_lr_scale, decoder_init_norm)
        if normalize_decoder is None:
            normalize_decoder = d_out is not None
        scale = encoder_init_scale
        if scale is None and not normalize_decoder:  # SAELens' W_enc = W_dec^T
            scale = decoder_init_norm
        elif scale is None:  # the rule is measured on SAEs; a transcoder keeps unit columns
            scale = topk_init_scale(d_in, d_sae, k) if d_out is None else 1.0
        self.decoder_init_norm = decoder_init_norm
        super().__init__(d_in, d_sae, normalize_decoder=normalize_decoder, d_out=d_out, encoder_init_scale=scale,
                         skip_connection=skip_connection)
        self.init_recipe(subtract_decoder_bias, bias_lr_scale, normalize_gradient)
        self.k = k
        self.aux_k = aux_k
        self.aux_coefficient = aux_coefficient
        self.aux_relu = aux_relu
        self.dead_tokens = dead_tokens
        self.dead_steps_threshold = dead_steps_threshold
        self.encoder_init_scale = encoder_init_scale  # as given: a packed sweep over k re-derives it
        self.init_dead_tracking()
        self._step_tokens: int | None = None  # global tokens of a training step, from the first batch
        self._pending_steps: Tensor | None = None
        self._register_load_state_dict_pre_hook(self._convert_step_counts)

    # -- a free decoder, read as normalised ------------------------------------------------

    def pre_activation(self, x: Tensor) -> Tensor:
        """The encoder's output; with a free decoder, times each row's norm ``||d_i||``."""
        pre = super().pre_activation(x)
        return pre if self.normalize_decoder else pre * self.W_dec.norm(dim=1)

    def decoder_rows(self) -> Tensor:
        """``W_dec``; a free decoder's rows divided by their norms."""
        if self.normalize_decoder:
            return self.W_dec
        return self.W_dec / self.W_dec.norm(dim=1, keepdim=True)

    def normalised(self, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(W_enc, b_enc, W_dec)`` with the free rows' norms moved into the encoder: the same SAE
        with unit-norm rows (``b_enc`` scales alike in either form of ``subtract_decoder_bias``)."""
        norms = self.W_dec.detach().norm(dim=1)
        return W_enc * norms, b_enc * norms, W_dec / norms[:, None]

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """Make a free decoder's rows unit-norm in place (:meth:`normalised`), and hold them
        there from now on (``normalize_decoder``)."""
        if self.normalize_decoder:
            return
        params = (self.W_enc, self.b_enc, self.W_dec)
        for param, value in zip(params, self.normalised(*params)):
            param.copy_(value)
        self.normalize_decoder = True

    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        """As :meth:`SAE.fold_input_scale`, on the normalised form of a free decoder: the
        reconstruction's scale must sit in ``W_dec``, which a free decoder reads without its norm."""
        self.fold_decoder_norms()
        super().fold_input_scale(scale, target_scale)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """The weights in the normalised form (a free decoder's norms folded into the encoder)."""
        tensors = super().canonical_state_dict()
        if not self.normalize_decoder:
            keys = ("W_enc", "b_enc", "W_dec")
            tensors.update(zip(keys, self.normalised(*(tensors[k] for k in keys))))
        return tensors

    # -- TopK -----------------------------------------------------------------------------

    def activation(self, pre: Tensor) -> Tensor:
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        return {}

    @property
    def dead_window(self) -> float:
        """``dead_tokens``; a window given in steps, in tokens once the first batch gave a step's size."""
        if self.dead_steps_threshold is None:
            return self.dead_tokens
        return math.inf if self._step_tokens is None else self.dead_steps_threshold * self._step_tokens

    @property
    def tracks_dead(self) -> bool:
        return self.aux_k > 0

    def auxiliary_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor, warmup: float) -> dict[str, Tensor]:
        """``aux_k``: AuxK (:func:`~gs_lightning.saes.dead.aux_k_loss`) decoding, without
        ``b_dec``, the residual ``x - x_hat`` from the top ``aux_k`` dead latents, scaled by
        ``min(dead / aux_k, 1)``; 0 while none are dead."""
        if not self.training or self.aux_k == 0:
            return {}
        self._count_steps_in_tokens(pre.numel() // self.d_sae)
        dead = self.dead
        # Live latents masked to -inf keep the shape static (no host sync on the number dead).
        masked = pre.masked_fill(~dead, float("-inf"))
        loss = aux_k_loss(masked, self.decoder_rows(), (x - x_hat).detach(), self.aux_k, self.aux_relu)
        return {"aux_k": self.aux_coefficient * (dead.sum() / self.aux_k).clamp(max=1.0) * loss}

    def update_statistics(self, pre: Tensor, f: Tensor) -> None:
        self._count_steps_in_tokens(f.numel() // self.d_sae)
        super().update_statistics(pre, f)

    def _count_steps_in_tokens(self, tokens: int) -> None:
        """At the first training batch (``tokens`` local rows): the size of a step, and the
        counters of a checkpoint that counted steps, in tokens."""
        if self._step_tokens is None:
            self._step_tokens = tokens * data_parallel_world()
        if self._pending_steps is not None:
            self.tokens_since_fired.copy_(self._pending_steps * self._step_tokens)
            self._pending_steps = None

    def _convert_step_counts(self, state: dict[str, Any], prefix: str, *_: object) -> None:
        """Load-state-dict pre-hook: a checkpoint from before the counters were in tokens holds
        ``steps_since_fired``; it becomes ``tokens_since_fired`` at the first training batch."""
        steps = state.pop(prefix + "steps_since_fired", None)
        if steps is not None:
            self._pending_steps = steps.to(self.tokens_since_fired.device, torch.float64)
            state[prefix + "tokens_since_fired"] = torch.zeros_like(self.tokens_since_fired)


def topk_init_scale(d_in: int, d_sae: int, k: int) -> float:
    """The encoder column norm at which TopK's initial reconstruction of a unit-norm input has
    about half its norm.

    With ``W_enc = s W_dec^T`` and random unit decoder rows, each pre-activation is about
    ``s z / sqrt(d_in)`` for a standard normal ``z``; the k largest of ``d_sae`` sit near
    ``z_k = sqrt(2 ln(d_sae / k))``, and k of them along random directions add up to a norm
    of ``sqrt(k) s z_k / sqrt(d_in)``. Setting that to 1/2 gives
    ``s = sqrt(d_in / k) / (2 z_k)`` (0.35 at the quickstart's d_in 128, d_sae 2,048, k 32).
    Measured, the ratio comes out at 0.6-0.7: the chosen latents' directions lean towards
    the input rather than being random.
    """
    z = math.sqrt(2 * math.log(max(d_sae / k, math.e)))  # >= 1 when k is close to d_sae
    return math.sqrt(d_in / k) / (2 * z)

