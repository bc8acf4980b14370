"""Cross-layer transcoder (CLT) with JumpReLU latents.

A CLT over ``L`` layers has, for every layer ``l``, ``n = d_sae / L`` latents that read
the residual stream before layer ``l``'s MLP and write to the MLP output of layer ``l``
and of every later layer (Ameisen et al. 2025, "Circuit Tracing: Revealing Computational
Graphs in Language Models"; Gemma Scope 2 ships them for Gemma 3)::

    pre_l  = x_l @ W_enc[l] + b_enc[l]                    x_l: blocks.{l}.hook_resid_mid
    f_l    = JumpReLU(pre_l; threshold[l])
    y_hat_m = b_dec[m] + sum_{l <= m} f_l @ W_dec[l][:, m - l]   y_m: blocks.{m}.hook_mlp_out

``W_dec[l]`` is ``[n, L - l, d_out]``: the decoders of the ``(l, m)`` pairs with ``m >= l``,
``L (L + 1) / 2`` of them (circuit-tracer's layout; Gemma Scope 2's ``w_dec`` is the full
``[L, n, L, d]`` with the pairs ``m < l`` unused).

Why the residual stream before the MLP (``hook_resid_mid``) and not the MLP's normalised
input (``hook_mlp_in``): the circuit-tracing paper's features read the residual stream,
circuit-tracer loads CLTs with ``feature_input_hook="hook_resid_mid"`` by default, and
Gemma Scope 2 describes its CLT latents as reading the residual stream. Reading before the
norm also keeps each encoder a linear function of the stream, which attribution graphs
rely on (the norm's per-token scale would sit between them).

The training recipe is Gemma Scope's JumpReLU one, per latent: the reconstruction loss is
the squared error summed over the model dimension and over layers, averaged over tokens;
the sparsity term is lambda times the number of active latents summed over layers (or, with
``target_l0``, the quadratic penalty around a per-layer target, summed over layers). Each
latent's decoder, concatenated over the layers it writes to, is kept at unit norm, as a
JumpReLU SAE's decoder row is (Anthropic instead leaves it free and weights the sparsity
term by its norm; with unit norm the two coincide).

Latents are numbered layer-major: latent ``l * n + i`` is latent ``i`` of layer ``l``, so
``encode`` returns ``[batch, d_sae]`` as any SAE does and the training module's firing
statistics and dead-latent counters apply unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gs_lightning.kernels.clt_fused import fused_clt_loss
from gs_lightning.kernels.functional import jumprelu
from gs_lightning.kernels.fused import Workspace, autocast_dtype
from gs_lightning.saes.base import TrainOutput
from gs_lightning.saes.blocked import BlockedJumpReLU, per_site
from gs_lightning.saes.jumprelu import recipe_defaults


class CrossLayerTranscoder(BlockedJumpReLU):
    """A cross-layer transcoder: JumpReLU latents per layer, each decoding to its own layer's
    MLP output and every later one (see the module docstring for the maths and sources).

    Inputs are ``[batch, n_layers, d_in]`` (the stacked ``hook_resid_mid`` of every layer,
    as :class:`~gs_lightning.data.AlignedShardsDataModule` yields them); reconstructions are
    ``[batch, n_layers, d_out]``.

    Args:
        n_layers: Number of layers L the CLT spans (layers 0..L-1 of its data).
        d_in: Width of the residual stream each encoder reads.
        d_sae: Total number of latents, split evenly over the layers (a multiple of n_layers).
        sparsity_coefficient: lambda, the weight of the sparsity term (after warm-up).
        bandwidth: eps of the rectangle kernel; None picks ``encoder_init_scale / sqrt(d_in)``
            as :class:`~gs_lightning.saes.JumpReLUSAE` does.
        threshold_init: Initial threshold of every latent; None picks ``bandwidth / 10``
            (with the default bandwidth).
        encoder_init_scale: Norm of each encoder column at initialisation; None picks
            ``sqrt(2 d_in / n)`` with n the latents per layer (the transcoder default of
            :class:`~gs_lightning.saes.JumpReLUSAE`).
        target_l0: Train each layer towards this L0 with the per-token quadratic penalty
            ``lambda mean_b sum_l (2 / T) (l0_bl - T)^2``; None keeps the L0 term
            ``lambda mean_b sum_l l0_bl``.
        d_out: Width of the MLP outputs reconstructed; default ``d_in``.
        fused: Train with the fused step of :mod:`gs_lightning.kernels.clt_fused` (the same
            losses and gradients, far less memory traffic and time); false, or a step that
            needs a gradient w.r.t. the input, goes through autograd.
        dead_coefficient: Weight of the pre-activation loss on dead latents (thresholds
            only), as :class:`~gs_lightning.saes.JumpReLUSAE`'s; 0 disables.
        aux_coefficient: Weight of AuxK on dead latents: the ``aux_k`` largest ``relu(pre)``
            of each token's dead latents (over all layers) reconstruct the residual of every
            MLP output, each through its decoder over the layers it writes; 0 disables.
        aux_k: Dead latents per token in the AuxK reconstruction.
        dead_tokens: A latent that has not fired for this many training tokens is dead.
    """

    def __init__(
        self,
        n_layers: int,
        d_in: int,
        d_sae: int,
        sparsity_coefficient: float = 1e-3,
        bandwidth: float | None = None,
        threshold_init: float | None = None,
        encoder_init_scale: float | None = None,
        target_l0: float | None = None,
        d_out: int | None = None,
        fused: bool = True,
        dead_coefficient: float = 0.1,
        aux_coefficient: float = 1.0,
        aux_k: int = 256,
        dead_tokens: int = 32_768,
    ) -> None:
        if n_layers < 1 or d_sae % n_layers:
            raise ValueError(f"d_sae={d_sae} must be a positive multiple of n_layers={n_layers}")
        # A JumpReLU transcoder's defaults at the latents of one layer.
        scale, bandwidth, threshold_init = recipe_defaults(d_in, d_sae // n_layers, True, encoder_init_scale,
                                                          bandwidth, threshold_init)
        self.n_layers = n_layers  # read by make_parameters, which the parent's constructor calls
        super().__init__(d_in, d_sae, normalize_decoder=True, d_out=d_in if d_out is None else d_out,
                         encoder_init_scale=scale)
        self.sparsity_coefficient = sparsity_coefficient
        self.bandwidth = bandwidth
        self.threshold_init = threshold_init
        self.encoder_init_scale = scale
        self.target_l0 = target_l0
        self.fused = fused
        self.init_remedies(dead_coefficient, aux_coefficient, aux_k, dead_tokens)
        with torch.no_grad():
            self.raw_threshold.fill_(threshold_init)
        self._workspace = Workspace()  # the fused step's [L, batch, n] buffers; never saved

    # -- shapes -------------------------------------------------------------------------

    @property
    def latents_per_layer(self) -> int:
        """n, the latents that read each layer."""
        return self.d_sae // self.n_layers

    @property
    def stacked_sites(self) -> int:  # type: ignore[override]
        """Inputs stack one site per layer."""
        return self.n_layers

    @property
    def blocks(self) -> list[tuple[slice, slice]]:
        """Layer l's latents read input l and write outputs l..L-1."""
        return [(slice(l, l + 1), slice(l, self.n_layers)) for l in range(self.n_layers)]

    def block_encoder(self, k: int) -> tuple[Tensor, Tensor]:
        return self.W_enc[k].unsqueeze(0), self.b_enc[k]

    def make_parameters(self) -> None:
        L, n, d, d_out = self.n_layers, self.d_sae // self.n_layers, self.d_in, self.out_width
        self.W_enc = nn.Parameter(torch.empty(L, d, n))
        self.b_enc = nn.Parameter(torch.zeros(L, n))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(n, L - l, d_out)) for l in range(L)])
        self.b_dec = nn.Parameter(torch.zeros(L, d_out))
        self.register_parameter("W_skip", None)
        # float32 always: bf16 would round the threshold's small Adam updates away.
        self.raw_threshold = nn.Parameter(torch.zeros(L, n, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each latent's decoder (over the layers it writes to) a random unit vector; encoder
        columns random of norm ``encoder_init_scale``; biases zero."""
        for W in self.W_dec:
            W.copy_(torch.randn_like(W))
        self.after_optimizer_step()
        self.W_enc.copy_(torch.randn_like(self.W_enc))
        self.W_enc.mul_(self._encoder_init_scale / self.W_enc.norm(dim=1, keepdim=True))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- forward ------------------------------------------------------------------------

    def pre_activation(self, x: Tensor) -> Tensor:
        """``[batch, n_layers, n]``: layer l's pre-activations read layer l's input."""
        return torch.einsum("bld,ldn->bln", x, self.W_enc) + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        """``[batch, d_sae]`` latents (layer-major) from ``[batch, n_layers, n]`` pre-activations."""
        return jumprelu(pre.flatten(-2), self.threshold.flatten(), self.bandwidth)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """``[batch, n_layers, d_out]``: each layer's MLP output from the latents of it and of
        every earlier layer."""
        L, n = self.n_layers, self.latents_per_layer
        f = f.unflatten(-1, (L, n))
        y = f.new_zeros(*f.shape[:-2], L, self.out_width)
        for l, W in enumerate(self.W_dec):
            # One GEMM per source layer writes all its target layers at once.
            y[..., l:, :] += (f[..., l, :] @ W.flatten(1)).unflatten(-1, (L - l, self.out_width))
        return y + self.b_dec

    def uses_fused(self, x: Tensor) -> bool:
        """Whether a training step on ``x`` takes the fused path (it cannot give ``x`` a gradient)."""
        return self.fused and self.training and torch.is_grad_enabled() and not x.requires_grad and x.dim() == 3

    def training_output(self, x: Tensor, warmup: float = 1.0, target: Tensor | None = None) -> TrainOutput:
        if not self.uses_fused(x):
            return super().training_output(x, warmup, target)
        mse, counts, layer_l0, x_hat = fused_clt_loss(
            x, self.W_enc, self.b_enc, list(self.W_dec), self.b_dec, self.threshold, self.bandwidth,
            self._workspace, autocast_dtype(x, self.W_enc.dtype), target, layer_l0=self.target_l0 is not None,
        )
        B = x.shape[0]
        losses = {"mse": mse, **self.sparsity_terms(counts, layer_l0, B, warmup)}
        losses.update(self.dead_losses(x, x if target is None else target, x_hat))
        counts = counts.detach().flatten()  # layer-major, as the latents are numbered
        self.track_firing(counts, B)
        return TrainOutput(x_hat, losses, counts.sum() / B, counts.long())

    def train(self, mode: bool = True) -> CrossLayerTranscoder:
        if not mode:
            self._workspace.clear()  # give the [L, batch, n] buffers back while evaluating
        return super().train(mode)

    @torch.no_grad()
    def fold_input_scale(self, scale: float | Sequence[float],  # type: ignore[override]
                         target_scale: float | Sequence[float] | None = None) -> None:
        """Make the CLT take raw activations: ``W_enc[l] *= scale[l]``; the output of layer m
        comes out in raw units, ``W_dec[l][:, m - l] /= target_scale[m]``, ``b_dec[m] /=
        target_scale[m]``. A float applies to every layer."""
        s = per_site(scale, self.n_layers, self.W_enc)
        t = s if target_scale is None else per_site(target_scale, self.n_layers, self.W_enc)
        self.W_enc.mul_(s.view(-1, 1, 1))
        for l, W in enumerate(self.W_dec):
            W.div_(t[l:].view(1, -1, 1))
        self.b_dec.div_(t.view(-1, 1))

# -- memory --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CLTMemory:
    """Parameters and training memory of a CLT (and of per-layer transcoders of equal total latents)."""

    decoder_pairs: int
    """Number of (source, target) layer pairs with a decoder: L (L + 1) / 2."""
    parameters: int
    per_layer_transcoder_parameters: int
    """The same latents as L separate transcoders (each decoding to its own layer only)."""
    bytes_per_parameter: int
    """Weights + gradients + Adam's two moments, at the given byte widths."""

    @property
    def training_bytes(self) -> int:
        return self.parameters * self.bytes_per_parameter

    @property
    def ratio_to_per_layer(self) -> float:
        return self.parameters / self.per_layer_transcoder_parameters


def clt_memory(n_layers: int, d_model: int, d_sae: int, weight_bytes: int = 4, optimizer_bytes: int = 8) -> CLTMemory:
    """Memory of training a CLT of ``d_sae`` total latents over ``n_layers`` layers of width
    ``d_model``: weights and gradients at ``weight_bytes`` each, Adam's moments at
    ``optimizer_bytes`` per parameter (8 for fp32, 2 for 8-bit Adam). Activations not included."""
    L, n, d = n_layers, d_sae // n_layers, d_model
    pairs = L * (L + 1) // 2
    small = L * n * 2 + L * d  # b_enc, threshold, b_dec
    clt = L * d * n + pairs * n * d + small
    per_layer = L * d * n + L * n * d + small
    return CLTMemory(pairs, clt, per_layer, 2 * weight_bytes + optimizer_bytes)
