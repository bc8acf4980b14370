"""Per-layer transcoders vs skip-transcoders vs a cross-layer transcoder, as replacement models.

On one harvest of the embedded Gemma 2 (``configs/harvest_quickstart_clt.yaml``: every
layer's ``hook_resid_mid`` and ``hook_mlp_out``), three sets of dictionaries with the same
total latents train on the same tokens in the same order (one seeded aligned stream):

* ``transcoders``: one JumpReLU transcoder per layer, ``d_sae / L`` latents each, reading
  ``blocks.l.hook_resid_mid`` and reconstructing ``blocks.l.hook_mlp_out``;
* ``skip_transcoders``: the same with the affine skip path ``x @ W_skip``;
* ``clt``: one cross-layer transcoder of ``d_sae`` latents (``d_sae / L`` per layer).

Each trains toward the same L0 per layer (``target_l0``, the quadratic penalty), so the
totals match. Each set is then the language model's replacement for every MLP output at
once (:mod:`gs_lightning.evaluation.replacement`) on held-out contexts: per-layer FVU and
L0, and the replacement model's delta LM loss. Prints a table per layer and a summary,
writes ``<output>/replacement.json``, and ends with ``result:`` lines:

* ``clt_vs_transcoders_delta_loss``: CLT / per-layer transcoders replacement delta LM loss (< 1: the CLT is better);
* ``clt_vs_skip_transcoders_delta_loss``: the same against the skip-transcoders;
* ``clt_vs_transcoders_l0``: CLT / per-layer transcoders total L0 (near 1: a fair comparison).

Run: ``python benchmarks/replacement.py [--steps 1500] [--target_l0 16] [--output runs/replacement]``
(harvests into ``runs/harvest/kjv_clt`` first if that folder is missing; about 15 minutes on
the 2-core CPU). The trained dictionaries stay in ``<output>/<set>/`` for
``python -m gs_lightning evaluate --together true``.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from jsonargparse import CLI

from callbacks import SaveSAE
from gs_lightning.console import quiet_third_party
from gs_lightning.data import AlignedShardsDataModule, ShardedActivationDataModule
from gs_lightning.evaluation import ReplacementPart, replacement_metrics
from gs_lightning.formats.io import load_sae
from gs_lightning.lm.load import shared_language_model
from gs_lightning.lm.sites import SITE_KINDS
from gs_lightning.lm.text import iter_contexts, iter_texts
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.saes.clt import CrossLayerTranscoder
from gs_lightning.train.module import SAETrainingModule

MODEL = "gs-lightning/tiny-gemma2-kjv"
HARVEST_CONFIG = "configs/harvest_quickstart_clt.yaml"


def _mid(l: int) -> str:
    return SITE_KINDS["resid_mid"].site(l)


def _out(l: int) -> str:
    return SITE_KINDS["mlp_out"].site(l)


def ensure_harvest(harvest: Path, layers: int) -> None:
    """Harvest the CLT sites with the shipped config if any folder is missing."""
    if all((harvest / s / "manifest.json").is_file() for l in range(layers) for s in (_mid(l), _out(l))):
        return
    from gs_lightning.harvest.model import harvest_main

    print(f"harvesting into {harvest} ({HARVEST_CONFIG})", flush=True)
    harvest_main(["--config", HARVEST_CONFIG, "--output", str(harvest)])


def _schedule(steps: int) -> dict[str, Any]:
    """The quickstart's optimiser and warm-ups, scaled to the run's length."""
    return {"lr": 1e-3, "adam_betas": (0.5, 0.999), "lr_decay_fraction": 0.2, "lr_warmup_steps": 100,
            "sparsity_warmup_steps": max(1, steps // 3), "dead_window_tokens": 1_000_000}


def fit(sae: Any, data: Any, steps: int, out: Path) -> tuple[Path, float]:
    """Train ``sae`` for ``steps`` on ``data``; save it (scales folded in) under ``out``."""
    torch.manual_seed(0)
    module = SAETrainingModule(sae, **_schedule(steps))
    saver = SaveSAE(str(out))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[saver], default_root_dir=str(out))
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return saver.saved_path, time.perf_counter() - start


def train_sets(harvest: Path, layers: int, d: int, d_sae: int, target_l0: float, coefficient: float, steps: int,
               batch: int, output: Path) -> dict[str, tuple[list[ReplacementPart], float]]:
    """Train the three sets; ``{set: (parts, training seconds)}``."""
    n = d_sae // layers
    common = {"batch_size": batch, "model": MODEL, "seed": 0, "val_shards": 1, "window_tokens": 262_144}
    sets: dict[str, tuple[list[ReplacementPart], float]] = {}
    clt = CrossLayerTranscoder(layers, d, d_sae, sparsity_coefficient=coefficient, target_l0=target_l0)
    data = AlignedShardsDataModule([str(harvest / _mid(l)) for l in range(layers)],
                                   [str(harvest / _out(l)) for l in range(layers)], **common)
    path, seconds = fit(clt, data, steps, output / "clt")
    sets["clt"] = ([ReplacementPart(load_sae(path), [_mid(l) for l in range(layers)],
                                    [_out(l) for l in range(layers)], name="clt")], seconds)
    for name, skip in (("transcoders", False), ("skip_transcoders", True)):
        parts, total = [], 0.0
        for l in range(layers):
            sae = JumpReLUSAE(d, n, sparsity_coefficient=coefficient, target_l0=target_l0, d_out=d,
                              skip_connection=skip)
            data = ShardedActivationDataModule(str(harvest / _mid(l)), target_path=str(harvest / _out(l)),
                                               **common)
            path, seconds = fit(sae, data, steps, output / name / f"layer{l}")
            parts.append(ReplacementPart(load_sae(path), [_mid(l)], [_out(l)], name=f"{name}[{l}]"))
            total += seconds
        sets[name] = (parts, total)
    return sets


def table(rows: dict[str, dict[str, Any]], layers: int) -> str:
    """Per-layer FVU and L0 and the replacement figures of each set, as Markdown."""
    head = ["set", *(f"FVU[{l}]" for l in range(layers)), *(f"L0[{l}]" for l in range(layers)),
            "L0 total", "FVU pooled", "delta loss", "KL", "loss recovered", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, *(f"{r['fvu_sites'][_out(l)]:.4f}" for l in range(layers)),
                 *(f"{r['l0_sites'][_mid(l)]:.1f}" for l in range(layers)),
                 f"{r['l0']:.1f}", f"{r['fvu']:.4f}", f"{r['delta_loss']:.4f}", f"{r['kl']:.4f}",
                 f"{r['loss_recovered']:.3f}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(steps: int = 1500, batch: int = 1024, d_sae: int = 2048, target_l0: float = 16.0,
         sparsity_coefficient: float = 0.01, layers: int = 4, n_contexts: int = 64, context_size: int = 128,
         harvest: str = "runs/harvest/kjv_clt", output: str = "runs/replacement") -> dict[str, float]:
    """Train and compare the three sets (see the module docstring).

    Args:
        steps: Training steps of every dictionary (all see the same tokens).
        batch: Tokens per step.
        d_sae: Total latents of each set (per layer: d_sae / layers).
        target_l0: L0 each layer's latents are trained toward.
        sparsity_coefficient: Weight of the quadratic L0 penalty.
        layers: Layers of the embedded model spanned (all 4).
        n_contexts: Held-out contexts the replacement models are scored on.
        context_size: Tokens per held-out context.
        harvest: Folder of the CLT harvest (made with configs/harvest_quickstart_clt.yaml if missing).
        output: Where the dictionaries and replacement.json go.
    """
    quiet_third_party()
    out, harvest_path = Path(output), Path(harvest)
    ensure_harvest(harvest_path, layers)
    d = int(json.loads((harvest_path / _mid(0) / "manifest.json").read_text())["d"])
    sets = train_sets(harvest_path, layers, d, d_sae, target_l0, sparsity_coefficient, steps, batch, out)
    model, tokenizer = shared_language_model(MODEL)
    contexts = list(itertools.islice(iter_contexts(iter_texts("kjv", split="validation"), tokenizer, context_size),
                                     n_contexts))
    rows = {}
    for name, (parts, seconds) in sets.items():
        rows[name] = replacement_metrics(model, tokenizer, parts, contexts, batch_size=8)
        rows[name]["train_seconds"] = seconds
        rows[name].pop("density")  # per latent: the JSON keeps the summary figures
    out.mkdir(parents=True, exist_ok=True)
    (out / "replacement.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{steps} steps x {batch} tokens each, {d_sae} latents per set, target L0 {target_l0:g} per layer; "
          f"scored on {rows['clt']['tokens']:,} held-out predictions\n")
    print(table(rows, layers))
    results = {
        "clt_vs_transcoders_delta_loss": rows["clt"]["delta_loss"] / rows["transcoders"]["delta_loss"],
        "clt_vs_skip_transcoders_delta_loss": rows["clt"]["delta_loss"] / rows["skip_transcoders"]["delta_loss"],
        "clt_vs_transcoders_l0": rows["clt"]["l0"] / rows["transcoders"]["l0"],
    }
    print()
    for key, value in results.items():
        print(f"result: {key} {value:.4f}")
    return results


if __name__ == "__main__":
    CLI(main, as_positional=False)
