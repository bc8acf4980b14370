"""``python -m gs_lightning``: LightningCLI over :class:`SAETrainingModule` and any activation DataModule.

``harvest``, ``evaluate`` and ``export`` are dispatched to their modules' entry points,
whose options come from jsonargparse parsers as well.

The module is fixed (it takes the SAE variant as an argument chosen by ``class_path``);
the DataModule is chosen by ``class_path`` too. ``--help`` lists every option with its
docstring; ``--print_config`` shows a full, runnable YAML.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger

from callbacks.progress import StepProgressBar
from callbacks.run_summary import RunSummary
from gs_lightning.console import quiet_third_party
from gs_lightning.data.base import ActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.train.module import SAETrainingModule, check_widths
from gs_lightning.train.parallel import close_process_group
from gs_lightning.train.record import RecordingSaveConfigCallback


class GSLightningCLI(LightningCLI):
    """LightningCLI with only the subcommands an SAE run uses."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test/predict need steps an SAE run does not have: leave them out of --help.
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer; a W&B-only logger config gets a CSVLogger in front of it.

        ``trainer.log_dir`` (where the run record, the saved SAEs and the plots go) is the
        first logger's folder; for a WandbLogger that is one fixed ``save_dir`` shared by
        every run, so a second run would overwrite the first one's SAE. With a CSVLogger
        first, each run keeps Lightning's ``<default_root_dir>/lightning_logs/version_N``
        and W&B still receives everything.
        """
        config = self._get(self.config_init, "trainer", default={})
        logger = config.get("logger")
        loggers = list(logger) if isinstance(logger, (list, tuple)) else [logger] if isinstance(logger, Logger) else []
        if loggers and all(type(lg).__name__ == "WandbLogger" for lg in loggers):
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = [CSVLogger(root), *loggers]
        kwargs.update(_console_callbacks(config))
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._check_widths()

    def before_validate(self) -> None:
        self._check_widths()

    def _check_widths(self) -> None:
        # Also checked in the module's setup, but here it runs before the Trainer creates
        # a log folder, so a mismatch leaves nothing behind.
        check_widths(self.model.sae, self.datamodule)


def _console_callbacks(trainer_config: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments that put our progress bar and run summary in Lightning's defaults'
    place, unless the config names its own or turns them off."""
    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    added = []
    if trainer_config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        added.append(StepProgressBar())
    update: dict[str, Any] = {}
    if trainer_config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
        added.append(RunSummary())
        # Lightning would announce that a summary callback is already configured.
        update["enable_model_summary"] = False
    if added:
        update["callbacks"] = [*callbacks, *added]
    return update


# Subcommands outside LightningCLI: name -> "module:function(args)", imported on use so
# that fit/validate never pay for them.
EXTRA_SUBCOMMANDS = {
    "harvest": "gs_lightning.harvest.model:harvest_main",
    "evaluate": "gs_lightning.evaluation.evaluate:evaluate_main",
    "export": "gs_lightning.formats.export:export_main",
    "sweep": "gs_lightning.sweep:sweep_main",
    "suite": "gs_lightning.suite.cli:suite_main",
    "browse": "gs_lightning.browse.build:browse_main",
}
DESCRIPTION = (
    "Train and validate sparse autoencoders on language-model activations. Also: "
    "'harvest' (write activation shards), 'evaluate' (L0, FVU, delta LM loss of saved SAEs), "
    "'export' (Gemma Scope / SAELens layouts), 'sweep' (run a W&B sweep file offline), "
    "'suite' (train, evaluate and release every site x width x sparsity level of one YAML), "
    "'browse' (a static feature browser of a saved SAE); "
    "each takes --help."
)


def main(args: list[str] | None = None) -> Any:
    """Run the CLI; ``args`` lets tests call it in-process (``None`` reads ``sys.argv``).

    Returns the LightningCLI of ``fit``/``validate``, or what another subcommand returns.
    """
    argv = sys.argv[1:] if args is None else list(args)
    quiet_third_party()
    if argv and argv[0] in EXTRA_SUBCOMMANDS:
        module, _, function = EXTRA_SUBCOMMANDS[argv[0]].partition(":")
        return _reporting_config_errors(getattr(importlib.import_module(module), function), argv[1:])
    _refuse_optimizer_options(argv)
    cli_kwargs: dict[str, Any] = dict(
        model_class=SAETrainingModule,
        # The module builds its own Adam parameter groups (per-SAE lr, fp32 thresholds,
        # 8-bit moments) and schedules; LightningCLI's --optimizer/--lr_scheduler would
        # replace them silently, so they are not offered (see _refuse_optimizer_options).
        auto_configure_optimizers=False,
        datamodule_class=ActivationDataModule,
        subclass_mode_data=True,
        save_config_callback=RecordingSaveConfigCallback,  # config.yaml, run.json, metrics.json
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "python -m gs_lightning",
            "description": DESCRIPTION,
        },
        args=args,
    )
    try:
        return _reporting_config_errors(lambda: GSLightningCLI(**cli_kwargs))
    finally:
        close_process_group()


OPTIMIZER_KEYS = ("optimizer", "lr_scheduler")


def _refuse_optimizer_options(argv: list[str]) -> None:
    """A clear error for LightningCLI's ``--optimizer``/``--lr_scheduler`` (on the command
    line or as top-level keys of a ``--config`` file), pointing to the module's options."""
    found = [a.split("=")[0] for a in argv if a.lstrip("-").split("=")[0].split(".")[0] in OPTIMIZER_KEYS
             and a.startswith("--")]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else arg.partition("=")[2]
        if (arg == "--config" or arg.startswith("--config=")) and Path(path).is_file():
            loaded = yaml.safe_load(Path(path).read_text())
            if isinstance(loaded, dict):
                found += [f"{path}: {key}" for key in OPTIMIZER_KEYS if key in loaded]
    if found:
        print(f"gs_lightning: error: {', '.join(found)}: the optimizer is set up by the module, not by "
              "LightningCLI: use model.optimizer (adam or adam8bit), model.lr, model.adam_betas, "
              "model.adam_eps and the schedule options model.lr_warmup_steps / lr_decay_fraction "
              "(see fit --help)", file=sys.stderr)
        raise SystemExit(2)


def _reporting_config_errors(run: Callable[..., Any], *args: Any) -> Any:
    """Call ``run(*args)``; a ConfigError anywhere in the failure becomes one line and exit 2."""
    try:
        return run(*args)
    except Exception as err:
        config_error = _find_config_error(err)
        if config_error is None:
            raise
        print(f"gs_lightning: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _find_config_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err``: jsonargparse wraps errors raised while instantiating."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, ConfigError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
