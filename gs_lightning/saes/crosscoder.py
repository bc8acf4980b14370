"""Crosscoder with JumpReLU latents: one dictionary that reads and reconstructs N stacked sites.

A crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing", https://transformer-circuits.pub/2024/crosscoders/index.html) reads the
activations ``x_s`` of several sites of the same token (here: ``[batch, n_sites, d_in]``, the
stacked folders of one harvest) and reconstructs every one of them from one set of latents.
Two causal structures are offered (``causality``):

``"acausal"`` (the note's basic crosscoder): every latent reads every site and writes to
every site::

    pre     = b_enc + sum_s x_s @ W_enc[s]                 W_enc.0: [S, d_in, d_sae]
    x_hat_s = b_dec[s] + f @ W_dec[:, s]                   W_dec.0: [d_sae, S, d_in]

``"weakly_causal"``: the ``d_sae`` latents are split evenly over the sites, ``n = d_sae / S``
per site, numbered site-major like the CLT's (latent ``l * n + i`` is latent ``i`` of site
``l``). A latent of site ``l`` reads site ``l`` alone and writes to site ``l`` and every later
site::

    pre_l   = b_enc[l] + x_l @ W_enc[l]                    W_enc.{l}: [1, d_in, n]
    x_hat_m = b_dec[m] + sum_{l <= m} f_l @ W_dec[l][:, m - l]   W_dec.{l}: [n, S - l, d_in]

So perturbing ``x_s`` changes only the reconstructions of sites ``>= s``. The weights a mask
would zero (a latent reading another site than its own, or writing to an earlier one) do
not exist: the weights are the CLT's, but the sites read and the sites reconstructed are the
same ones. Sources for this form: in the crosscoders note's weakly causal experiments each
latent has one encoder layer, reads that layer only, and reconstructs it and all later
layers; Kamath et al. 2025 ("Tracing Attention Computation Through Attention QK",
https://transformer-circuits.pub/2025/attention-qk/index.html) use weakly causal
crosscoders defined the same way (read the residual stream at layer L, reconstruct layers
L to the last). McDougall et al. 2025 (Gemma Scope 2; "Announcing Gemma Scope 2",
LessWrong) ship weakly causal crosscoders over 4 concatenated layers but, in what we could
find, do not spell out which weights are masked; we assume Anthropic's definition. A
broader reading in which a latent of site ``l`` reads every site ``<= l`` is not what either
Anthropic source describes and is not implemented.

The training recipe is Gemma Scope's JumpReLU one: the reconstruction loss is the squared
error summed over ``d_in`` and over sites, averaged over tokens; the sparsity term is lambda
times the number of active latents per token (with ``target_l0``: the quadratic penalty
around the target, per token, for the whole dictionary when acausal and per site's latents,
summed over sites, when weakly causal, as the CLT does). Anthropic's crosscoders weight each
latent's sparsity penalty by the sum over sites of its decoder norms and leave those norms
free; here each latent's decoder, concatenated over the sites it writes to, is kept at unit
norm (as a JumpReLU SAE's decoder row and the CLT's decoders are), so every active latent
costs the same. An acausal crosscoder is then exactly a JumpReLU SAE on the concatenated
sites, with one input scale per site.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from gs_lightning.kernels.functional import jumprelu
from gs_lightning.saes.blocked import BlockedJumpReLU, per_site
from gs_lightning.saes.jumprelu import recipe_defaults

Causality = Literal["acausal", "weakly_causal"]


class Crosscoder(BlockedJumpReLU):
    """A JumpReLU crosscoder over ``n_sites`` stacked sites, acausal or weakly causal (see the
    module docstring for the maths and sources).

    Inputs and reconstructions are ``[batch, n_sites, d_in]`` (as
    :class:`~gs_lightning.data.AlignedShardsDataModule` yields them with ``input_paths`` only);
    latents are ``[batch, d_sae]``.

    Args:
        n_sites: Number of stacked sites S it reads and reconstructs, in order (site s is the
            s-th folder of the data's ``input_paths``; weakly causal: earliest layer first).
        d_in: Width of every site.
        d_sae: Total number of latents (weakly causal: a multiple of n_sites, split evenly).
        causality: ``acausal``: every latent reads and writes every site; ``weakly_causal``:
            a latent of site l reads site l only and writes sites l..S-1.
        sparsity_coefficient: lambda, the weight of the sparsity term (after warm-up).
        bandwidth: eps of the rectangle kernel; None picks ``encoder_init_scale / sqrt(d_in)``,
            the typical initial pre-activation when every site has unit mean squared norm.
        threshold_init: Initial threshold of every latent; None picks ``bandwidth / 10``
            (with the default bandwidth).
        encoder_init_scale: Norm of each encoder column at initialisation; None picks
            ``2 S d_in / d_sae``, the JumpReLU SAE default on the concatenated sites. Encoders
            start tied to the decoder's part on the sites they read.
        target_l0: Train towards this L0 with the per-token quadratic penalty ``lambda mean_b
            (2 / T) (l0_b - T)^2`` (weakly causal: per site's latents, summed over sites);
            None keeps the L0 term ``lambda mean_b l0_b``.
        dead_coefficient: Weight of the pre-activation loss on dead latents (thresholds
            only), as :class:`~gs_lightning.saes.JumpReLUSAE`'s; 0 disables.
        aux_coefficient: Weight of AuxK on dead latents: the ``aux_k`` largest ``relu(pre)``
            of each token's dead latents reconstruct the residual of every site, each through
            its decoder over the sites it writes; 0 disables.
        aux_k: Dead latents per token in the AuxK reconstruction.
        dead_tokens: A latent that has not fired for this many training tokens is dead.
    """

    def __init__(
        self,
        n_sites: int,
        d_in: int,
        d_sae: int,
        causality: Causality = "acausal",
        sparsity_coefficient: float = 1e-3,
        bandwidth: float | None = None,
        threshold_init: float | None = None,
        encoder_init_scale: float | None = None,
        target_l0: float | None = None,
        dead_coefficient: float = 0.1,
        aux_coefficient: float = 1.0,
        aux_k: int = 256,
        dead_tokens: int = 32_768,
    ) -> None:
        if causality not in get_args(Causality):
            raise ValueError(f"causality={causality!r} is not one of {', '.join(get_args(Causality))}")
        if n_sites < 1:
            raise ValueError(f"n_sites={n_sites} must be >= 1")
        if causality == "weakly_causal" and d_sae % n_sites:
            raise ValueError(f"d_sae={d_sae} must be a multiple of n_sites={n_sites} for a weakly causal crosscoder")
        # JumpReLU's SAE default on the concatenated sites, 2 S d_in / d_sae; sigma0 = scale /
        # sqrt(d_in) (not sqrt(S d_in)) as each site, not the concatenation, has unit mean
        # squared norm under the default scaling.
        scale = 2 * n_sites * d_in / d_sae if encoder_init_scale is None else encoder_init_scale
        scale, bandwidth, threshold_init = recipe_defaults(d_in, d_sae, False, scale, bandwidth, threshold_init)
        # Read by make_parameters, which the parent's constructor calls.
        self.n_sites = n_sites
        self.causality = causality
        super().__init__(d_in, d_sae, normalize_decoder=True, encoder_init_scale=scale)
        self.sparsity_coefficient = sparsity_coefficient
        self.bandwidth = bandwidth
        self.threshold_init = threshold_init
        self.encoder_init_scale = scale
        self.target_l0 = target_l0
        self.init_remedies(dead_coefficient, aux_coefficient, aux_k, dead_tokens)
        with torch.no_grad():
            self.raw_threshold.fill_(threshold_init)

    # -- shapes -------------------------------------------------------------------------

    @property
    def blocks(self) -> list[tuple[slice, slice]]:
        """Per block of latents (equal sizes, in latent order): the sites it reads and the
        sites it writes. Acausal: one block, all sites both ways; weakly causal: block l
        reads ``[l]`` and writes ``[l, S)``."""
        S = self.n_sites
        if self.causality == "acausal":
            return [(slice(0, S), slice(0, S))]
        return [(slice(l, l + 1), slice(l, S)) for l in range(S)]

    def block_encoder(self, k: int) -> tuple[Tensor, Tensor]:
        n = self.latents_per_block
        return self.W_enc[k], self.b_enc[k * n : (k + 1) * n]

    @property
    def latents_per_block(self) -> int:
        """Latents per block: d_sae (acausal) or d_sae / n_sites (weakly causal)."""
        return self.d_sae // len(self.blocks)

    @property
    def stacked_sites(self) -> int:  # type: ignore[override]
        return self.n_sites

    def make_parameters(self) -> None:
        n, d = self.d_sae // len(self.blocks), self.d_in
        self.W_enc = nn.ParameterList([nn.Parameter(torch.empty(r.stop - r.start, d, n)) for r, _ in self.blocks])
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.empty(n, w.stop - w.start, d)) for _, w in self.blocks])
        self.b_dec = nn.Parameter(torch.zeros(self.n_sites, d))
        self.register_parameter("W_skip", None)
        # float32 always: bf16 would round the threshold's small Adam updates away.
        self.raw_threshold = nn.Parameter(torch.zeros(self.d_sae, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each latent's decoder (over the sites it writes) a random unit vector; each encoder
        column the decoder's part on the sites it reads, rescaled to norm
        ``encoder_init_scale`` (acausal: ``W_enc = encoder_init_scale * W_dec^T``); biases zero."""
        for W in self.W_dec:
            W.copy_(torch.randn_like(W))
            W.div_(W.flatten(1).norm(dim=1).view(-1, 1, 1))
        for (r, w), W_enc, W_dec in zip(self.blocks, self.W_enc, self.W_dec):
            tied = W_dec[:, r.start - w.start : r.stop - w.start].permute(1, 2, 0)  # [sites read, d, n]
            W_enc.copy_(tied * (self._encoder_init_scale / tied.flatten(0, 1).norm(dim=0)))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- forward ------------------------------------------------------------------------

    def pre_activation(self, x: Tensor) -> Tensor:
        """``[batch, d_sae]``: each block's latents read the sites it is allowed to."""
        if x.dim() < 2 or x.shape[-2:] != (self.n_sites, self.d_in):
            raise ValueError(f"the crosscoder reads [batch, n_sites={self.n_sites}, d_in={self.d_in}] inputs, got "
                             f"shape {list(x.shape)}; set model.sae.init_args.n_sites to the number of input_paths")
        pre = [torch.einsum("...sd,sdn->...n", x[..., r, :], W) for (r, _), W in zip(self.blocks, self.W_enc)]
        return torch.cat(pre, -1) + self.b_enc

    def activation(self, pre: Tensor) -> Tensor:
        return jumprelu(pre, self.threshold, self.bandwidth)

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """``[batch, n_sites, d_in]``: each site from the latents allowed to write it."""
        n = self.latents_per_block
        x_hat = f.new_zeros(*f.shape[:-1], self.n_sites, self.d_in)
        for k, ((_, w), W) in enumerate(zip(self.blocks, self.W_dec)):
            # One GEMM per block writes all its sites at once.
            x_hat[..., w, :] += (f[..., k * n : (k + 1) * n] @ W.flatten(1)).unflatten(-1, W.shape[1:])
        return x_hat + self.b_dec

    @torch.no_grad()
    def fold_input_scale(self, scale: float | Sequence[float],  # type: ignore[override]
                         target_scale: float | Sequence[float] | None = None) -> None:
        """Make the crosscoder take and return raw activations: ``W_enc[.][s] *= scale[s]``
        for every site s a block reads, ``W_dec[.][:, s] /= scale[s]`` and ``b_dec[s] /=
        scale[s]`` for every site it writes. A float applies to every site; ``target_scale``
        (if given) replaces ``scale`` on the output side."""
        s = per_site(scale, self.n_sites, self.b_dec)
        t = s if target_scale is None else per_site(target_scale, self.n_sites, self.b_dec)
        for (r, w), W_enc, W_dec in zip(self.blocks, self.W_enc, self.W_dec):
            W_enc.mul_(s[r].view(-1, 1, 1))
            W_dec.div_(t[w].view(1, -1, 1))
        self.b_dec.div_(t.view(-1, 1))



def crosscoder_parameters(n_sites: int, d_in: int, d_sae: int, causality: Causality = "acausal") -> int:
    """Number of parameters of a crosscoder: encoders and decoders ``2 S d F`` (acausal) or
    ``(1 + (S + 1) / 2) d F`` (weakly causal, ``F / S`` latents per site), plus ``2 F + S d``
    for ``b_enc``, ``threshold`` and ``b_dec``."""
    S, d, F = n_sites, d_in, d_sae
    weights = 2 * S * d * F if causality == "acausal" else d * F + (S * (S + 1) // 2) * (F // S) * d
    return weights + 2 * F + S * d
