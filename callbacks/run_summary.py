"""What a run will do, printed when it starts, and where everything went, when it ends.

Stands in for Lightning's model summary, whose table lists the validation metrics as
modules and reads 0 in its FLOPs column (it counts FLOPs only through an
``example_input_array``, which an SAE module does not have). The banner gives the SAE's
size and its training FLOPs per token (forward and backward, the MFU convention of
:mod:`callbacks.throughput`) instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary
from lightning.pytorch.utilities import rank_zero_only

from callbacks.save_sae import SaveSAE
from callbacks.throughput import sae_flops_per_token

# What the files a run writes into its log folder are, for the end summary.
OUTPUT_NOTES = {
    "sae": "the SAE: gs_lightning.load_sae, evaluate --saes, export --sae",
    "config.yaml": "the full config: fit --config reruns it",
    "run.json": "package versions, code commit, data source",
    "metrics.json": "final metrics",
    "metrics.csv": "every logged metric, by step",
    "hparams.yaml": "the module's and data's arguments",
    "plots": "frontier and feature-density plots",
    "checkpoints": "checkpoints: fit --ckpt_path resumes from one",
}


class RunSummary(ModelSummary):
    """Print a start banner (model, site, SAE, width, tokens, device, precision, output
    folder) at the start of ``fit`` and the run's outputs at its end.

    A :class:`~lightning.pytorch.callbacks.ModelSummary`, so that it takes the place of
    Lightning's table: the CLI adds it unless the config names a model summary of its own
    or sets ``trainer.enable_model_summary: false``.
    """

    def __init__(self) -> None:
        super().__init__(max_depth=1)
        self._log_dir: str | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks, here and only here
        _print(start_banner(trainer, pl_module, self._log_dir))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After every callback's on_fit_end (the run record is written in one), and after
        # a crash too: the summary then says what was kept.
        if stage == "fit":
            _print(end_summary(trainer, self._log_dir))


def start_banner(trainer: pl.Trainer, module: pl.LightningModule, log_dir: str | None) -> str:
    """The lines of the start banner."""
    data = getattr(trainer, "datamodule", None)
    meta = dict(getattr(data, "metadata", {}) or {})
    rows = [("SAE", _describe_saes(module)), ("data", _describe_data(meta))]
    if meta.get("input_scale") is not None:
        rows.append(("scale", f"inputs x {meta['input_scale']:.4g} ({meta.get('input_scaling')})"))
    tokens = _tokens(trainer, data)
    rows.append(("tokens", tokens[1]))
    per_token = sae_flops_per_token(module)
    flops = f"{_si(per_token, 'FLOP')} per token (forward + backward)"
    if tokens[0]:
        flops = f"{_si(per_token * tokens[0], 'FLOP')} in all, {flops}"
    rows.append(("compute", flops))
    rows.append(("device", _describe_device(trainer)))
    rows.append(("outputs", str(log_dir or trainer.default_root_dir)))
    return "\n".join([f"gs_lightning {trainer.state.fn.value}", *(f"  {key:<8} {value}" for key, value in rows)])


def end_summary(trainer: pl.Trainer, log_dir: str | None) -> str:
    """Where the run's outputs are: the log folder's entries (with what each is), SAEs and
    checkpoints written elsewhere, and the next commands."""
    root = Path(log_dir or trainer.default_root_dir)
    lines = [f"outputs in {root}:"]
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            name = entry.name + ("/" if entry.is_dir() else "")
            note = OUTPUT_NOTES.get(entry.name, "")
            if not note and (entry / "sae").is_dir():
                note = "a packed sweep member: its sae/ and plots"
            lines.append(f"  {name:<14} {note}".rstrip())
    saes = [path for cb in trainer.callbacks if isinstance(cb, SaveSAE) for path in cb.saved_paths.values()]
    checkpoints = {cb.last_model_path or cb.best_model_path for cb in trainer.callbacks
                   if isinstance(cb, ModelCheckpoint)} - {""}
    elsewhere = [p for p in [*map(str, saes), *sorted(checkpoints)] if not _under(Path(p), root)]
    lines += [f"  also: {path}" for path in elsewhere]
    meta = getattr(getattr(trainer, "datamodule", None), "metadata", None) or {}
    if saes and "model" in meta:  # evaluate runs the SAE's language model
        target = str(saes[0]) if len(saes) == 1 else f'"{Path(saes[0]).parent.parent / "*" / Path(saes[0]).name}"'
        lines.append(f"next: python -m gs_lightning evaluate --saes {target}  (then: export --sae ...)")
    return "\n".join(lines)


def _describe_saes(module: pl.LightningModule) -> str:
    named = module.named_saes() if hasattr(module, "named_saes") else [(None, module.sae)]
    sae = named[0][1]
    d_out = getattr(sae, "d_out", None) or sae.d_in
    shape = f"{sae.d_in} -> {sae.d_sae:,} latents" + (f" -> {d_out}" if d_out != sae.d_in else "")
    params = sum(p.numel() for _, s in named for p in s.parameters())
    if len(named) == 1:
        return f"{type(sae).__name__}, {shape}, {_si(params, ' parameters')}"
    return f"{len(named)} packed {type(sae).__name__}s, {shape} each, {_si(params, ' parameters')} in all"


def _describe_data(meta: dict[str, Any]) -> str:
    if "site" not in meta:
        source = meta.get("source", "activations")
        return str(source) if "d_in" not in meta else f"{source} (d_in {meta['d_in']})"
    site = meta["site"] + (f" -> {meta['target_site']}" if meta.get("target_site") else "")
    origin = "harvested shards" if meta.get("source") else "live"
    text = f"text {meta.get('text')} ({meta.get('text_split')})" if meta.get("text") else None
    context = f"context {meta['context_size']}" if meta.get("context_size") else None
    details = ", ".join(x for x in (origin, text, context) if x)
    # A synthetic world's harvest has no model: name the world instead of printing None.
    source = meta.get("model") or (f"synthetic world {meta['world']}" if meta.get("world") else "no model")
    return f"{source} {site}; {details}"


def _tokens(trainer: pl.Trainer, data: Any) -> tuple[int | None, str]:
    """``(tokens, description)``: steps x batch x ranks x accumulation, when steps are counted."""
    batch = getattr(data, "batch_size", None)
    if trainer.max_steps <= 0 or batch is None:
        return None, f"{trainer.max_epochs} epochs" + (f" of batches of {batch:,}" if batch else "")
    per_step = batch * trainer.world_size * trainer.accumulate_grad_batches
    terms = [f"{trainer.max_steps:,} steps", f"{batch:,}"]
    terms += [f"{trainer.world_size} ranks"] if trainer.world_size > 1 else []
    terms += [f"{trainer.accumulate_grad_batches} accumulated"] if trainer.accumulate_grad_batches > 1 else []
    return trainer.max_steps * per_step, f"{trainer.max_steps * per_step:,} = " + " x ".join(terms)


def _describe_device(trainer: pl.Trainer) -> str:
    device = trainer.strategy.root_device
    count = trainer.num_devices * trainer.num_nodes
    where = f"{device.type} x {count}" + (f" on {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else "")
    strategy = type(trainer.strategy).__name__.removesuffix("Strategy")
    return f"{where}, {strategy}, precision {trainer.precision}"


def _si(value: float, unit: str) -> str:
    """``529 K parameters``, ``3.15 MFLOP``: three significant digits and an SI prefix."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit.strip()}"


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


@rank_zero_only
def _print(text: str) -> None:
    print(text, flush=True)
