"""Evaluate every SAE of a group the same way, as the Gemma Scope report does.

Reconstruction metrics come from the held-out harvest (every row of it, the same tokens
for every SAE of a site): L0, FVU and explained variance (pooled, about the mean, on raw
activations), never-fire and dense (> 10% of tokens) fractions. The delta LM loss splices
each SAE into the model on ``evaluate.n_contexts`` held-out contexts. The language model
is loaded once per process and shared by every group evaluated there; both run on the
GPU when the suite trains on one.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch

from gs_lightning.data.shard_format import load_shard, read_manifest
from gs_lightning.evaluation.scoring import score
from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.formats.io import load_sae
from gs_lightning.lm.load import shared_language_model
from gs_lightning.lm.text import iter_contexts, iter_texts
from gs_lightning.saes import SAE
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import sparsity_levels
from gs_lightning.suite.training import GroupRun

ROWS_PER_PASS = 8192


def eval_device(config: SuiteConfig) -> torch.device:
    """CUDA when the suite trains on it (``accelerator`` auto, gpu or cuda) and one is present."""
    wants_gpu = config.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _val_rows(inputs: Path, targets: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every held-out row of the input site and of the target site (read once where they are one)."""
    rows: dict[Path, list[torch.Tensor]] = {}
    for folder in dict.fromkeys((inputs, targets)):
        manifest = read_manifest(folder)
        rows[folder] = [load_shard(folder, entry, manifest, verify=True)["acts"] for entry in manifest["shards"]]
    return rows[inputs], rows[targets]


def shard_metrics(sae: SAE, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> dict[str, float]:
    """Pooled reconstruction and firing metrics of ``sae`` over held-out rows (raw activations),
    from :mod:`gs_lightning.evaluation.scoring`."""
    device = next(sae.parameters()).device
    batches = ((x_all[start : start + ROWS_PER_PASS].to(device, torch.float32),
                y_all[start : start + ROWS_PER_PASS].to(device, torch.float32))
               for x_all, y_all in zip(inputs, targets) for start in range(0, len(x_all), ROWS_PER_PASS))
    scores = score(sae, batches)
    return {**{k: scores[k] for k in ("l0", "fvu", "explained_variance", "dead_frac", "dense_frac")},
            "eval_tokens": scores["tokens"]}


def evaluate_group(config: SuiteConfig, run: GroupRun) -> list[dict[str, Any]]:
    """One row per SAE of the group ``run`` plans: its place in the suite and its metrics."""
    device = eval_device(config)
    inputs, targets = _val_rows(*run.val_shards)
    model, tokenizer = shared_language_model(config.model, config.revision, config.model_dtype)  # type: ignore[arg-type]
    model.to(device)
    texts = iter_texts(config.text, split=config.val_split, column=config.text_column)
    contexts = list(itertools.islice(iter_contexts(texts, tokenizer, config.context_size), config.evaluate.n_contexts))
    group, site = run.group, run.group.site
    key, levels = sparsity_levels(group.width)
    rows = []
    for (name, path), level in zip(run.members.items(), levels):
        sae = load_sae(path, device=device)
        row: dict[str, Any] = {
            "group": group.id, "site": site.label, "kind": site.kind, "layer": site.layer,
            "d_sae": group.width.d_sae, "sparsity_key": key, "sparsity": level, "member": name,
            "sae": str(Path(path).relative_to(config.output)),
        }
        row.update(shard_metrics(sae, inputs, targets))
        spliced = delta_lm_loss(model, tokenizer, sae, site.target or site.site, contexts, config.evaluate.batch_size,
                                source_site=site.site if site.target else None)
        row.update({k: spliced[k] for k in ("delta_loss", "kl", "loss_recovered", "ce_clean", "ce_spliced")})
        rows.append(row)
    return rows
