"""Delta LM loss: the cost, in next-token cross-entropy, of replacing a site by an SAE's reconstruction.

For each batch of contexts the model runs three times: clean, with the site replaced by
the SAE's reconstruction, and with the site zeroed. As in training, BOS/EOS/pad positions
keep their clean activation, and only predictions made from content positions count.

* ``delta_loss = CE(spliced) - CE(clean)`` (Gemma Scope's delta LM loss)
* ``kl = KL(clean || spliced)`` per token
* ``loss_recovered = (CE(zero) - CE(spliced)) / (CE(zero) - CE(clean))``

A transcoder reads ``source_site`` and its output replaces ``site`` (e.g. the MLP input
in, the MLP output replaced): the source is captured earlier in the same forward pass.
:func:`spliced_lm_loss` replaces several sites at once (a replacement model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gs_lightning.errors import ConfigError
from gs_lightning.lm.sites import parse_site, resolve_site
from gs_lightning.lm.text import content_mask
from gs_lightning.saes import SAE


def splice_point(model: nn.Module, site: str) -> tuple[nn.Module, Literal["input", "output"]]:
    """The module a replacement of ``site`` hooks, and on which side (see :func:`resolve_site`)."""
    kind = parse_site(site).kind
    if kind is not None and not kind.spliceable:
        # hook_resid_mid is read at the pre-MLP norm's input: rewriting it there would change
        # what the MLP sees but not the residual stream the layer adds the MLP's output to.
        raise ConfigError(f"site={site!r} cannot be replaced in the model (the residual connection keeps "
                          "the original); reading it is fine (a CLT's input), replacing it gives no delta LM "
                          "loss. Train on blocks.L.hook_resid_pre or hook_resid_post to splice the stream.")
    return resolve_site(model, site)


class Splice:
    """A hook that rewrites the activation at ``module``'s ``io`` side (a :func:`splice_point`)
    at content positions with ``fn(x)``."""

    def __init__(self, module: nn.Module, io: Literal["input", "output"]) -> None:
        self.fn: Callable[[Tensor], Tensor] | None = None
        self.mask: Tensor | None = None
        if io == "output":
            self.handle = module.register_forward_hook(self._on_output)
        else:
            self.handle = module.register_forward_pre_hook(self._on_input, with_kwargs=True)

    def _replace(self, x: Tensor) -> Tensor:
        new = self.fn(x.float()).to(x.dtype)
        return torch.where(self.mask.unsqueeze(-1), new, x)

    def _on_output(self, _module: nn.Module, _args: Any, out: Any) -> Any:
        if self.fn is None:
            return None
        if isinstance(out, tuple):
            return (self._replace(out[0]), *out[1:])
        return self._replace(out)

    def _on_input(self, _module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if self.fn is None:
            return None
        if args:
            return (self._replace(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: self._replace(kwargs[key])}

    def close(self) -> None:
        self.handle.remove()


class Capture:
    """A hook that keeps the latest activation at ``module``'s ``io`` side (a resolved site: a
    transcoder's input)."""

    def __init__(self, module: nn.Module, io: Literal["input", "output"]) -> None:
        self.value: Tensor | None = None
        if io == "output":
            self.handle = module.register_forward_hook(lambda _m, _a, out: self._keep(out))
        else:
            self.handle = module.register_forward_pre_hook(
                lambda _m, args, kwargs: self._keep(args[0] if args else next(iter(kwargs.values()))),
                with_kwargs=True)

    def _keep(self, value: Any) -> None:
        self.value = (value[0] if isinstance(value, tuple) else value).float()

    def close(self) -> None:
        self.handle.remove()


def _next_token_stats(logits: Tensor, ids: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy over kept positions, and the log-probs of those positions."""
    logp = logits[:, :-1].float().log_softmax(-1)[keep]
    targets = ids[:, 1:][keep]
    return -logp.gather(-1, targets.unsqueeze(-1)).sum(), logp


@torch.no_grad()
def delta_lm_loss(
    model: nn.Module, tokenizer: Any, sae: SAE, site: str, contexts: Iterable[Tensor], batch_size: int = 8,
    input_scale: float = 1.0, source_site: str | None = None, target_scale: float | None = None,
) -> dict[str, float]:
    """Clean, spliced and zero-ablated cross-entropy over ``contexts`` (``[T]`` token tensors).

    ``sae`` reads ``input_scale * x`` and its reconstruction is divided by ``input_scale``
    (1.0 for an SAE saved with the scale folded in). A transcoder reads ``source_site``
    (scaled by ``input_scale``) and replaces ``site`` (divided by ``target_scale``).
    """
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    # Both sites are resolved before any hook is placed: a bad one leaves the model untouched.
    target = splice_point(model, site)
    source = resolve_site(model, source_site) if source_site is not None else None
    capture = Capture(*source) if source is not None else None
    splice = Splice(*target)
    out_scale = input_scale if target_scale is None else target_scale
    if capture is None:
        def reconstruct(x: Tensor) -> Tensor:
            return sae(x * input_scale) / out_scale
    else:
        def reconstruct(x: Tensor) -> Tensor:
            return sae(capture.value * input_scale) / out_scale
    try:
        return spliced_lm_loss(model, tokenizer, [splice], [reconstruct], contexts, batch_size)
    finally:
        splice.close()
        if capture is not None:
            capture.close()


@torch.no_grad()
def spliced_lm_loss(
    model: nn.Module, tokenizer: Any, splices: Sequence[Splice], replacements: Sequence[Callable[[Tensor], Tensor]],
    contexts: Iterable[Tensor], batch_size: int = 8, before_forward: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Clean, spliced and zero-ablated cross-entropy with every splice active at once.

    In the spliced run splice i rewrites its site with ``replacements[i]``; in the zero run
    every site is zeroed. ``before_forward`` runs before each forward pass (e.g. to clear
    captured inputs). Keys as :func:`delta_lm_loss`'s.
    """
    device = next(model.parameters()).device
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    tokens = 0
    batch: list[Tensor] = []
    for context in [*contexts, None]:
        if context is not None:
            batch.append(context)
        if batch and (context is None or len(batch) == batch_size):
            ids = torch.stack(batch).to(device)
            tokens += _accumulate(model, tokenizer, splices, replacements, ids, sums, before_forward)
            batch = []
    if tokens == 0:
        raise ValueError("no content tokens to evaluate")
    clean, spliced, zero = (sums[k] / tokens for k in ("clean", "spliced", "zero"))
    return {
        "ce_clean": clean, "ce_spliced": spliced, "ce_zero_ablated": zero, "delta_loss": spliced - clean,
        "kl": sums["kl"] / tokens, "loss_recovered": (zero - spliced) / (zero - clean), "tokens": tokens,
    }


def _accumulate(model: nn.Module, tokenizer: Any, splices: Sequence[Splice],
                replacements: Sequence[Callable[[Tensor], Tensor]], ids: Tensor, sums: dict[str, float],
                before_forward: Callable[[], None] | None) -> int:
    content = content_mask(ids, tokenizer)
    keep = content[:, :-1]  # a prediction counts when it is made from a content position
    for splice in splices:
        splice.mask = content
    runs = {"clean": [None] * len(splices), "spliced": list(replacements), "zero": [torch.zeros_like] * len(splices)}
    logps = {}
    try:
        for name, fns in runs.items():
            for splice, fn in zip(splices, fns):
                splice.fn = fn
            if before_forward is not None:
                before_forward()
            ce, logps[name] = _next_token_stats(model(input_ids=ids).logits, ids, keep)
            sums[name] += float(ce)
    finally:
        for splice in splices:
            splice.fn = None
    clean, spliced = logps["clean"], logps["spliced"]
    sums["kl"] += float((clean.exp() * (clean - spliced)).sum())
    return int(keep.sum())
