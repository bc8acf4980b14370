"""The SAE base class: a variant is one short subclass (activation and sparsity loss).

Parameters carry the papers' names and shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]``. A subclass implements :meth:`SAE.activation`
and :meth:`SAE.sparsity_losses`, stores each constructor argument as an attribute of the
same name (that is how a saved SAE records its config), and may override
:meth:`SAE.auxiliary_losses` (terms that need the input or the reconstruction),
:meth:`SAE.update_statistics` (per-batch training statistics kept in buffers) and
:meth:`SAE.training_output` with a faster path that computes the same numbers.

Any variant can be a transcoder (``d_out``: it reads one site and reconstructs another)
and a skip-transcoder (``skip_connection``: an affine skip path ``x @ W_skip`` added to the
reconstruction, Paulo, Shabalin and Belrose 2025, "Transcoders beat sparse autoencoders
for interpretability"; Gemma Scope 2 ships MLP transcoders with and without it).
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


class TrainOutput(NamedTuple):
    """What one training forward returns to the training module."""

    x_hat: Tensor
    """Reconstruction of the (scaled) input, ``[batch, d_in]``; metrics only."""
    losses: dict[str, Tensor]
    """Named, already weighted loss terms; the training loss is their sum."""
    l0: Tensor
    """Mean number of active latents per token (a detached scalar)."""
    fire_counts: Tensor
    """``[d_sae]``: on how many tokens of the batch each latent was active."""


class SAE(nn.Module):
    """A sparse autoencoder with a linear encoder and a linear decoder.

    Args:
        d_in: Width of the activations the SAE reads.
        d_sae: Number of latents (dictionary size).
        normalize_decoder: Keep decoder rows at unit norm: the gradient component
            parallel to each row is removed before the optimizer step and rows are
            renormalised after it.
        d_out: Width of the reconstruction target; set for a transcoder (which reads one
            site and reconstructs another), default ``d_in`` (an SAE).
        encoder_init_scale: Norm of the encoder columns at initialisation (the decoder rows
            have unit norm either way).
        skip_connection: Add a linear skip path to the reconstruction, ``x_hat = f @ W_dec +
            x @ W_skip + b_dec`` with ``W_skip [d_in, d_out]`` initialised to zero (a
            skip-transcoder; needs ``d_out``).
    """

    training_buffers: tuple[str, ...] = ()
    """Buffers that only training needs (e.g. dead-latent counters): checkpointed with the
    module, left out of the exported weights, and kept as they are when weights are loaded."""

    def __init__(self, d_in: int, d_sae: int, normalize_decoder: bool = True, d_out: int | None = None,
                 encoder_init_scale: float = 1.0, skip_connection: bool = False) -> None:
        super().__init__()
        if d_in <= 0 or d_sae <= 0 or (d_out is not None and d_out <= 0):
            raise ValueError(f"d_in, d_sae and d_out must be positive, got d_in={d_in}, d_sae={d_sae}, d_out={d_out}")
        if encoder_init_scale <= 0:
            raise ValueError(f"encoder_init_scale must be > 0, got {encoder_init_scale}")
        if skip_connection and d_out is None:
            # On an SAE the skip path would learn the identity and leave the latents nothing to do.
            raise ValueError("skip_connection needs d_out (a transcoder); an SAE with a skip path learns the identity")
        self.d_in = d_in
        self.d_sae = d_sae
        self.normalize_decoder = normalize_decoder
        self.d_out = d_out
        self._encoder_init_scale = encoder_init_scale
        self.skip_connection = skip_connection
        self.make_parameters()
        self.reset_parameters()

    def make_parameters(self) -> None:
        """Create the weights (values come from :meth:`reset_parameters`): ``W_enc [d_in, d_sae]``,
        ``b_enc [d_sae]``, ``W_dec [d_sae, out_width]``, ``b_dec [out_width]`` and ``W_skip``
        (None without a skip path). A dictionary of another shape overrides this."""
        width = self.out_width
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(torch.empty(self.d_sae, width))
        self.b_dec = nn.Parameter(torch.zeros(width))
        self.W_skip: nn.Parameter | None
        self.register_parameter("W_skip", nn.Parameter(torch.zeros(self.d_in, width)) if self.skip_connection else None)

    @property
    def out_width(self) -> int:
        """Width of the reconstruction: ``d_out`` for a transcoder, else ``d_in``."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of one token's reconstruction: ``(out_width,)``."""
        return (self.out_width,)

    stacked_sites: int | None = None
    """Number of aligned sites stacked in each input (``[batch, n, d_in]``); None: one site, ``[batch, d_in]``."""

    latent_blocks: int | None = None
    """For a stacked dictionary whose latents come in equal contiguous blocks, one per input
    site (a CLT's layers), the number of blocks: L0 is then also reported per block. None otherwise."""

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Shape of the input (and target) scale that broadcasts over a batch: ``()``, one scalar."""
        return ()

    @property
    def is_transcoder(self) -> bool:
        """Whether this reconstructs another site than it reads (``d_out`` was given)."""
        return self.d_out is not None

    @property
    def weight_names(self) -> tuple[str, ...]:
        """The linear maps and biases every variant has: ``W_enc, b_enc, W_dec, b_dec``
        (and ``W_skip`` for a skip-transcoder)."""
        return ("W_enc", "b_enc", "W_dec", "b_dec") + (("W_skip",) if self.W_skip is not None else ())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Decoder rows: random unit directions; ``W_enc = encoder_init_scale * W_dec^T``
        (a transcoder, whose shapes differ, gets random encoder columns of that norm);
        biases zero; ``W_skip`` zero, so training starts from a plain transcoder and the skip
        path learns only the linear part of the map that the latents leave over (a random
        start would add a dense map to every reconstruction for the decoder to cancel)."""
        self.W_dec.copy_(torch.randn_like(self.W_dec))
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
        if self.W_enc.shape == self.W_dec.t().shape and not self.is_transcoder:
            self.W_enc.copy_(self.W_dec.t())
        else:
            self.W_enc.copy_(torch.randn_like(self.W_enc))
            self.W_enc.div_(self.W_enc.norm(dim=0, keepdim=True))
        self.W_enc.mul_(self._encoder_init_scale)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    # -- the variant's part -------------------------------------------------------------

    def activation(self, pre: Tensor) -> Tensor:
        """Map pre-activations ``[..., d_sae]`` to latent activations ``f``."""
        raise NotImplementedError

    def sparsity_losses(self, pre: Tensor, f: Tensor, warmup: float) -> dict[str, Tensor]:
        """Named sparsity terms, already weighted; ``warmup`` in [0, 1] scales coefficients."""
        raise NotImplementedError

    def auxiliary_losses(self, x: Tensor, pre: Tensor, f: Tensor, x_hat: Tensor, warmup: float) -> dict[str, Tensor]:
        """Named, weighted terms that need the reconstruction target ``x`` (the input for an
        SAE, the other site for a transcoder) or the reconstruction; none by default."""
        return {}

    def update_statistics(self, pre: Tensor, f: Tensor) -> None:
        """Update training statistics from one batch (called without grad, in training mode only)."""

    # -- shared maths ------------------------------------------------------------------

    def pre_activation(self, x: Tensor) -> Tensor:
        """``x @ W_enc + b_enc`` (Gemma Scope does not subtract ``b_dec`` first)."""
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Latent activations ``f`` for inputs ``x [..., d_in]``."""
        return self.activation(self.pre_activation(x))

    def decoder_rows(self) -> Tensor:
        """The directions latents decode along, ``[d_sae, out_width]``: ``W_dec`` (a variant
        whose rows are free but read as normalised returns them divided by their norms)."""
        return self.W_dec

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Reconstruction ``f @ W_dec + b_dec`` (:meth:`decoder_rows`), plus ``x @ W_skip`` for a
        skip-transcoder, which needs the input ``x`` the latents ``f`` were encoded from."""
        x_hat = f @ self.decoder_rows() + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("a skip-transcoder's decode needs the input: call decode(f, x)")
            x_hat = x_hat + x @ self.W_skip
        return x_hat

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of ``x`` (a transcoder's: of its target site)."""
        return self.decode(self.encode(x), x)

    def reconstruction_losses(self, x: Tensor, target: Tensor, f: Tensor, x_hat: Tensor) -> dict[str, Tensor]:
        """Named reconstruction terms for inputs ``x`` whose latents ``f`` reconstruct
        ``target`` as ``x_hat``: ``mse``, ``||target - x_hat||^2`` summed over the model
        dimension and averaged over tokens (Matryoshka variants add one term per prefix)."""
        return {"mse": (x_hat - target).pow(2).sum(-1).mean()}

    def training_output(self, x: Tensor, warmup: float = 1.0, target: Tensor | None = None) -> TrainOutput:
        """Reconstruction, weighted loss terms and sparsity statistics for a batch ``x``;
        a transcoder reconstructs ``target`` (the other site's activations of the same tokens)."""
        target = x if target is None else target
        pre = self.pre_activation(x)
        f = self.activation(pre)
        x_hat = self.decode(f, x)
        losses = {**self.reconstruction_losses(x, target, f, x_hat), **self.sparsity_losses(pre, f, warmup)}
        losses.update(self.auxiliary_losses(target, pre, f, x_hat, warmup))
        if self.training:
            # After the losses: a statistic (e.g. which latents are dead) describes the
            # batches before this one when this batch's loss uses it.
            with torch.no_grad():
                self.update_statistics(pre.detach(), f.detach())
        active = (f != 0).reshape(-1, self.d_sae)
        fire_counts = active.sum(0)
        l0 = fire_counts.sum().float() / active.shape[0]
        return TrainOutput(x_hat, losses, l0, fire_counts)

    # -- optimizer hooks ---------------------------------------------------------------

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter name (``named_parameters``); a parameter not
        named trains at the module's lr. The training module gives each multiplier its own
        Adam parameter group. None by default."""
        return {}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Remove the gradient component parallel to each decoder row."""
        grad = self.W_dec.grad
        if self.normalize_decoder and grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)
            grad.sub_((grad * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Renormalise decoder rows to unit norm."""
        if self.normalize_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))

    # -- saving ------------------------------------------------------------------------

    @torch.no_grad()
    def fold_input_scale(self, scale: float, target_scale: float | None = None) -> None:
        """Make this SAE take raw activations ``x`` where it was trained on ``scale * x``.

        ``pre`` is unchanged (so are thresholds), and the reconstruction comes out in raw
        units: ``W_enc *= scale``, ``W_dec /= target_scale``, ``b_dec /= target_scale``,
        ``W_skip *= scale / target_scale`` (``target_scale`` is the target site's scale for a
        transcoder, else ``scale``).
        """
        out = scale if target_scale is None else target_scale
        self.W_enc.mul_(scale)
        self.W_dec.div_(out)
        self.b_dec.div_(out)
        if self.W_skip is not None:
            self.W_skip.mul_(scale / out)

    def init_args(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this SAE, read from same-named attributes."""
        args = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name == "self":
                continue
            if not hasattr(self, name):
                raise TypeError(
                    f"{type(self).__name__} must store constructor argument {name!r} as an "
                    "attribute of the same name so that a saved SAE can be rebuilt"
                )
            args[name] = getattr(self, name)
        return args

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """Weights under the papers' names (``threshold``, never ``log_threshold``)."""
        return {k: v.detach() for k, v in self.state_dict().items() if k not in self.training_buffers}

    def load_canonical_state_dict(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`canonical_state_dict` (strict: every key but training buffers, right shapes)."""
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if k not in self.training_buffers]
        if missing or unexpected:
            raise RuntimeError(f"{type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}")
