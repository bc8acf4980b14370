"""SAE quality side by side with SAELens: sparsity-fidelity frontiers on the same tokens.

From one harvest of the embedded model on the KJV (``blocks.1.hook_resid_post``, the
quickstart's site, and ``blocks.2.hook_mlp_out``; all 903,520 train tokens, 32,768
held-out tokens), every SAE of a site trains on the same batches in the same order
(one seeded :class:`ShardedActivationDataModule` stream) at the same width:

* gs_lightning's default JumpReLU recipe over a lambda grid, as one packed
  ``Trainer.fit`` (one read of the data), beside the Gemma Scope recipe (unit encoder at
  init) over the same grid in the same packed run;
* SAELens' ``JumpReLUTrainingSAE`` trained by its ``SAETrainer``, twice: at SAELens'
  documented defaults (its normalisation E||x|| = sqrt(d), bandwidth 0.05, threshold
  0.01, decoder norm 0.1, lr 3e-4, Adam (0.9, 0.999), constant lr) and at our recipe's
  numbers (E||x||^2 = 1, our bandwidth and threshold, lr schedule, betas and warm-ups);
  of its frontiers that overlap our L0 range, the better is the one we compare against;
* TopK and BatchTopK at several k against SAELens' TopK and BatchTopK training SAEs
  (their defaults, our lr schedule; ours with the gradient clipping of the TopK configs),
  and Matryoshka BatchTopK against SAELens'.

Every SAE is then measured the same way on the held-out tokens, in raw units: L0, FVU
(pooled, about the mean), delta LM loss (spliced into the model on the same contexts),
the fraction of latents that never fire, the fraction firing on over 10% of tokens, and
training seconds (a packed run's wall time divided by its members). Writes
``<output>/quality.csv``, ``.json``, ``quality_frontier.png``, prints the table and ends
with ``result:`` lines (ratios < 1: ours is better):

* ``jumprelu_fvu_ratio_vs_saelens``: worst ours / SAELens FVU at matched L0 (interpolated
  on log L0, :mod:`gs_lightning.frontier`) over the overlapping L0 range, both sites;
* ``jumprelu_delta_loss_ratio_vs_saelens``: the same for delta LM loss;
* ``jumprelu_dead_frac``: our worst never-fire fraction over the grid;
* ``jumprelu_dead_vs_saelens``: worst (ours - SAELens) never-fire fraction at matched L0;
* ``topk_fvu_ratio_vs_saelens``: worst ours / SAELens FVU over TopK and BatchTopK at equal k;
* ``matryoshka_fvu_ratio_vs_saelens``.

Needs the ``bench`` extra (SAELens); without it only our rows are trained and no ratio
is printed. Run: ``python benchmarks/quality.py [--quick] [--steps N] [--output runs/quality]``;
``--rescore true`` recomputes the table, plot and figures from a saved ``quality.json``.
``--quick`` (one site, fewer steps and grid points, JumpReLU and TopK k=32 only) takes
about 10 minutes on the 2-core CPU; the full run over an hour (see docs/results/quality.md).
"""

from __future__ import annotations

import copy
import csv
import json
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import saelens_peer as peer
import torch
from jsonargparse import ArgumentParser

from gs_lightning import frontier
from gs_lightning.console import quiet_third_party
from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.harvest import HarvestConfig, harvest
from gs_lightning.lm import load_language_model
from gs_lightning.metrics import DENSE_THRESHOLD, FiringStatistics, PooledFVU
from gs_lightning.module import SAETrainingModule
from gs_lightning.plots import plot_frontier_curves
from gs_lightning.saes import BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, TopKSAE
from gs_lightning.splice import delta_lm_loss
from gs_lightning.text import iter_contexts, iter_texts

SITES = ("blocks.1.hook_resid_post", "blocks.2.hook_mlp_out")
MODEL = "gs-lightning/tiny-gemma2-kjv"
# What each mode trains. lambda grids span held-out L0 of about 10 to 100 (E||x||^2 = 1
# units; SAELens at our numbers takes the same values). At its own defaults SAELens does
# not get there in 800 steps: over coefficients 3e-4 to 30 its held-out L0 (resid 1) was
# 1850, 857, 693 (at 0.03), 774, 1087, 1157 and about 1175 up to 30, a floor near 700
# (lr 3e-4 moves a threshold at most about 3e-4 a step under Adam), so its grid spans
# that floor and both sides of it. The TopK family runs on the
# first site only: on 2 CPU cores it would double the full run's hour, which is also why
# the full run (39 SAEs) takes 800 steps where --quick (8 SAEs) takes 1,000.
MODES: dict[str, dict[str, Any]] = {
    "full": dict(steps=800, sites=list(SITES), lambdas=[1e-4, 3e-4, 1e-3, 3e-3], remedies=True,
                 saelens_coefficients=[0.003, 0.03, 1.0], saelens_numbers=["saelens", "ours"],
                 ks=[16, 32, 64], topk_families=["topk", "batchtopk", "matryoshka"]),
    "quick": dict(steps=1000, sites=list(SITES[:1]), lambdas=[3e-4, 1e-3, 3e-3], remedies=False,
                  saelens_coefficients=[0.06, 0.2, 0.6], saelens_numbers=["ours"],
                  ks=[32], topk_families=["topk"]),
}
PREFIXES = [128, 512]
# The TopK family's gradient clipping (per SAE, E||x||^2 = 1 units), as in its quickstart
# configs. SAELens clips every gradient to norm 1 in its units; measured on resid at k 64
# (800 steps), our TopK went from FVU 0.0233 unclipped to 0.0234 / 0.0226 / 0.0213 / 0.0214
# at 1 / 0.1 / 0.03 / 0.01, where SAELens reached 0.0221.
TOPK_CLIP = 0.03
DENSE_COEFFICIENT = 0.01  # the dense penalty's weight in its ablation (E||x||^2 = 1 units)


def harvest_both(output: Path, sites: list[str]) -> dict[str, dict[str, Path]]:
    """Train and held-out shards of ``sites`` (reused when already complete)."""
    common = dict(model=MODEL, sites=sites, text="kjv", context_size=128, model_batch_size=16, dtype="bfloat16",
                  seed=0)
    train = harvest(HarvestConfig(output=str(output / "train"), text_split="train", max_tokens=None,
                                  shuffle_bucket_tokens=1_048_576, shard_tokens=65536, **common))
    val = harvest(HarvestConfig(output=str(output / "validation"), text_split="validation", max_tokens=32768,
                                shuffle_bucket_tokens=32768, shard_tokens=32768, **common))
    return {"train": train, "validation": val}


def datamodule(folders: dict[str, dict[str, Path]], site: str, batch: int) -> ShardedActivationDataModule:
    dm = ShardedActivationDataModule(str(folders["train"][site]), batch_size=batch,
                                     val_path=str(folders["validation"][site]), model=MODEL,
                                     window_tokens=262144, seed=0)
    dm.setup("fit")
    return dm


def batches(dm: ShardedActivationDataModule, steps: int) -> Iterator[torch.Tensor]:
    """The first ``steps`` float32 batches of the training stream, epoch after epoch: the
    order ``Trainer.fit`` sees (checked against it by :func:`_check_same_order`)."""
    epoch, seen = 0, 0
    while seen < steps:
        dm.load_state_dict({"epoch": epoch, "window": 0, "offset": 0, "seed": dm.seed})
        for batch in islice(dm.stream(), steps - seen):
            seen += 1
            yield batch
        epoch += 1
    dm.load_state_dict({"epoch": 0, "window": 0, "offset": 0, "seed": dm.seed})


class _Seen(pl.Callback):
    """Keeps a fingerprint of every training batch (to check the benchmark's stream order)."""

    def __init__(self) -> None:
        self.sums: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.sums.append(float(batch.double().sum()))


def jumprelu_members(d: int, d_sae: int, lams: list[float], gemma_scope: bool, remedies: bool
                     ) -> list[tuple[str, str, dict[str, Any]]]:
    """``(tool, setting suffix, constructor arguments)`` of each JumpReLU in the packed run
    (the tool label names the recipe or ablation: each label is one frontier or point).

    The default recipe over ``lams``; with ``remedies``, its ablations at one lambda each
    (at the grid's strongest lambda, where latents die: no dead-latent remedy, AuxK only,
    the pre-activation loss only, the pre-activation loss also pulling the encoder (the
    old default); the dense penalty at its weakest, where dense latents appear); with ``gemma_scope``, the Gemma Scope recipe over ``lams``.
    """
    default = JumpReLUSAE(d, d_sae).init_args()
    keys = ("sparsity_coefficient", "encoder_init_scale", "bandwidth", "threshold_init", "aux_coefficient",
            "dead_coefficient", "dead_pull_encoder", "dense_coefficient")
    recipe = {k: default[k] for k in keys}
    out = [("gs_lightning", "", {**recipe, "sparsity_coefficient": lam}) for lam in lams]
    if remedies:
        strong = {**recipe, "sparsity_coefficient": lams[-1]}
        out += [("gs_lightning (no dead-latent remedy)", "", {**strong, "aux_coefficient": 0.0, "dead_coefficient": 0.0}),
                ("gs_lightning (AuxK only)", "", {**strong, "dead_coefficient": 0.0}),
                ("gs_lightning (pre-act loss only)", "", {**strong, "aux_coefficient": 0.0}),
                ("gs_lightning (pre-act loss moves the encoder)", "", {**strong, "dead_pull_encoder": True}),
                ("gs_lightning (dense penalty)", "", {**recipe, "sparsity_coefficient": lams[0],
                                                     "dense_coefficient": DENSE_COEFFICIENT})]
    if gemma_scope:
        gs = {**recipe, "encoder_init_scale": 1.0, "bandwidth": 0.001, "threshold_init": 0.001,
              "aux_coefficient": 0.0, "dead_coefficient": 0.0}
        out += [("gs_lightning (Gemma Scope recipe)", "", {**gs, "sparsity_coefficient": lam}) for lam in lams]
    return out


def fit_packed(dm: ShardedActivationDataModule, template: Any, sweep: dict[str, list[Any]], steps: int,
               schedule: dict[str, Any]) -> tuple[list[tuple[str, Any]], float, list[float]]:
    """One packed ``Trainer.fit`` of the sweep; returns ``(name, SAE on raw inputs)`` per member,
    seconds per member and the fingerprints of the batches it trained on."""
    torch.manual_seed(0)
    module = SAETrainingModule(template, sweep=sweep, **schedule)
    seen = _Seen()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[seen])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = (time.perf_counter() - start) / len(module.named_saes())
    members = []
    for name, sae in module.named_saes():
        raw = copy.deepcopy(sae).eval()
        raw.fold_input_scale(float(module.input_scale))
        members.append((name, raw))
    return members, seconds, seen.sums


def _check_same_order(fingerprints: list[float], dm: ShardedActivationDataModule, steps: int) -> None:
    ours = [float(b.double().sum()) for b in batches(dm, steps)]
    if ours != fingerprints:
        raise RuntimeError("the peers' stream differs from the batches Trainer.fit trained on")


@torch.no_grad()
def measure(sae: Any, val: torch.Tensor, lm: Any, tokenizer: Any, site: str, contexts: list[torch.Tensor]
            ) -> dict[str, float]:
    """Held-out L0, FVU, never-fire and dense fractions, and delta LM loss of ``sae`` (raw inputs)."""
    fvu, firing = PooledFVU(val.shape[1]), FiringStatistics(sae.W_enc.shape[1], DENSE_THRESHOLD)
    for chunk in val.split(4096):
        f = peer.encode_dense(sae, chunk)
        fvu.update(chunk, sae.decode(f))
        firing.update(f)
    stats = firing.compute()
    spliced = delta_lm_loss(lm, tokenizer, sae, site, contexts, batch_size=16)
    return {"l0": float(stats["l0"]), "fvu": float(fvu.compute()), "delta_loss": spliced["delta_loss"],
            "never_fire": float(stats["dead_frac"]), "dense": float(stats["dense_frac"])}


def _schedule(steps: int) -> dict[str, Any]:
    """The quickstart's optimisation (lr 1e-3, Adam (0.5, 0.999), linear decay over the last
    20%), warm-ups scaled to the run (the quickstart: 100 and 1,000 of 3,000 steps)."""
    return dict(lr=1e-3, adam_betas=(0.5, 0.999), lr_warmup_steps=max(1, steps // 30), lr_decay_fraction=0.2,
                sparsity_warmup_steps=max(1, steps // 3), dead_window_tokens=1_000_000)


def train_site(folders: dict[str, dict[str, Path]], site: str, plan: dict[str, Any], steps: int, batch: int,
               d_sae: int, with_peers: bool, gemma_scope: bool, topk: bool) -> list[dict[str, Any]]:
    """Every SAE of one site: ours through packed fits, SAELens' in one lockstep pass."""
    dm = datamodule(folders, site, batch)
    d, schedule, lams = dm.d_in, _schedule(steps), plan["lambdas"]
    trained: list[tuple[str, str, str, Any, float]] = []  # (tool, family, setting, sae, seconds)
    # Ours, the remedies' ablations and the Gemma Scope recipe as one packed run.
    members = jumprelu_members(d, d_sae, lams, gemma_scope, remedies=topk and plan["remedies"])
    sweep = {key: [m[key] for _, _, m in members] for key in members[0][2]}
    fitted, seconds, order = fit_packed(dm, JumpReLUSAE(d, d_sae), sweep, steps, schedule)
    for (tool, extra, _), (_, sae) in zip(members, fitted):
        trained.append((tool, "jumprelu", f"lambda={sae.sparsity_coefficient:g}{extra}", sae, seconds))
    families = plan["topk_families"] if topk else []
    topk_schedule = {**schedule, "gradient_clip_norm": TOPK_CLIP}
    for family, cls in (("topk", TopKSAE), ("batchtopk", BatchTopKSAE)):
        if family in families:
            members, seconds, _ = fit_packed(dm, cls(d, d_sae, k=plan["ks"][0], aux_k=256), {"k": plan["ks"]},
                                             steps, topk_schedule)
            trained += [("gs_lightning", family, f"k={sae.k}", sae, seconds) for _, sae in members]
    if "matryoshka" in families:
        members, seconds, _ = fit_packed(dm, MatryoshkaBatchTopKSAE(d, d_sae, k=32, prefixes=PREFIXES, aux_k=256),
                                         {"seed": [0]}, steps, topk_schedule)
        trained += [("gs_lightning", "matryoshka", "k=32", sae, seconds) for _, sae in members]
    if with_peers:
        _check_same_order(order, dm, steps)
        trained += train_peers(dm, plan, families, steps, batch, d_sae, schedule)
    return evaluate_site(trained, dm, site)


def train_peers(dm: ShardedActivationDataModule, plan: dict[str, Any], families: list[str], steps: int,
                batch: int, d_sae: int, schedule: dict[str, Any]) -> list[tuple[str, str, str, Any, float]]:
    """SAELens' SAEs, each stepped once per batch of one pass over the same stream."""
    d = dm.d_in
    theirs_scale = peer.saelens_scaling_factor(d, _mean_norm(dm))
    theirs = dict(lr=3e-4, adam_beta1=0.9, adam_beta2=0.999)
    ours = dict(lr=schedule["lr"], adam_beta1=schedule["adam_betas"][0], adam_beta2=schedule["adam_betas"][1],
                lr_warm_up_steps=schedule["lr_warmup_steps"],
                lr_decay_steps=round(steps * schedule["lr_decay_fraction"]))
    runs, mine = [], JumpReLUSAE(d, d_sae)  # our recipe's bandwidth and threshold at this shape
    if "saelens" in plan["saelens_numbers"]:
        for c in plan["saelens_coefficients"]:
            cfg = peer.jumprelu_config(d, d_sae, c, "saelens", 0)
            runs.append(peer.make_run(f"l0_coefficient={c:g}", "jumprelu", cfg, steps, batch, theirs, theirs_scale))
    if "ours" in plan["saelens_numbers"]:
        for lam in plan["lambdas"]:
            cfg = peer.jumprelu_config(d, d_sae, lam, "ours", schedule["sparsity_warmup_steps"], mine.bandwidth,
                                       mine.threshold_init)
            runs.append(peer.make_run(f"l0_coefficient={lam:g} (our numbers)", "jumprelu", cfg, steps, batch, ours,
                                      dm.input_scale))
    for family in families:
        for k in plan["ks"] if family != "matryoshka" else [32]:
            cfg = peer.topk_config(family, d, d_sae, k, PREFIXES)
            runs.append(peer.make_run(f"k={k}", family, cfg, steps, batch, ours, theirs_scale))
    for b in batches(dm, steps):
        for run in runs:
            run.step(b)
    return [("SAELens", run.family, run.name, run.inference_sae(), run.seconds) for run in runs]


def _mean_norm(dm: ShardedActivationDataModule) -> float:
    """E||x|| over the training shards, from the manifests' statistics (as SAELens estimates it)."""
    tokens = sum(entry["tokens"] for _, entry, _ in dm.reader.sites[0])
    return sum(entry["sum_norm"] for _, entry, _ in dm.reader.sites[0]) / tokens


def evaluate_site(trained: list[tuple[str, str, str, Any, float]], dm: ShardedActivationDataModule,
                  site: str) -> list[dict[str, Any]]:
    lm, tokenizer = load_language_model(MODEL)
    texts = iter_texts("kjv", split="validation")
    contexts = list(islice(iter_contexts(texts, tokenizer, 128), 64))
    val = torch.cat(list(dm.val_dataloader()))
    rows = []
    for tool, family, setting, sae, seconds in trained:
        rows.append({"site": site, "tool": tool, "family": family, "setting": setting, "seconds": seconds,
                     **measure(sae, val, lm, tokenizer, site, contexts)})
        print(_format(rows[-1]), flush=True)
    return rows


def _format(row: dict[str, Any]) -> str:
    return (f"{row['site']:<26} {row['tool']:<34} {row['family']:<10} {row['setting']:<30} L0 {row['l0']:7.2f}  "
            f"FVU {row['fvu']:.4f}  dLM {row['delta_loss']:.4f}  never {row['never_fire']:.3f}  "
            f"dense {row['dense']:.3f}  {row['seconds']:6.1f} s")


def curves(rows: list[dict[str, Any]], family: str) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{site: {trainer label: rows}}`` of one family (JumpReLU frontiers, TopK at each k)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        if row["family"] == family:
            label = row["tool"] + (" (our numbers)" if "our numbers" in row["setting"] else "")
            out.setdefault(row["site"], {}).setdefault(label, []).append(row)
    return out


def _points(rows: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(r["l0"], r[key]) for r in rows]


def best_peer(labelled: dict[str, list[dict[str, Any]]], ours: list[dict[str, Any]]) -> str | None:
    """The SAELens frontier to compare ``ours`` against: of those whose L0 range overlaps
    ours, the one with the lower FVU at matched L0 (geometric mean over their overlap).

    A frontier that misses our L0 range cannot be compared with, however good it is (at
    SAELens' defaults its coefficient grid may land far above L0 100)."""
    peers = [k for k in labelled if k.startswith("SAELens")
             and frontier.worst_ratio(_points(ours, "fvu"), _points(labelled[k], "fvu")) is not None]
    best = peers[0] if peers else None
    for other in peers[1:]:
        ratio = frontier.mean_log_ratio(_points(labelled[other], "fvu"), _points(labelled[best], "fvu"))
        if ratio is not None and ratio < 1:
            best = other
    return best


def results(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The headline figures (see the module docstring)."""
    out: dict[str, float] = {}
    worst: dict[str, list[float]] = {"fvu": [], "delta_loss": [], "dead": []}
    for site, labelled in curves(rows, "jumprelu").items():
        ours = labelled.get("gs_lightning", [])
        peer_label = best_peer(labelled, ours)
        out.setdefault("jumprelu_dead_frac", 0.0)
        out["jumprelu_dead_frac"] = max([out["jumprelu_dead_frac"]] + [r["never_fire"] for r in ours])
        if peer_label is None:
            continue
        theirs = labelled[peer_label]
        print(f"{site}: best SAELens frontier: {peer_label}")
        for key in ("fvu", "delta_loss"):
            ratio = frontier.worst_ratio(_points(ours, key), _points(theirs, key))
            if ratio is not None:
                worst[key].append(ratio)
        dead = [(r["l0"], r["never_fire"]) for r in ours]
        for l0, mine in dead:
            other = frontier.interpolate([(r["l0"], r["never_fire"]) for r in theirs], l0)
            if other is not None:
                worst["dead"].append(mine - other)
    if worst["fvu"]:
        out["jumprelu_fvu_ratio_vs_saelens"] = max(worst["fvu"])
    if worst["delta_loss"]:
        out["jumprelu_delta_loss_ratio_vs_saelens"] = max(worst["delta_loss"])
    if worst["dead"]:
        out["jumprelu_dead_vs_saelens"] = max(worst["dead"])
    for name, families in (("topk", ("topk", "batchtopk")), ("matryoshka", ("matryoshka",))):
        found = [mine["fvu"] / other["fvu"] for mine in rows for other in rows
                 if mine["family"] in families and mine["tool"] == "gs_lightning" and other["tool"] == "SAELens"
                 and other["family"] == mine["family"] and other["site"] == mine["site"]
                 and other["setting"] == mine["setting"]]
        if found:
            out[f"{name}_fvu_ratio_vs_saelens"] = max(found)
    return out


def write(rows: list[dict[str, Any]], output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    with open(output / "quality.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (output / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    jumprelu = curves(rows, "jumprelu")
    topk = {f"{site} (TopK, BatchTopK)": {f"{r['tool']} {r['family']}": [] for r in rows if r["site"] == site
                                           and r["family"] in ("topk", "batchtopk")} for site in jumprelu}
    for row in rows:
        if row["family"] in ("topk", "batchtopk"):
            topk[f"{row['site']} (TopK, BatchTopK)"][f"{row['tool']} {row['family']}"].append(row)
    topk = {panel: trainers for panel, trainers in topk.items() if trainers}  # TopK trains on one site only
    return plot_frontier_curves({**{f"{s} (JumpReLU)": c for s, c in jumprelu.items()}, **topk},
                                output / "quality_frontier.png")


def main(quick: bool = False, steps: int | None = None, batch: int = 1024, d_sae: int = 2048,
         output: str = "runs/quality", sites: list[str] | None = None, peers: bool = True,
         gemma_scope: bool = False, topk: bool = True, rescore: bool = False) -> dict[str, float]:
    """Train and measure every SAE of the benchmark; print the table and the ``result:`` lines.

    Args:
        quick: The first site, 1,000 steps, three lambdas, SAELens at our numbers only, and
            TopK at k=32 only (about 10 minutes on 2 cores).
        steps: Training steps per SAE (default 1,000 quick, 800 full).
        batch: Activations per batch (the quickstart's 1,024).
        d_sae: Width of every SAE (the quickstart's 2,048, 16x the model width).
        output: Folder for the harvest, the table and the plot.
        sites: Sites to compare (default both; ``--quick`` the first). The TopK family
            trains on the first only.
        peers: Train SAELens' SAEs (needs the ``bench`` extra).
        gemma_scope: Also train the Gemma Scope recipe (unit encoder at init) over our
            lambda grid, in the same packed run.
        topk: Train the TopK family (TopK, BatchTopK, Matryoshka BatchTopK).
        rescore: Train nothing: read ``<output>/quality.json`` from an earlier run, redraw
            the plot and print its table and ``result:`` lines again.
    """
    if rescore:
        return report(json.loads((Path(output) / "quality.json").read_text()), Path(output))
    plan = MODES["quick" if quick else "full"]
    steps = steps or plan["steps"]
    sites = sites or plan["sites"]
    with_peers = peers and peer.available()
    if peers and not with_peers:
        print("SAELens is not installed (pip install -e '.[bench]'): training gs_lightning's SAEs only")
    start = time.perf_counter()
    folders = harvest_both(Path(output) / "harvest", list(SITES))
    rows = [row for i, site in enumerate(sites)
            for row in train_site(folders, site, plan, steps, batch, d_sae, with_peers, gemma_scope,
                                  topk and i == 0)]
    print(f"\n{len(rows)} SAEs, {steps} steps of {batch} each, in {time.perf_counter() - start:.0f} s")
    return report(rows, Path(output))


def report(rows: list[dict[str, Any]], output: Path) -> dict[str, float]:
    """Write the table and the plot of ``rows``, print them and the ``result:`` lines."""
    plot = write(rows, output)
    print("\n".join(_format(row) for row in rows))
    print(f"wrote {output / 'quality.csv'}, {output / 'quality.json'} and {plot}")
    figures = results(rows)
    for name, value in figures.items():
        print(f"result: {name} {value:.4g}")
    return figures


def parse(argv: list[str] | None = None) -> dict[str, Any]:
    """``main``'s arguments from the command line; ``--quick`` is a plain flag."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(main, skip={"quick"})
    parser.add_argument("--quick", action="store_true", help="The quick mode (see main's docstring).")
    return dict(parser.parse_args(argv).items())


if __name__ == "__main__":
    quiet_third_party()  # Lightning's adverts and notices, as the CLI drops them
    main(**parse())
