"""The feature browser's cost against one ``evaluate`` pass over the same tokens.

Side by side in one process, on the quickstart SAE and the quickstart's harvest
(``configs/harvest_quickstart.yaml``: 903,520 tokens of the KJV's train split, shard
format 2):

1. ``browse``: both collection passes over the shards, the decoder's logit effects and
   neighbours, every example's context window rebuilt, the site and the Neuronpedia JSON
   written (model and tokenizer loading excluded, as below);
2. ``evaluate``'s computation over the same contexts (the harvest's first ``contexts``
   of the same text split): reconstruction metrics from the SAE on the site, then the
   delta LM loss with the SAE spliced in (a clean and a spliced forward pass).

Ends with ``result: browse_vs_evaluate <x>`` (browse seconds over evaluate seconds; the
aim is <= 3) and the two times.

Run: ``python benchmarks/browse.py [--sae runs/quickstart/lightning_logs/version_0/sae
--shards runs/harvest/kjv_train/blocks.1.hook_resid_post]`` after the quickstart and
``python -m gs_lightning harvest --config configs/harvest_quickstart.yaml``.
"""

from __future__ import annotations

import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from jsonargparse import CLI

from gs_lightning.browse.build import browse
from gs_lightning.browse.source import HarvestSource
from gs_lightning.console import quiet_third_party
from gs_lightning.evaluation.evaluate import reconstruction_metrics
from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.formats.io import load_sae
from gs_lightning.lm.load import shared_language_model
from gs_lightning.lm.text import iter_contexts, iter_texts


def main(sae: str = "runs/quickstart/lightning_logs/version_0/sae",
         shards: str = "runs/harvest/kjv_train/blocks.1.hook_resid_post", batch_size: int = 16) -> None:
    """Time ``browse`` and an ``evaluate`` pass over the same tokens; print a table and ratios.

    Args:
        sae: The saved SAE (the quickstart's).
        shards: Its site's harvest, shard format 2 (``configs/harvest_quickstart.yaml``).
        batch_size: Contexts per forward pass of the evaluate pass.
    """
    quiet_third_party()
    torch.set_grad_enabled(False)
    source = HarvestSource(shards)  # a version-1 harvest stops here, with the re-harvest command
    manifest = source.manifest
    model, tokenizer = shared_language_model(manifest["model"], manifest.get("revision"))  # loaded once, for both
    options = manifest.get("harvest", {})
    print(f"browse vs evaluate: {sae} on {source.tokens:,} tokens ({manifest['contexts']:,} contexts) of {shards}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        browse(sae, shards=shards, output=out)
        browse_seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file())

    model_sae = load_sae(sae)
    texts = iter_texts(options.get("text", "kjv"), split=options.get("text_split", "train"),
                       column=options.get("text_column", "text"))
    contexts = list(islice(iter_contexts(texts, tokenizer, manifest["context_size"]), manifest["contexts"]))
    start = time.perf_counter()
    metrics = reconstruction_metrics(model_sae, model, tokenizer, manifest["site"], contexts, batch_size, None)
    spliced = delta_lm_loss(model, tokenizer, model_sae, manifest["site"], contexts, batch_size)
    evaluate_seconds = time.perf_counter() - start

    print()
    print(f"{'pass':<44}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'browse (2 collection passes, windows, site)':<44}{browse_seconds:>10.1f}"
          f"{source.tokens / browse_seconds:>12,.0f}")
    print(f"{'evaluate (reconstruction + delta LM loss)':<44}{evaluate_seconds:>10.1f}"
          f"{source.tokens / evaluate_seconds:>12,.0f}")
    print(f"site and Neuronpedia JSON: {size / 2**20:.0f} MiB; evaluate gave L0 {metrics['l0']:.4g}, "
          f"FVU {metrics['fvu']:.4g}, delta LM loss {spliced['delta_loss']:.4g}")
    print(f"result: browse_vs_evaluate {browse_seconds / evaluate_seconds:.3f}")
    print(f"result: browse_seconds {browse_seconds:.1f}")
    print(f"result: evaluate_seconds {evaluate_seconds:.1f}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
