"""What a latent writes: its decoder direction through the unembedding, and its nearest latents.

Both are batched over latents so that ``[chunk, vocab]`` or ``[chunk, d_sae]`` is the
largest block held: 16k latents against a 256k vocabulary fit in a few hundred MiB.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gs_lightning.lm.sites import parse_site, resolve_site

CHUNK_ELEMENTS = 1 << 24
"""Scores held at once (64 MiB in float32)."""

# Where Hugging Face causal LMs keep the norm applied before the unembedding.
_FINAL_NORM_PATHS = ("model.norm", "model.language_model.norm", "model.model.norm", "transformer.ln_f",
                     "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")


def decoder_data(sae_W_dec: Tensor, model: nn.Module | None, site: str, n_logits: int = 10,
                 n_neighbours: int = 5) -> dict[str, Tensor]:
    """Nearest latents, and logit effects where the site and the model allow them: the
    tensors :attr:`gs_lightning.browse.LatentData.extras` holds."""
    out = nearest_latents(sae_W_dec, n_neighbours)
    if model is not None:
        W_U = unembedding(model)
        directions = residual_directions(model, site, sae_W_dec.float())
        if W_U is not None and directions is not None and directions.shape[1] == W_U.shape[1]:
            out.update(logit_effects(directions, W_U, n_logits))
    return out


def residual_directions(model: nn.Module, site: str, W_dec: Tensor) -> Tensor | None:
    """Decoder rows as directions in the residual stream, or None where a site's vectors
    do not live there (an MLP input, a module path: unknown).

    The site's kind says how (:attr:`gs_lightning.lm.sites.SiteKind.to_residual`): the residual
    stream after a layer and MLP outputs are in it already, ``attn.hook_z`` goes through
    the attention output projection's weight; norms after that projection (Gemma 2's
    post-attention norm) are ignored, so the effect there is approximate.
    """
    kind = parse_site(site).kind
    to_residual = kind.to_residual if kind else None
    if to_residual == "identity":
        return W_dec
    if to_residual == "module_weight":
        module, _ = resolve_site(model, site)
        if isinstance(module, nn.Linear):
            return W_dec @ module.weight.detach().float().T
    return None


def unembedding(model: nn.Module) -> Tensor | None:
    """``W_U [vocab, d_model]`` with the final norm's per-channel scale folded in (as
    TransformerLens' ``fold_ln`` does), or None for a model without an output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        return None
    W_U = head.weight.detach().float()
    scale = _norm_scale(model, W_U.shape[1])
    return W_U if scale is None else W_U * scale


def _norm_scale(model: nn.Module, d: int) -> Tensor | None:
    """The per-channel gain of the final norm, measured rather than read from its weights
    (Gemma's RMSNorm multiplies by ``1 + weight``, Llama's by ``weight``, LayerNorm adds a
    bias): for a zero-mean, unit-RMS probe ``x`` both norms give ``gain * x + bias``."""
    norm = None
    for path in _FINAL_NORM_PATHS:
        try:
            norm = model.get_submodule(path)
            break
        except AttributeError:
            continue
    if norm is None or d % 2:
        return None
    param = next(norm.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else "cpu"
    probe = torch.ones(d, device=device)
    probe[1::2] = -1
    with torch.no_grad():
        out = norm(probe.to(dtype)[None]).float()[0] - norm(torch.zeros(1, d, dtype=dtype, device=device)).float()[0]
    return (out / probe).cpu()


@torch.no_grad()
def logit_effects(directions: Tensor, W_U: Tensor, n: int = 10) -> dict[str, Tensor]:
    """Top ``n`` promoted and suppressed tokens per latent: ``directions @ W_U.T``.

    Returns ``promoted_ids/values`` and ``suppressed_ids/values`` (``[d_sae, n]``; suppressed
    values are the most negative, ascending).
    """
    directions, W_U = directions.float(), W_U.float().to(directions.device)
    chunk = max(1, CHUNK_ELEMENTS // W_U.shape[0])
    parts: dict[str, list[Tensor]] = {k: [] for k in ("promoted_ids", "promoted_values", "suppressed_ids",
                                                      "suppressed_values")}
    n = min(n, W_U.shape[0])
    for a in range(0, len(directions), chunk):
        scores = directions[a : a + chunk] @ W_U.T
        top, low = scores.topk(n, dim=1), scores.topk(n, dim=1, largest=False)
        parts["promoted_values"].append(top.values)
        parts["promoted_ids"].append(top.indices)
        parts["suppressed_values"].append(low.values)
        parts["suppressed_ids"].append(low.indices)
    return {k: torch.cat(v).cpu() for k, v in parts.items()}


@torch.no_grad()
def nearest_latents(W_dec: Tensor, n: int = 5) -> dict[str, Tensor]:
    """Per latent, the ``n`` other latents of highest decoder cosine similarity:
    ``neighbour_ids`` and ``neighbour_cosines`` (``[d_sae, n]``, descending)."""
    unit = nn.functional.normalize(W_dec.float(), dim=1)
    d_sae = len(unit)
    n = min(n, d_sae - 1)
    chunk = max(1, CHUNK_ELEMENTS // d_sae)
    ids, cosines = [], []
    for a in range(0, d_sae, chunk):
        sims = unit[a : a + chunk] @ unit.T
        rows = torch.arange(len(sims), device=sims.device)
        sims[rows, rows + a] = -torch.inf  # not its own neighbour
        best = sims.topk(n, dim=1)
        ids.append(best.indices)
        cosines.append(best.values)
    return {"neighbour_ids": torch.cat(ids).cpu(), "neighbour_cosines": torch.cat(cosines).cpu()}
