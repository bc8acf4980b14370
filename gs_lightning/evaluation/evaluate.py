"""``python -m gs_lightning evaluate``: measure saved SAEs as the Gemma Scope report does.

For each SAE folder (written by ``callbacks.SaveSAE``): L0, FVU and explained variance
(pooled, about the mean, on raw activations), dead fraction (latents that never fire on
the evaluation tokens), dense fraction (latents firing on over 10% of them),
and delta LM loss / KL / loss recovered with the SAE spliced into the model. The model,
site and text come from each SAE's ``config.json``; results go to a CSV and a JSON table.

An SAE trained on a synthetic world's harvest (or any SAE, given ``--shards``) is scored
on the world's rows instead, against its true features (:mod:`gs_lightning.evaluation.ground_truth`):
MCC, uniqueness, precision, recall, F1 and shrinkage beside L0, FVU and the dead fraction;
there is no language model, so no delta LM loss.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jsonargparse import CLI
from tqdm import tqdm

from gs_lightning.data.ground_truth import (
    GROUND_TRUTH,
    read_ground_truth,
    world_batches,
)
from gs_lightning.data.shard_format import read_manifest
from gs_lightning.errors import ConfigError
from gs_lightning.evaluation.ground_truth import GroundTruthScorer
from gs_lightning.evaluation.metrics import explained_variance
from gs_lightning.evaluation.plots import plot_density, plot_frontier
from gs_lightning.evaluation.replacement import (
    ReplacementPart,
    clean_metrics,
    replacement_metrics,
)
from gs_lightning.evaluation.scoring import ReconstructionScorer, score
from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.formats.io import load_sae, load_sae_config, sae_paths
from gs_lightning.lm.load import shared_language_model
from gs_lightning.lm.sites import ActivationExtractor, site_span
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts
from gs_lightning.saes import SAE

COLUMNS = ("sae", "site", "d_sae", "l0", "fvu", "explained_variance", "dead_frac", "dense_frac", "delta_loss",
           "kl", "loss_recovered", "ce_clean", "ce_spliced", "ce_zero_ablated", "tokens",
           "mcc", "uniqueness", "precision", "recall", "f1", "shrinkage")
WORLD_BATCH_ROWS = 4096
"""Rows of a world scored at a time (their true activations are made dense a batch at a time)."""


def reconstruction_metrics(sae: SAE, model: Any, tokenizer: Any, site: str, contexts: list[torch.Tensor],
                           batch_size: int, target_site: str | None = None) -> dict[str, Any]:
    """Pooled L0, FVU, explained variance, dead and dense fractions and per-latent firing
    rate (``density``) of ``sae`` on the content tokens of ``contexts``
    (:mod:`gs_lightning.evaluation.scoring`); a transcoder reads ``site`` and is scored on ``target_site``."""
    scores = score(sae, _activation_batches(model, tokenizer, site, contexts, batch_size, target_site))
    return {k: scores[k] for k in ("l0", "fvu", "explained_variance", "dead_frac", "dense_frac", "density", "tokens")}


@torch.no_grad()
def _activation_batches(model: Any, tokenizer: Any, site: str, contexts: list[torch.Tensor], batch_size: int,
                        target_site: str | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(input, target)`` activations of the content tokens of ``contexts``, a batch of contexts at a time."""
    device = next(model.parameters()).device
    sites = [site] if target_site is None else [site, target_site]
    with ActivationExtractor(model, sites) as extract:
        for start in range(0, len(contexts), batch_size):
            ids = torch.stack(contexts[start : start + batch_size]).to(device)
            acts = extract(ids)
            mask = content_mask(ids, tokenizer)
            yield acts[site][mask].float(), acts[sites[-1]][mask].float()


def evaluate(
    saes: str | list[str],
    output: str = "evaluation",
    n_contexts: int = 128,
    batch_size: int = 8,
    context_size: int | None = None,
    together: bool = False,
    shards: str | None = None,
    n_rows: int = 100_000,
) -> list[dict[str, Any]]:
    """Evaluate saved SAEs on held-out text and write ``<output>.csv`` and ``<output>.json``.

    A dictionary over stacked sites (a cross-layer transcoder) is scored as a replacement
    model: every site it writes replaced at once; its JSON row adds ``fvu_sites`` and
    ``l0_sites`` (FVU per written site, L0 per read site).

    Args:
        saes: Saved SAE folders (each with sae.safetensors and config.json): one path, a list
            ``"[a, b]"``, or a quoted glob ``"runs/*/sae"``.
        output: Path prefix of the results: ``.csv``, ``.json``, ``_frontier.png`` (L0 against FVU
            and delta LM loss) and ``_density.png`` (feature density histogram).
        n_contexts: Held-out contexts per SAE (from the split the SAE's data validated on).
        batch_size: Contexts per forward pass.
        context_size: Tokens per context; default: the context size the SAE was trained with.
        together: Score all the SAEs as one replacement model (e.g. one transcoder per layer,
            to compare with a cross-layer transcoder): every site any of them writes replaced at
            once, one row. They must share a model and write different sites.
        shards: The site folder of a synthetic world's harvest (``python -m gs_lightning harvest
            --world ...``): score every SAE on its rows against its true features (MCC,
            uniqueness, precision, recall, F1, shrinkage; no delta LM loss). Default: an SAE
            trained on a world harvest is scored on the folder it was trained on.
        n_rows: Rows of a world harvest to score on: its last ones (the trailing shards, which
            training holds out for validation unless told otherwise).
    """
    paths = sae_paths(saes)
    if together and shards is not None:
        raise ConfigError("--together scores a language model's replacement model; --shards scores "
                          "SAEs one by one on a world's rows: drop one of them")
    if together:
        rows, densities = _evaluate_together(paths, n_contexts, batch_size, context_size)
    else:
        rows, densities = [], {}
        for path in tqdm(paths, desc="evaluate", unit="sae"):
            world = _world_folder(path, shards)
            row = (_evaluate_one(path, n_contexts, batch_size, context_size) if world is None
                   else world_row(path, load_sae(path), world, n_rows))
            densities[str(path)] = row.pop("density")
            rows.append(row)
    _write_table(rows, Path(output))
    frontier = plot_frontier(rows, Path(f"{output}_frontier.png"))
    density = plot_density(densities, Path(f"{output}_density.png"))
    print(f"wrote {frontier} and {density}")
    return rows


def _contexts(meta: dict[str, Any], tokenizer: Any, n_contexts: int, context_size: int | None) -> list[torch.Tensor]:
    """Held-out contexts from the split the SAE's data validated on."""
    texts = iter_texts(meta["text"], split=meta.get("val_split", "validation"), column=meta.get("text_column", "text"))
    return list(itertools.islice(iter_contexts(texts, tokenizer, context_size or meta["context_size"]), n_contexts))


def _evaluate_one(path: str, n_contexts: int, batch_size: int, context_size: int | None) -> dict[str, Any]:
    """One SAE's row, with its per-latent ``density``."""
    meta = _metadata(path)
    model, tokenizer = shared_language_model(meta["model"], meta.get("revision"))  # loaded once per model
    contexts = _contexts(meta, tokenizer, n_contexts, context_size)
    sae = load_sae(path)
    if sae.stacked_sites is not None:
        return _replacement_row([_part(path, sae, meta)], model, tokenizer, contexts, batch_size, str(path))
    target_site = meta.get("target_site")  # a transcoder reads site, replaces target_site
    row: dict[str, Any] = {"sae": str(path), "site": meta["site"] if target_site is None
                           else f"{meta['site']} -> {target_site}", "d_sae": sae.d_sae}
    row.update(reconstruction_metrics(sae, model, tokenizer, meta["site"], contexts, batch_size, target_site))
    spliced = delta_lm_loss(model, tokenizer, sae, target_site or meta["site"], contexts, batch_size,
                            source_site=meta["site"] if target_site else None)
    row.update({k: spliced[k] for k in COLUMNS if k in spliced})
    return row


def _world_folder(path: str, shards: str | None) -> str | None:
    """The world harvest to score ``path`` on: ``shards``, else the folder the SAE was trained
    on when that holds a world's ground truth; None for an SAE of a language model."""
    if shards is not None:
        return shards
    if not Path(path, "config.json").is_file():
        return None  # _metadata says what is missing
    meta = load_sae_config(path).get("metadata", {})
    source = meta.get("source")
    folder = source[0] if isinstance(source, list) and source else source
    if meta.get("model") is None and isinstance(folder, str) and read_ground_truth(folder) is not None:
        return folder
    return None


@torch.no_grad()
def world_row(path: str, sae: SAE, folder: str, n_rows: int) -> dict[str, Any]:
    """One SAE's row on the last ``n_rows`` rows of the world harvest ``folder``: its scores
    against the world's truth, FVU, dense fraction and per-latent firing rate (``density``)."""
    truth = read_ground_truth(folder)
    if truth is None:
        raise ConfigError(f"{folder}: no {GROUND_TRUTH}; --shards takes the site folder of a synthetic world's "
                          "harvest (python -m gs_lightning harvest --world ...)")
    width = truth.features.shape[1]
    if sae.stacked_sites is not None or sae.is_transcoder or sae.d_in != width:
        raise ConfigError(f"{path}: a world of width {width} is scored with a one-site SAE (not a transcoder) "
                          f"of d_in={width}; this {type(sae).__name__} has d_in={sae.d_in}, d_out={sae.d_out}")
    scorer, reconstruction = GroundTruthScorer(sae.W_dec, truth.features), ReconstructionScorer(sae)
    for batch in world_batches(folder, n_rows, WORLD_BATCH_ROWS):
        f = sae.encode(batch.acts)
        x_hat = sae.decode(f, batch.acts)
        scorer.update(batch.acts, x_hat, f, batch.true_acts)
        reconstruction.update(batch.acts, x_hat, f)
    scores, stats = scorer.compute()._asdict(), reconstruction.compute()
    print(f"{path}: no delta LM loss (scored on the synthetic world {folder}, which has no language model)")
    return {"sae": str(path), "site": read_manifest(folder)["site"], "d_sae": sae.d_sae, **scores,
            "fvu": 1.0 - scores["explained_variance"], "dense_frac": float(stats["dense_frac"]),
            "density": stats["density"]}


def _part(path: str, sae: SAE, meta: dict[str, Any]) -> ReplacementPart:
    """The saved dictionary with the sites it reads and writes, from its metadata."""
    if sae.stacked_sites is not None:
        inputs = meta.get("input_sites")
        if not inputs:
            raise ConfigError(f"{path}/config.json: metadata lacks input_sites (the sites the dictionary stacks)")
        return ReplacementPart(sae, list(inputs), list(meta.get("target_sites") or inputs), name=str(path))
    return ReplacementPart(sae, [meta["site"]], [meta.get("target_site") or meta["site"]], name=str(path))


def _replacement_row(parts: list[ReplacementPart], model: Any, tokenizer: Any, contexts: list[torch.Tensor],
                     batch_size: int, name: str) -> dict[str, Any]:
    try:
        metrics = replacement_metrics(model, tokenizer, parts, contexts, batch_size)
    except ConfigError as err:  # e.g. an acausal crosscoder, or sites splicing cannot replace
        print(f"{name}: no delta LM loss ({err})")
        metrics = clean_metrics(model, tokenizer, parts, contexts, batch_size)
    reads = [s for p in parts for s in p.input_sites]
    writes = [s for p in parts for s in p.output_sites]
    row = {"sae": name, "site": f"{site_span(reads)} -> {site_span(writes)}" if reads != writes else site_span(reads),
           "d_sae": sum(p.sae.d_sae for p in parts), "explained_variance": explained_variance(metrics["fvu"]),
           **({"ce_spliced": metrics["ce_replaced"]} if "ce_replaced" in metrics else {}), **metrics}
    print(f"{name}: FVU per site " + ", ".join(f"{s} {v:.4g}" for s, v in metrics["fvu_sites"].items()))
    print(f"{name}: L0 per site " + ", ".join(f"{s} {v:.4g}" for s, v in metrics["l0_sites"].items()))
    return row


def _evaluate_together(paths: list[str], n_contexts: int, batch_size: int,
                       context_size: int | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row: every SAE of ``paths`` in one replacement model."""
    metas = [_metadata(path) for path in paths]
    models = {(m["model"], m.get("revision")) for m in metas}
    if len(models) > 1:
        raise ConfigError(f"--together needs SAEs of one model; got {sorted(str(m) for m in models)}")
    model, tokenizer = shared_language_model(metas[0]["model"], metas[0].get("revision"))
    contexts = _contexts(metas[0], tokenizer, n_contexts, context_size)
    parts = [_part(path, load_sae(path), meta) for path, meta in zip(paths, metas)]
    row = _replacement_row(parts, model, tokenizer, contexts, batch_size, "together: " + ", ".join(paths))
    return [row], {row["sae"]: row.pop("density")}



def _metadata(path: str) -> dict[str, Any]:
    if not Path(path, "config.json").is_file():
        raise ConfigError(f"not a saved SAE: {Path(path, 'config.json')} is missing")
    meta = load_sae_config(path).get("metadata", {})
    missing = [k for k in ("model", "site", "text", "context_size") if not meta.get(k)]
    if missing:
        raise ConfigError(f"{path}/config.json: metadata lacks {missing}; was it trained on live activations? "
                          "(an SAE of a synthetic world is scored with --shards <the world harvest's site folder>)")
    return meta


def _write_table(rows: list[dict[str, Any]], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    output.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(", ".join(f"{k} {row[k]:.4g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in COLUMNS
                        if k in row))
    print(f"wrote {output.with_suffix('.csv')} and {output.with_suffix('.json')}")


def evaluate_main(args: list[str]) -> list[dict[str, Any]]:
    """Entry point of ``python -m gs_lightning evaluate``; returns the table's rows."""
    return CLI(evaluate, args=args, as_positional=False, prog="python -m gs_lightning evaluate")
