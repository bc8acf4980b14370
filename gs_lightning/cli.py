"""``python -m gs_lightning``: LightningCLI over :class:`SAETrainingModule` and any activation DataModule.

``python -m gs_lightning harvest ...`` is dispatched to :mod:`gs_lightning.harvest`, whose
options come from a jsonargparse parser as well.

The module is fixed (it takes the SAE variant as an argument chosen by ``class_path``);
the DataModule is chosen by ``class_path`` too. ``--help`` lists every option with its
docstring; ``--print_config`` shows a full, runnable YAML.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.cli import LightningCLI

from gs_lightning.data.base import ActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.module import SAETrainingModule, check_widths


class GSLightningCLI(LightningCLI):
    """LightningCLI with only the subcommands an SAE run uses."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test/predict need steps an SAE run does not have: leave them out of --help.
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }

    def before_fit(self) -> None:
        self._check_widths()

    def before_validate(self) -> None:
        self._check_widths()

    def _check_widths(self) -> None:
        # Also checked in the module's setup, but here it runs before the Trainer creates
        # a log folder, so a mismatch leaves nothing behind.
        check_widths(self.model.sae, self.datamodule)


def main(args: list[str] | None = None) -> GSLightningCLI | None:
    """Run the CLI; ``args`` lets tests call it in-process (``None`` reads ``sys.argv``)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] == "harvest":
        _run_harvest(argv[1:])
        return None
    cli_kwargs: dict[str, Any] = dict(
        model_class=SAETrainingModule,
        datamodule_class=ActivationDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "prog": "python -m gs_lightning",
            "description": "Train and validate sparse autoencoders on language-model activations.",
        },
        args=args,
    )
    try:
        return GSLightningCLI(**cli_kwargs)
    except Exception as err:
        config_error = _find_config_error(err)
        if config_error is None:
            raise
        print(f"gs_lightning: error: {config_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_harvest(args: list[str]) -> None:
    from gs_lightning.harvest import harvest_main  # lazy: fit/validate never need it

    try:
        harvest_main(args)
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
