"""Optimisation options that JumpReLU and the TopK family share: how the encoder reads its
input, the learning rates of the biases, and the size of each step's gradient.

They come from SAELens' trainer, mapped into this package's units (inputs scaled to
E||x||^2 = 1 where SAELens scales to E||x|| = sqrt(d)); why each one matters is measured in
docs/results/ground_truth.md. An SAE class mixes :class:`RecipeOptions` in before
:class:`~gs_lightning.saes.base.SAE` and calls :meth:`RecipeOptions.init_recipe`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class RecipeOptions:
    """``subtract_decoder_bias``, ``bias_lr_scale``, ``normalize_gradient`` and, for a free
    decoder, ``decoder_init_norm``; mixed in before the SAE class.

    - ``subtract_decoder_bias``: encode ``x - b_dec`` (SAELens' ``apply_b_dec_to_input``).
      The encoder bias is then ``b_enc - b_dec @ W_enc``, computed with autograd, so every
      path that reads :meth:`encoder_bias` trains both biases; saved and exported weights hold
      that folded bias, so every format reads a plain SAE.
    - ``bias_lr_scale``: the learning-rate multiplier of ``b_enc`` (and the class's other
      input-side scalars, such as a threshold) and of ``b_dec``. ``None``: ``1 / sqrt(d_in)``
      and ``1 / sqrt(d_out)``, the lr these have in SAELens' units, where they are ``sqrt(d)``
      times larger while Adam moves every parameter by about lr a step.
    - ``normalize_gradient``: the whole gradient rescaled to unit norm before each step,
      biases counted at their lr multiplier (SAELens' clip at norm 1, which acts on every step
      in its units).
    """

    subtract_decoder_bias: bool
    bias_lr_scale: float | None
    normalize_gradient: bool
    decoder_init_norm: float

    def init_recipe(self, subtract_decoder_bias: bool, bias_lr_scale: float | None, normalize_gradient: bool) -> None:
        """Store the options (after ``SAE.__init__``) and register the encoder-bias conversion."""
        self.subtract_decoder_bias = subtract_decoder_bias
        self.bias_lr_scale = bias_lr_scale
        self.normalize_gradient = normalize_gradient
        # Which form b_enc is in, saved with checkpoints: one written in the other form (or before
        # this option existed, or canonical) is converted on load, so the SAE computes the same thing.
        self.register_buffer("b_dec_subtracted", torch.tensor(subtract_decoder_bias))  # type: ignore[attr-defined]
        self._register_load_state_dict_pre_hook(self._convert_encoder_bias)  # type: ignore[attr-defined]

    @staticmethod
    def check_recipe(subtract_decoder_bias: bool | None, d_out: int | None, bias_lr_scale: float | None,
                     decoder_init_norm: float = 1.0) -> bool:
        """``subtract_decoder_bias`` resolved (``None``: on for an SAE, off for a transcoder);
        a ValueError for a transcoder asked to subtract or a non-positive scale."""
        if subtract_decoder_bias is None:
            subtract_decoder_bias = d_out is None
        if subtract_decoder_bias and d_out is not None:
            raise ValueError("subtract_decoder_bias needs an SAE: a transcoder's b_dec (d_out) is not in the input's space")
        if decoder_init_norm <= 0 or (bias_lr_scale is not None and bias_lr_scale <= 0):
            raise ValueError(f"decoder_init_norm and bias_lr_scale must be > 0, got {decoder_init_norm}, {bias_lr_scale}")
        return subtract_decoder_bias

    # -- the encoder ---------------------------------------------------------------------

    def encoder_bias(self) -> Tensor:
        """The bias of ``pre = x @ W_enc + bias``: ``b_enc``, or with ``subtract_decoder_bias``
        ``b_enc - b_dec @ W_enc`` (differentiable, so every path trains both biases through it)."""
        if not self.subtract_decoder_bias:
            return self.b_enc  # type: ignore[attr-defined]
        return self.b_enc - self.b_dec.to(self.W_enc.dtype) @ self.W_enc  # type: ignore[attr-defined]

    def pre_activation(self, x: Tensor) -> Tensor:
        """``x @ W_enc + b_enc``, or ``(x - b_dec) @ W_enc + b_enc`` with ``subtract_decoder_bias``."""
        return x @ self.W_enc + self.encoder_bias()  # type: ignore[attr-defined]

    def _convert_encoder_bias(self, state: dict[str, Tensor], prefix: str, *_: object) -> None:
        """Load-state-dict pre-hook: bring a ``b_enc`` saved in the other form into this SAE's.

        ``state`` without ``b_dec_subtracted`` holds the plain form (a canonical state dict, or a
        checkpoint from before ``subtract_decoder_bias``)."""
        flag, keys = prefix + "b_dec_subtracted", [prefix + k for k in ("b_enc", "b_dec", "W_enc")]
        saved = bool(state[flag]) if flag in state else False
        state[flag] = torch.tensor(self.subtract_decoder_bias)
        if saved != self.subtract_decoder_bias and all(k in state for k in keys):
            b_enc, b_dec, W_enc = (state[k] for k in keys)
            shift = b_dec.to(W_enc.dtype) @ W_enc
            state[keys[0]] = (b_enc + shift if self.subtract_decoder_bias else b_enc - shift).to(b_enc.dtype)

    def canonical_state_dict(self) -> dict[str, Tensor]:
        """The class's weights with ``b_enc`` in the plain form, ``pre = x @ W_enc + b_enc``
        (``b_dec @ W_enc`` folded in), and without the form's flag."""
        tensors = super().canonical_state_dict()  # type: ignore[misc]
        tensors.pop("b_dec_subtracted", None)
        tensors["b_enc"] = self.encoder_bias().detach().clone()
        return tensors

    # -- the optimizer -------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """As the SAE's; a decoder left free (``normalize_decoder=False``) starts with rows of
        norm ``decoder_init_norm``."""
        super().reset_parameters()  # type: ignore[misc]
        if not self.normalize_decoder:  # type: ignore[attr-defined]
            self.W_dec.mul_(self.decoder_init_norm)  # type: ignore[attr-defined]

    def bias_scales(self) -> tuple[float, float]:
        """The lr multipliers of the input-side biases (``b_enc``, a threshold) and of ``b_dec``."""
        if self.bias_lr_scale is not None:
            return self.bias_lr_scale, self.bias_lr_scale
        return self.d_in**-0.5, self.out_width**-0.5  # type: ignore[attr-defined]

    def lr_scales(self) -> dict[str, float]:
        """``b_enc`` and ``b_dec`` at :meth:`bias_scales` (a class adds its own scalars)."""
        into, out = self.bias_scales()
        return {"b_enc": into, "b_dec": out}

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """The SAE's decoder projection, then, with ``normalize_gradient``, the whole gradient
        rescaled to unit norm, each parameter counted at its :meth:`lr_scales` multiplier."""
        super().before_optimizer_step()  # type: ignore[misc]
        if self.normalize_gradient:
            normalize_gradient(self.named_parameters(), self.lr_scales())  # type: ignore[attr-defined]


def normalize_gradient(named_parameters: Iterable[tuple[str, Tensor]], scales: dict[str, float]) -> None:
    """Divide every gradient by the total norm, each parameter's gradient counted at its
    lr multiplier in ``scales`` (1 where not named), so the norm is the one SAELens' units give."""
    groups: dict[float, list[Tensor]] = {}
    for name, p in named_parameters:
        if p.grad is not None:
            groups.setdefault(scales.get(name, 1.0), []).append(p.grad)
    if not groups:
        return
    squares = []
    for scale, grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a sharded SAE's DTensor
        squares.append((scale * norm.float()) ** 2)
    total = torch.stack(squares).sum().sqrt()
    torch._foreach_div_([g for grads in groups.values() for g in grads], total.clamp(min=torch.finfo(total.dtype).tiny))
