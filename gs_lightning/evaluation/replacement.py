"""The replacement model: every site a set of dictionaries writes, replaced at once.

Circuit-tracing papers score a cross-layer transcoder (CLT) by the "replacement model":
the language model with every MLP output replaced by the CLT's reconstruction in one
forward pass, each layer's latents reading the residual stream *of that replaced pass*
(Ameisen et al. 2025, "Circuit Tracing"; Dunefsky et al. 2024, "Transcoders find
interpretable LLM feature circuits"). Errors compound through the layers, so this delta LM
loss is harsher than splicing one layer at a time. The same figure for a set of per-layer
transcoders (each reading and replacing its own layer) is what a CLT is compared against.

A :class:`ReplacementPart` is one dictionary with the sites it reads (stacked in order)
and the sites its outputs replace. The forward pass runs in layer order, so output ``j``
of a stacked dictionary must not depend on a later input: :func:`check_causal` tests that
on random inputs (a CLT and a weakly causal crosscoder pass, an acausal crosscoder does
not). Inputs not yet reached when an output is needed are zero; causality makes them
irrelevant. Weights are in raw activation units (saved dictionaries have their scales
folded in).

:func:`replacement_metrics` reports, on the content tokens of the given contexts:

* per replaced site: FVU of the reconstruction from clean inputs (pooled, about the mean);
* per read site: L0, the active latents that read it (a CLT's latents of that layer);
* pooled FVU over all replaced sites, total L0, the fractions of latents never firing and
  firing on over 10% of tokens, and each latent's firing rate (``density``);
* the replacement model's clean / replaced / zero-ablated cross-entropy, delta LM loss,
  KL and loss recovered (:func:`gs_lightning.evaluation.splice.spliced_lm_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gs_lightning.errors import ConfigError
from gs_lightning.evaluation.metrics import DENSE_THRESHOLD, FiringStatistics, PooledFVU
from gs_lightning.evaluation.splice import (
    Capture,
    Splice,
    splice_point,
    spliced_lm_loss,
)
from gs_lightning.lm.sites import ActivationExtractor, resolve_site
from gs_lightning.lm.text import content_mask
from gs_lightning.saes import SAE


@dataclass
class ReplacementPart:
    """One dictionary of a replacement model.

    Attributes:
        sae: The dictionary, in raw activation units. A single-site SAE or transcoder reads
            ``[..., d_in]``; a stacked one (``sae.stacked_sites``) reads ``[..., n, d_in]``.
        input_sites: Sites it reads, in stacking order (one for a single-site dictionary).
        output_sites: Sites its outputs replace, in order (one for a single-site dictionary).
        name: A label for tables.
    """

    sae: SAE
    input_sites: list[str]
    output_sites: list[str]
    name: str = ""
    latent_sites: list[str] = field(init=False)
    """The site each block of latents is counted under for L0 (its input site)."""

    def __post_init__(self) -> None:
        stacked = self.sae.stacked_sites
        if stacked is None and (len(self.input_sites), len(self.output_sites)) != (1, 1):
            raise ConfigError(f"{self.name or type(self.sae).__name__} reads one site and writes one; "
                              f"got inputs {self.input_sites} and outputs {self.output_sites}")
        if stacked is not None and len(self.input_sites) != stacked:
            raise ConfigError(f"{self.name or type(self.sae).__name__} stacks {stacked} input sites; "
                              f"got {len(self.input_sites)}: {self.input_sites}")
        outputs = self.sae.out_shape[0] if len(self.sae.out_shape) > 1 else 1
        if len(self.output_sites) != outputs:
            raise ConfigError(f"{self.name or type(self.sae).__name__} writes {outputs} sites; "
                              f"got {len(self.output_sites)}: {self.output_sites}")
        # L0 is counted per input site where latents come in one block per site (a CLT's layers).
        blocked = stacked is None or self.sae.latent_blocks is not None
        self.latent_sites = list(self.input_sites) if blocked else [f"{self.input_sites[0]} .. {self.input_sites[-1]}"]

    def forward(self, inputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Latents ``[N, d_sae]`` and outputs ``[N, n_out, d_out]`` from one ``[N, d_in]``
        tensor per input site."""
        x = inputs[0] if self.sae.stacked_sites is None else torch.stack(list(inputs), dim=-2)
        f = self.sae.encode(x)
        out = self.sae.decode(f, x)
        return f, out.view(out.shape[0], len(self.output_sites), -1)

    def layer_l0(self, f: Tensor) -> Tensor:
        """``[N, n_latent_sites]``: active latents per block of latents (layer-major)."""
        return (f != 0).view(f.shape[0], len(self.latent_sites), -1).sum(-1).float()


def check_causal(part: ReplacementPart, seed: int = 0) -> None:
    """Raise ConfigError unless output ``j`` of ``part`` ignores inputs after ``j`` (in the
    order of ``part.input_sites``): the replacement pass computes it before they exist."""
    n = len(part.input_sites)
    if n == 1:
        return
    g = torch.Generator().manual_seed(seed)
    p = next(part.sae.parameters())
    x = [torch.randn(4, part.sae.d_in, generator=g).to(p) for _ in range(n)]
    _, base = part.forward(x)
    for j in range(min(n, len(part.output_sites)) - 1):
        later = [x[i] if i <= j else 3 * torch.randn(x[i].shape, generator=g).to(p) for i in range(n)]
        _, moved = part.forward(later)
        if not torch.allclose(moved[:, : j + 1], base[:, : j + 1]):
            raise ConfigError(
                f"{part.name or type(part.sae).__name__}: its output for {part.output_sites[j]} depends on inputs "
                f"after {part.input_sites[j]}, so it cannot replace sites in one forward pass (an acausal dictionary)")


class _ReplacementHooks:
    """Capture hooks on every read site, splice hooks on every written site."""

    def __init__(self, model: nn.Module, parts: Sequence[ReplacementPart]) -> None:
        self.parts = list(parts)
        reads = list(dict.fromkeys(s for part in parts for s in part.input_sites))
        # Captures first: on a site both read and written, the capture sees the incoming value.
        self.captures = {site: Capture(*resolve_site(model, site)) for site in reads}
        self.splices: list[Splice] = []
        self.replacements = []
        for p, part in enumerate(self.parts):
            for j, site in enumerate(part.output_sites):
                self.splices.append(Splice(*splice_point(model, site)))
                self.replacements.append(self._replacement(p, j))

    def _replacement(self, p: int, j: int) -> Any:
        def replace(x: Tensor) -> Tensor:
            return self._outputs(p, x)[..., j, :]
        return replace

    def _outputs(self, p: int, like: Tensor) -> Tensor:
        """Part p's outputs from the inputs this pass has reached (later ones zero). Recomputed
        at each site it writes: a CLT of L layers runs L times per pass, which evaluation affords."""
        part = self.parts[p]
        lead = like.shape[:-1]
        flat = [torch.zeros(lead.numel(), part.sae.d_in, device=like.device) if self.captures[s].value is None
                else self.captures[s].value.reshape(-1, part.sae.d_in) for s in part.input_sites]
        _, out = part.forward(flat)
        return out.view(*lead, *out.shape[1:])

    def reset(self) -> None:
        """Forget the previous pass's inputs."""
        for capture in self.captures.values():
            capture.value = None

    def close(self) -> None:
        for hook in [*self.captures.values(), *self.splices]:
            hook.close()


@torch.no_grad()
def clean_metrics(model: nn.Module, tokenizer: Any, parts: Sequence[ReplacementPart], contexts: Sequence[Tensor],
                  batch_size: int = 8) -> dict[str, Any]:
    """Per-site FVU and L0 of ``parts`` on the clean model's activations (content tokens only)."""
    device = next(model.parameters()).device
    written = [s for part in parts for s in part.output_sites]
    read = list(dict.fromkeys(s for part in parts for s in part.latent_sites))
    widths = [part.sae.out_width for part in parts for _ in part.output_sites]
    site_fvu = [PooledFVU(w) for w in widths]
    pooled = PooledFVU(sum(widths))
    firing = [FiringStatistics(part.sae.d_sae, DENSE_THRESHOLD) for part in parts]
    l0_sums = torch.zeros(len(read), dtype=torch.float64)
    inputs = [s for part in parts for s in part.input_sites]
    with ActivationExtractor(model, list(dict.fromkeys([*inputs, *written]))) as extract:
        for start in range(0, len(contexts), batch_size):
            ids = torch.stack(list(contexts[start : start + batch_size])).to(device)
            acts = extract(ids)
            mask = content_mask(ids, tokenizer)
            targets, outputs = [], []
            for part, stats in zip(parts, firing):
                f, out = part.forward([acts[s][mask].float() for s in part.input_sites])
                stats.update(f.cpu())
                for site, value in zip(part.latent_sites, part.layer_l0(f).sum(0).cpu().double()):
                    l0_sums[read.index(site)] += value
                targets += [acts[s][mask].float().cpu() for s in part.output_sites]
                outputs += list(out.cpu().unbind(1))
            for metric, y, y_hat in zip(site_fvu, targets, outputs):
                metric.update(y, y_hat)
            pooled.update(torch.cat(targets, -1), torch.cat(outputs, -1))
    tokens = int(firing[0].tokens)
    l0 = {site: float(v) / tokens for site, v in zip(read, l0_sums)}
    density = torch.cat([s.compute()["density"] for s in firing])
    return {"fvu": float(pooled.compute()), "l0": sum(l0.values()), "dead_frac": float((density == 0).double().mean()),
            "dense_frac": float((density > DENSE_THRESHOLD).double().mean()), "density": density,
            "fvu_sites": {site: float(m.compute()) for site, m in zip(written, site_fvu)}, "l0_sites": l0,
            "tokens": tokens}


@torch.no_grad()
def replacement_lm_loss(model: nn.Module, tokenizer: Any, parts: Sequence[ReplacementPart],
                        contexts: Sequence[Tensor], batch_size: int = 8) -> dict[str, float]:
    """Clean, replaced (every written site at once) and zero-ablated cross-entropy; the keys of
    :func:`gs_lightning.evaluation.splice.spliced_lm_loss` with ``ce_spliced`` named ``ce_replaced``."""
    written = [s for part in parts for s in part.output_sites]
    clash = sorted({s for s in written if written.count(s) > 1})
    if clash:
        raise ConfigError(f"several dictionaries replace {clash}; a replacement model writes each site once")
    device = next(model.parameters()).device
    for part in parts:
        part.sae.to(device).eval()
        check_causal(part)
    hooks = _ReplacementHooks(model, parts)
    try:
        result = spliced_lm_loss(model, tokenizer, hooks.splices, hooks.replacements, contexts, batch_size,
                                 before_forward=hooks.reset)
    finally:
        hooks.close()
    result["ce_replaced"] = result.pop("ce_spliced")
    return result


@torch.no_grad()
def replacement_metrics(model: nn.Module, tokenizer: Any, parts: Sequence[ReplacementPart],
                        contexts: Sequence[Tensor], batch_size: int = 8) -> dict[str, Any]:
    """Per-site FVU and L0 (:func:`clean_metrics`) and the replacement model's delta LM loss
    (:func:`replacement_lm_loss`); ``tokens`` counts the predictions scored."""
    lm = replacement_lm_loss(model, tokenizer, parts, contexts, batch_size)  # checks the parts first
    return {**clean_metrics(model, tokenizer, parts, contexts, batch_size), **lm}
