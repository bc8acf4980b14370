"""The suite YAML: which model, text, sites, widths and sparsity levels make one release.

A suite expands into *groups* (:mod:`gs_lightning.suite.groups`), one per (site, width):
each group is one packed run over that width's sparsity levels
(:mod:`gs_lightning.train.packed`), so a site's shards are read once per width however many
sparsity levels it has. The dataclasses' docstrings are ``suite --help``. Everything is
checked before anything runs: a bad key, an empty list or a site pattern that matches
nothing ends with one :class:`~gs_lightning.errors.ConfigError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gs_lightning.errors import ConfigError, check_at_least
from gs_lightning.harvest.model import StorageDtype
from gs_lightning.lm.load import ModelDtype


@dataclass
class WidthSpec:
    """One SAE width of the suite.

    Args:
        d_sae: Latents per SAE.
        tokens: Training tokens per SAE of this width (Gemma Scope: 4B for 16k, 8B for 65k).
        sparsity: The packed sweep of this width: one constructor argument of the SAE
            (``target_l0``, ``sparsity_coefficient`` or ``k``) with one value per level,
            e.g. ``{target_l0: [10, 30, 60]}``.
    """

    d_sae: int
    tokens: int
    sparsity: dict[str, list[int | float]]


@dataclass
class HarvestSpec:
    """How the suite's activations are harvested (see ``python -m gs_lightning harvest --help``).

    Args:
        dtype: Storage dtype of the activations (``bfloat16`` halves the disk).
        train_tokens: Content tokens of the training split; None harvests the whole split.
        val_tokens: Content tokens of the held-out split (evaluation and validation).
        model_batch_size: Contexts per forward pass.
        shuffle_bucket_tokens: Tokens shuffled together before writing.
        shard_tokens: Most tokens per shard.
        seed: Seed of the bucket shuffles.
    """

    dtype: StorageDtype = "bfloat16"
    train_tokens: int | None = None
    val_tokens: int = 32_768
    model_batch_size: int = 8
    shuffle_bucket_tokens: int = 1_048_576
    shard_tokens: int = 131_072
    seed: int = 0


@dataclass
class TrainerSpec:
    """Hardware and bookkeeping of every group's ``fit``.

    Args:
        accelerator: Lightning accelerator of each group (``auto``, ``cpu``, ``cuda``, ``tpu``).
        precision: Lightning precision (``32-true``, ``bf16-mixed``).
        devices_per_group: Devices one group trains on (1: groups run side by side instead).
        num_nodes: Nodes per group (SLURM only).
        checkpoint_every_n_steps: A group saves ``last.ckpt`` this often; a killed suite
            resumes from it exactly.
        log_every_n_steps: Metric logging interval.
        window_tokens: Rows shuffled together in memory by the shard stream.
    """

    accelerator: str = "auto"
    precision: str = "32-true"
    devices_per_group: int = 1
    num_nodes: int = 1
    checkpoint_every_n_steps: int = 500
    log_every_n_steps: int = 50
    window_tokens: int = 262_144


@dataclass
class EvalSpec:
    """How every SAE of the suite is evaluated.

    Args:
        n_contexts: Held-out contexts run with the SAE spliced in (delta LM loss).
        batch_size: Contexts per forward pass for the delta LM loss; also activations per
            1,024 for the shard pass (``batch_size * 1024`` rows at a time).
    """

    n_contexts: int = 64
    batch_size: int = 8


@dataclass
class SlurmSpec:
    """What ``suite --emit slurm`` writes into the job scripts.

    Args:
        partition: ``#SBATCH --partition``; None leaves it to the cluster's default.
        account: ``#SBATCH --account``; None leaves it out.
        time: Wall-clock limit per group job (``HH:MM:SS``).
        gpus_per_node: GPUs per node of a group job (``devices_per_group`` if None).
        cpus_per_task: CPUs per task.
        mem: Memory per node (``#SBATCH --mem``).
        setup: Shell lines run before each job's command (modules, virtualenv).
    """

    partition: str | None = None
    account: str | None = None
    time: str = "24:00:00"
    gpus_per_node: int | None = None
    cpus_per_task: int = 8
    mem: str = "64G"
    setup: list[str] = field(default_factory=list)


@dataclass
class SuiteConfig:
    """A suite of SAEs: every site x width x sparsity level, trained, evaluated and released.

    Args:
        output: The suite's folder: harvest, one folder per group, table, release and report.
        model: Embedded model name, local directory or Hugging Face hub name.
        revision: Hub revision of the model.
        model_dtype: Dtype the language model runs in.
        model_config: A config.json of the model, used by ``--plan`` when the model itself
            cannot be reached (no hub here); a real run reads the model's own.
        text: ``kjv``, a local .txt file or directory, or a Hugging Face datasets name.
        text_column: Column holding the text in a datasets dataset.
        train_split: Split harvested for training.
        val_split: Held-out split harvested for evaluation.
        context_size: Tokens per context, BOS included.
        sites: Sites or patterns; ``{L}`` expands to every layer in ``layers``, e.g.
            ``blocks.{L}.hook_resid_post``; ``"A -> B"`` trains transcoders from site A to B.
        layers: Layers that ``{L}`` expands to; None: every layer of the model.
        widths: The SAE widths, each with its token budget and sparsity levels.
        recipe: The ``model:`` block of a fit config without ``d_in``/``d_sae``/``sweep``:
            the SAE's ``class_path`` and ``init_args`` and the module's options (lr, ...).
        batch_size: Activations per training step.
        harvest: Harvest options.
        trainer: Hardware and checkpointing of each group.
        evaluate: Evaluation options.
        slurm: Job-script options of ``--emit slurm``.
        release_name: Prefix of the release's folders, ``<release_name>-res`` etc.
        seed: Seed of every group's run (weights and data order).
    """

    output: str
    model: str = "gs-lightning/tiny-gemma2-kjv"
    revision: str | None = None
    model_dtype: ModelDtype = "float32"
    model_config: str | None = None
    text: str = "kjv"
    text_column: str = "text"
    train_split: str = "train"
    val_split: str = "validation"
    context_size: int = 1024
    sites: list[str] = field(default_factory=list)
    layers: list[int] | None = None
    widths: list[WidthSpec] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 4096
    harvest: HarvestSpec = field(default_factory=HarvestSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    evaluate: EvalSpec = field(default_factory=EvalSpec)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    release_name: str = "suite"
    seed: int = 0

    def validate(self) -> None:
        """Raise a ConfigError naming the first bad key (before the model is touched)."""
        if not self.sites:
            raise ConfigError("sites: the list is empty; give at least one site or pattern")
        if not self.widths:
            raise ConfigError("widths: the list is empty; give at least one width")
        if self.layers is not None and not self.layers:
            raise ConfigError("layers: the list is empty; leave it out (null) for every layer")
        for i, width in enumerate(self.widths):
            _check_width(i, width)
        if len({w.d_sae for w in self.widths}) != len(self.widths):
            raise ConfigError(f"widths: d_sae values repeat ({[w.d_sae for w in self.widths]})")
        sae = self.recipe.get("sae")
        if not isinstance(sae, dict) or "class_path" not in sae:
            raise ConfigError("recipe.sae.class_path: the recipe must name the SAE variant")
        for key in ("d_in", "d_sae", "d_out"):
            if (sae.get("init_args") or {}).get(key) is not None:
                raise ConfigError(f"recipe.sae.init_args.{key}: set by the suite from the site and widths; remove it")
        if "sweep" in self.recipe:
            raise ConfigError("recipe.sweep: the suite sweeps widths[].sparsity; remove recipe.sweep")
        check_at_least(self, {"batch_size": 1, "context_size": 2, "trainer.checkpoint_every_n_steps": 1,
                              "trainer.devices_per_group": 1, "evaluate.n_contexts": 1})


def _check_width(i: int, width: WidthSpec) -> None:
    where = f"widths[{i}]"
    if width.d_sae < 1 or width.tokens < 1:
        raise ConfigError(f"{where}: d_sae={width.d_sae} and tokens={width.tokens} must be positive")
    if len(width.sparsity) != 1:
        raise ConfigError(
            f"{where}.sparsity: give exactly one swept argument with a list of levels, "
            f"e.g. {{target_l0: [10, 30, 60]}}; got {sorted(width.sparsity) or 'nothing'}"
        )
    key, levels = next(iter(width.sparsity.items()))
    if not levels:
        raise ConfigError(f"{where}.sparsity.{key}: the list of levels is empty")
