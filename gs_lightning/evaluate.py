"""``python -m gs_lightning evaluate``: measure saved SAEs as the Gemma Scope report does.

For each SAE folder (written by ``callbacks.SaveSAE``): L0, FVU and explained variance
(pooled, about the mean, on raw activations), dead fraction (latents that never fire on
the evaluation tokens), dense fraction (latents firing on over 10% of them),
and delta LM loss / KL / loss recovered with the SAE spliced into the model. The model,
site and text come from each SAE's ``config.json``; results go to a CSV and a JSON table.
"""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from tqdm import tqdm

from gs_lightning.errors import ConfigError
from gs_lightning.io import load_sae, load_sae_config, sae_paths
from gs_lightning.lm import shared_language_model
from gs_lightning.metrics import DENSE_THRESHOLD, FiringStatistics, PooledFVU, explained_variance
from gs_lightning.plots import plot_density, plot_frontier
from gs_lightning.saes import SAE
from gs_lightning.sites import ActivationExtractor
from gs_lightning.splice import delta_lm_loss
from gs_lightning.text import content_mask, iter_contexts, iter_texts

COLUMNS = ("sae", "site", "d_sae", "l0", "fvu", "explained_variance", "dead_frac", "dense_frac", "delta_loss",
           "kl", "loss_recovered", "ce_clean", "ce_spliced", "ce_zero_ablated", "tokens")


@torch.no_grad()
def reconstruction_metrics(sae: SAE, model: Any, tokenizer: Any, site: str, contexts: list[torch.Tensor],
                           batch_size: int, target_site: str | None = None) -> dict[str, Any]:
    """Pooled L0, FVU, explained variance, dead and dense fractions and per-latent firing
    rate (``density``) of ``sae`` on the content tokens of ``contexts``; a transcoder reads
    ``site`` and is scored on ``target_site``."""
    fvu, firing = PooledFVU(sae.out_width), FiringStatistics(sae.d_sae, DENSE_THRESHOLD)
    device = next(model.parameters()).device
    sites = [site] if target_site is None else [site, target_site]
    with ActivationExtractor(model, sites) as extract:
        for start in range(0, len(contexts), batch_size):
            ids = torch.stack(contexts[start : start + batch_size]).to(device)
            acts = extract(ids)
            mask = content_mask(ids, tokenizer)
            x = acts[site][mask].float()
            y = acts[sites[-1]][mask].float()
            f = sae.encode(x)
            fvu.update(y.cpu(), sae.decode(f, x).cpu())
            firing.update(f.cpu())
    stats = firing.compute()
    pooled = float(fvu.compute())
    return {"l0": float(stats["l0"]), "fvu": pooled, "explained_variance": explained_variance(pooled),
            "dead_frac": float(stats["dead_frac"]), "dense_frac": float(stats["dense_frac"]),
            "density": stats["density"], "tokens": int(firing.tokens)}


def evaluate(
    saes: str | list[str],
    output: str = "evaluation",
    n_contexts: int = 128,
    batch_size: int = 8,
    context_size: int | None = None,
) -> list[dict[str, Any]]:
    """Evaluate saved SAEs on held-out text and write ``<output>.csv`` and ``<output>.json``.

    Args:
        saes: Saved SAE folders (each with sae.safetensors and config.json): one path, a list
            ``"[a, b]"``, or a quoted glob ``"runs/*/sae"``.
        output: Path prefix of the results: ``.csv``, ``.json``, ``_frontier.png`` (L0 against FVU
            and delta LM loss) and ``_density.png`` (feature density histogram).
        n_contexts: Held-out contexts per SAE (from the split the SAE's data validated on).
        batch_size: Contexts per forward pass.
        context_size: Tokens per context; default: the context size the SAE was trained with.
    """
    rows, densities = [], {}
    for path in tqdm(sae_paths(saes), desc="evaluate", unit="sae"):
        meta = _metadata(path)
        model, tokenizer = shared_language_model(meta["model"], meta.get("revision"))  # loaded once per model
        texts = iter_texts(meta["text"], split=meta.get("val_split", "validation"),
                           column=meta.get("text_column", "text"))
        contexts = list(itertools.islice(iter_contexts(texts, tokenizer, context_size or meta["context_size"]),
                                         n_contexts))
        sae = load_sae(path)
        target_site = meta.get("target_site")  # a transcoder reads site, replaces target_site
        row: dict[str, Any] = {"sae": str(path), "site": meta["site"] if target_site is None
                               else f"{meta['site']} -> {target_site}", "d_sae": sae.d_sae}
        row.update(reconstruction_metrics(sae, model, tokenizer, meta["site"], contexts, batch_size, target_site))
        densities[str(path)] = row.pop("density")
        spliced = delta_lm_loss(model, tokenizer, sae, target_site or meta["site"], contexts, batch_size,
                                source_site=meta["site"] if target_site else None)
        row.update({k: spliced[k] for k in COLUMNS if k in spliced})
        rows.append(row)
    _write_table(rows, Path(output))
    frontier = plot_frontier(rows, Path(f"{output}_frontier.png"))
    density = plot_density(densities, Path(f"{output}_density.png"))
    print(f"wrote {frontier} and {density}")
    return rows


def _metadata(path: str) -> dict[str, Any]:
    if not Path(path, "config.json").is_file():
        raise ConfigError(f"not a saved SAE: {Path(path, 'config.json')} is missing")
    meta = load_sae_config(path).get("metadata", {})
    missing = [k for k in ("model", "site", "text", "context_size") if not meta.get(k)]
    if missing:
        raise ConfigError(f"{path}/config.json: metadata lacks {missing}; was it trained on live activations?")
    return meta


def _write_table(rows: list[dict[str, Any]], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    output.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(", ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in COLUMNS))
    print(f"wrote {output.with_suffix('.csv')} and {output.with_suffix('.json')}")


def evaluate_main(args: list[str]) -> list[dict[str, Any]]:
    """Entry point of ``python -m gs_lightning evaluate``; returns the table's rows."""
    return CLI(evaluate, args=args, as_positional=False, prog="python -m gs_lightning evaluate")
