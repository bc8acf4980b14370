"""JumpReLU SAE as trained for Gemma Scope (Rajamanoharan et al. 2024; Lieberum et al. 2024)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from gs_lightning.kernels.functional import jumprelu, step, target_l0_penalty
from gs_lightning.kernels.fused import Workspace, autocast_dtype, fused_jumprelu_loss
from gs_lightning.saes.base import SAE, TrainOutput
from gs_lightning.saes.dead import DeadLatentTracking
from gs_lightning.saes.recipe import RecipeOptions


def recipe_defaults(d_in: int, d_sae: int, transcoder: bool, encoder_init_scale: float | None,
                    bandwidth: float | None, threshold_init: float | None) -> tuple[float, float, float]:
    """The default recipe's ``(encoder_init_scale, bandwidth, threshold_init)`` where not given.

    Encoder columns of norm ``2 d_in / d_sae`` (``sqrt`` of it for a transcoder, whose
    target is another site), so the first reconstruction has the input's size; bandwidth
    ``sigma0 = scale / sqrt(d_in)``, the typical initial pre-activation, and threshold a tenth of it.
    """
    scale = encoder_init_scale
    if scale is None:
        scale = (2 * d_in / d_sae) ** 0.5 if transcoder else 2 * d_in / d_sae
    sigma0 = scale / d_in**0.5
    bandwidth = sigma0 if bandwidth is None else bandwidth
    threshold_init = sigma0 / 10 if threshold_init is None else threshold_init
    if bandwidth <= 0 or threshold_init <= 0:
        raise ValueError(f"bandwidth and threshold_init must be > 0, got {bandwidth}, {threshold_init}")
    return scale, bandwidth, threshold_init


class JumpReLUSAE(DeadLatentTracking, RecipeOptions, SAE):
    """JumpReLU SAE: ``f = pre * H(pre - threshold)``, loss MSE + lambda * L0.

    The sparsity term is Gemma Scope's mean L0 (``lambda * mean_b sum_i H(pre - t)``), or
    with ``target_l0`` Gemma Scope 2's quadratic penalty around a target L0 in SAELens'
    ``quadratic`` form (:func:`~gs_lightning.kernels.functional.target_l0_penalty`), so coefficients
    carry over between the two tools at the same input scaling. Opt-in and default-on terms
    act on the dictionary's health: a penalty on dense latents and the dead-latent remedies
    of :mod:`gs_lightning.saes.dead`. The defaults and what each was measured to do are in
    docs/guide/variants.md (dead latents), docs/results/quality.md and
    docs/results/ground_truth.md.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        sparsity_coefficient: lambda, the weight of the sparsity term (at the end of warm-up);
            its scale depends on the input scaling. ``None`` picks ``1 / d_in`` with
            ``target_l0`` (SAELens' coefficient 1, whose squared error is ``d_in`` times
            ours under its E||x|| = sqrt(d) scaling) and 1e-3 for the mean L0.
        bandwidth: eps, the width of the rectangle kernel of the pseudo-derivatives. ``None``
            picks ``2 sigma0``, twice the typical initial pre-activation ``sigma0 =
            encoder_init_scale / sqrt(d_in)`` of inputs scaled to E||x||^2 = 1 (SynthSAEBench's
            1.0 in SAELens' units at ``d_sae = 4 d_in``); tied to sigma0, a wider dictionary
            does not start with nothing firing.
        threshold_init: Initial threshold of every latent; ``None`` picks ``2 sigma0`` as for
            ``bandwidth`` (about 2% of latents fire at first).
        threshold_parameterization: ``raw`` trains the threshold itself, clamped at >= 0;
            ``log`` trains log(threshold) as the paper does, which Adam moves by about lr
            per step in log space: too slow for runs of thousands of steps.
        encoder_init_scale: Norm of the encoder columns at initialisation (``W_enc =
            scale * W_dec^T``). ``None`` picks ``2 * d_in / d_sae`` (its square root for a
            transcoder, whose random decoder does not add up coherently), so the initial
            reconstruction has about the input's norm; unit columns make it ``d_sae / (2
            d_in)`` times too large, and the SAE kills latents while it shrinks.
        target_l0: Train towards this L0 with the quadratic penalty instead of the mean L0;
            ``None`` keeps Gemma Scope's mean-L0 term.
        target_per_token: With ``target_l0``, penalise each token's L0 (SAELens' form) or,
            ``False``, the batch's mean L0, under which every active latent feels the same
            pull, as with a fixed lambda.
        dense_coefficient: Weight of ``sum_i relu(p_i - dense_threshold)``, ``p_i`` being
            latent i's firing frequency in the batch (with the step's pseudo-derivative): it
            raises the thresholds of latents firing on more than ``dense_threshold`` of tokens
            (Gemma Scope 2 penalises such latents in an unpublished form; this is ours). 0 disables.
        dense_threshold: Firing frequency above which a latent is penalised as dense.
        dead_coefficient: Weight of the pre-activation loss ``mean_b sum_{i dead}
            relu(t_i - pre_bi)`` on dead latents (Anthropic's 2025 loss restricted to dead
            latents, as SAELens does). Its gradient reaches the thresholds only (see
            ``dead_pull_encoder``): a dead latent's threshold comes down until it fires where
            its pre-activation is highest, which AuxK trains towards what live latents miss. 0 disables.
        dead_pull_encoder: Let the pre-activation loss pull the dead latents' pre-activations
            up as well (encoder and bias; Anthropic's form); they then come back firing
            broadly and spend the L0 budget poorly.
        aux_coefficient: Weight of AuxK on dead latents (Gao et al. 2024's remedy for TopK):
            the ``aux_k`` largest ``relu(pre)`` of each token's dead latents reconstruct the
            residual ``x - x_hat`` (a fixed target), encoder and decoder both. 0 disables.
        aux_k: Dead latents per token in the AuxK reconstruction.
        dead_tokens: A latent that has not fired for this many training tokens is dead
            (32,768: the size of the held-out set latents are judged on).
        fused: Use the fused forward/backward step while training (same numbers, less
            memory traffic); falls back to autograd when gradients to the input are needed.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        skip_connection: A skip-transcoder (needs ``d_out``): ``x_hat = f @ W_dec + x @ W_skip
            + b_dec``, ``W_skip`` zero at first; the fused step computes the skip term and its
            gradient too. Gemma Scope 2 calls these transcoders ``affine``.
        normalize_decoder: Hold decoder rows at unit norm (Gemma Scope). The default leaves
            them free from ``decoder_init_norm``, which recovers more true features.
        decoder_init_norm: Norm of the decoder rows at initialisation when they are free
            (SynthSAEBench's 0.5); ignored with ``normalize_decoder``.
        bias_lr_scale: Learning-rate multiplier of the threshold and ``b_enc`` (and of
            ``b_dec``). ``None`` picks ``1 / sqrt(d_in)`` (``1 / sqrt(d_out)`` for ``b_dec``):
            inputs scaled to E||x||^2 = 1 make thresholds and biases ``sqrt(d)`` times smaller
            than in SAELens' units while Adam moves every parameter by about lr a step. 1.0: Gemma Scope.
        normalize_gradient: Rescale the SAE's whole gradient to unit norm before each
            optimizer step (after the decoder projection), as SAELens' clip at norm 1 does in
            its units, where the gradient is larger than that on every step. Each threshold or
            bias gradient counts at its :meth:`lr_scales` multiplier, so the norm is measured
            in those units whatever the input scaling.
        subtract_decoder_bias: Encode ``x - b_dec`` rather than ``x`` (SAELens'
            ``apply_b_dec_to_input``): ``b_dec`` learns the activations' centre and the
            encoder reads deviations from it. The same SAE as one with encoder bias ``b_enc -
            b_dec @ W_enc``, which :meth:`canonical_state_dict` (and so every saved or exported
            SAE) holds; only training differs. ``None``: on for an SAE, off for a transcoder,
            whose ``b_dec`` lives at another site.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
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
        fused: bool = True,
        d_out: int | None = None,
        skip_connection: bool = False,
        normalize_decoder: bool = False,
        decoder_init_norm: float = 0.5,
        bias_lr_scale: float | None = None,
        normalize_gradient: bool = True,
        subtract_decoder_bias: bool | None = None,
    ) -> None:
        if threshold_parameterization not in ("log", "raw"):
            raise ValueError(f"threshold_parameterization must be 'log' or 'raw', not {threshold_parameterization!r}")
        if target_l0 is not None and not 0 < target_l0 <= d_sae:
            raise ValueError(f"target_l0 must be in (0, d_sae={d_sae}], got {target_l0}")
        if dense_coefficient < 0 or not 0 < dense_threshold <= 1:
            raise ValueError(f"dense_coefficient must be >= 0 and dense_threshold in (0, 1], "
                             f"got {dense_coefficient}, {dense_threshold}")
        subtract_decoder_bias = self.check_recipe(subtract_decoder_bias, d_out, bias_lr_scale, decoder_init_norm)
        scale, _, _ = recipe_defaults(d_in, d_sae, d_out is not None, encoder_init_scale, 1.0, 1.0)
        # Twice the typical initial pre-activation sigma0 = scale / sqrt(d_in): SynthSAEBench's 1.0
        # in SAELens' units at its init (encoder norm 0.5, d_sae = 4 d_in), where it is 1 / sqrt(d_in).
        two_sigma = 2 * scale / d_in**0.5
        scale, bandwidth, threshold_init = recipe_defaults(
            d_in, d_sae, d_out is not None, scale, two_sigma if bandwidth is None else bandwidth,
            two_sigma if threshold_init is None else threshold_init)
        if sparsity_coefficient is None:
            # SAELens' coefficient 1 for the quadratic target penalty: its squared error is d_in times ours.
            sparsity_coefficient = 1.0 / d_in if target_l0 is not None else 1e-3
        self.decoder_init_norm = decoder_init_norm
        super().__init__(d_in, d_sae, normalize_decoder=normalize_decoder, d_out=d_out, encoder_init_scale=scale,
                         skip_connection=skip_connection)
        self.init_recipe(subtract_decoder_bias, bias_lr_scale, normalize_gradient)
        self.sparsity_coefficient = sparsity_coefficient
        self.bandwidth = bandwidth
        self.threshold_init = threshold_init
        self.threshold_parameterization = threshold_parameterization
        # The resolved numbers, so a saved config.json states the recipe exactly.
        self.encoder_init_scale = scale
        self.target_l0 = target_l0
        self.target_per_token = target_per_token
        self.dense_coefficient = dense_coefficient
        self.dense_threshold = dense_threshold
        self.dead_pull_encoder = dead_pull_encoder
        self.fused = fused
        init = torch.full((d_sae,), threshold_init, dtype=torch.float32)
        if threshold_parameterization == "log":
            self.log_threshold = nn.Parameter(init.log())
        else:
            self.raw_threshold = nn.Parameter(init)
        self.init_remedies(dead_coefficient, aux_coefficient, aux_k, dead_tokens)
        self._workspace = Workspace()

    @property
    def threshold(self) -> Tensor:
        """Per-latent threshold, float32, differentiable w.r.t. its parameter."""
        if self.threshold_parameterization == "log":
            return self.log_threshold.float().exp()
        return self.raw_threshold.float()

    def activation(self, pre: Tensor) -> Tensor:
        return jumprelu(pre, self.threshold, self.bandwidth)

    # -- sparsity and dictionary-health terms --------------------------------------------

    def sparsity_terms(self, counts: Tensor | None, token_l0: Tensor | None, batch: int,
                       warmup: float) -> dict[str, Tensor]:
        """The weighted sparsity terms from step-function counts with pseudo-derivatives:
        ``counts [d_sae]`` (tokens each latent fired on) and ``token_l0 [batch]`` (latents
        active per token; needed with ``target_l0``)."""
        if self.needs_token_l0:
            penalty = target_l0_penalty(token_l0, self.target_l0).mean()
        else:
            l0 = token_l0.mean() if token_l0 is not None else counts.sum() / batch
            penalty = l0 if self.target_l0 is None else target_l0_penalty(l0, self.target_l0)
        terms = {"l0_penalty": warmup * self.sparsity_coefficient * penalty}
        if self.dense_coefficient > 0:
            excess = (counts / batch - self.dense_threshold).relu().sum()
            terms["dense_penalty"] = warmup * self.dense_coefficient * excess
        return terms

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        s = step(pre, self.threshold, self.bandwidth).reshape(-1, self.d_sae)
        return self.sparsity_terms(s.sum(0), s.sum(-1), s.shape[0], warmup)

    @property
    def needs_token_l0(self) -> bool:
        """Whether the sparsity term reads each token's L0 (the per-token target penalty)."""
        return self.target_l0 is not None and self.target_per_token

    def dead_pre_activation(self, x: Tensor, idx: Tensor) -> Tensor:
        return x.reshape(-1, self.d_in) @ self.W_enc[:, idx] + self.encoder_bias()[idx]

    def dead_decoders(self, idx: Tensor) -> Tensor:
        return self.W_dec[idx]

    # -- the fused step ------------------------------------------------------------------

    def uses_fused(self, x: Tensor) -> bool:
        """Whether a training step on ``x`` takes the fused path (it cannot give ``x`` a gradient)."""
        return self.fused and self.training and torch.is_grad_enabled() and not x.requires_grad and x.dim() == 2

    def compute_dtype(self, x: Tensor) -> torch.dtype:
        """The dtype the fused step's GEMMs run in: autocast's when enabled, else the weights'."""
        return autocast_dtype(x, self.W_enc.dtype)

    def training_output(self, x: Tensor, warmup: float = 1.0, target: Tensor | None = None) -> TrainOutput:
        if not self.uses_fused(x):
            return super().training_output(x, warmup, target)
        mse, counts, token_l0, x_hat = fused_jumprelu_loss(
            x, self.W_enc, self.encoder_bias(), self.W_dec, self.b_dec, self.threshold, self.bandwidth, self._workspace,
            self.compute_dtype(x), target, token_l0=self.needs_token_l0, W_skip=self.W_skip,
        )
        return self.fused_output(x, target, mse, counts, token_l0, x_hat, warmup)

    def fused_output(self, x: Tensor, target: Tensor | None, mse: Tensor, counts: Tensor, token_l0: Tensor,
                     x_hat: Tensor, warmup: float) -> TrainOutput:
        """The :class:`TrainOutput` of a fused step's results (shared with packed sweeps)."""
        B = x.shape[0]
        losses = {"mse": mse, **self.sparsity_terms(counts, token_l0 if token_l0.numel() else None, B, warmup)}
        losses.update(self.dead_losses(x, x if target is None else target, x_hat))
        self.track_firing(counts, B)
        return TrainOutput(x_hat, losses, counts.detach().sum() / B, counts.detach())

    # -- optimizer hooks and saving ------------------------------------------------------

    def lr_scales(self) -> dict[str, float]:
        """The threshold and ``b_enc`` at ``bias_lr_scale`` (default ``1 / sqrt(d_in)``), ``b_dec``
        at its output-side counterpart (``1 / sqrt(d_out)``)."""
        threshold = "log_threshold" if self.threshold_parameterization == "log" else "raw_threshold"
        return {**super().lr_scales(), threshold: self.bias_scales()[0]}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        if self.threshold_parameterization == "raw":
            self.raw_threshold.clamp_(min=0.0)

    def train(self, mode: bool = True) -> JumpReLUSAE:
        if not mode:
            self._workspace.clear()  # give the [batch, d_sae] buffers back while evaluating
        return super().train(mode)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """Weights under the papers' names, ``pre = x @ W_enc + b_enc`` whatever
        ``subtract_decoder_bias`` is (``b_dec @ W_enc`` folded into ``b_enc``), so every format
        reads it as Gemma Scope's JumpReLU."""
        tensors = {k: v for k, v in super().canonical_state_dict().items() if k in self.weight_names}
        tensors["threshold"] = self.threshold.detach().clone()
        return tensors

    @torch.no_grad()
    def load_canonical_state_dict(self, tensors: dict[str, Tensor]) -> None:
        tensors = dict(tensors)  # in the plain form: _convert_encoder_bias unfolds b_enc if needed
        threshold = tensors.pop("threshold").float()
        if self.threshold_parameterization == "log":
            # log(0) would be -inf: a latent with threshold 0 gets the smallest normal float.
            tensors["log_threshold"] = threshold.clamp(min=torch.finfo(torch.float32).tiny).log()
        else:
            tensors["raw_threshold"] = threshold
        super().load_canonical_state_dict(tensors)
