"""``python -m gs_lightning``: LightningCLI over :class:`SAETrainingModule` and any activation DataModule.

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
from gs_lightning.module import SAETrainingModule


class GSLightningCLI(LightningCLI):
    """LightningCLI with only the subcommands an SAE run uses."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # test/predict need steps an SAE run does not have: leave them out of --help.
        return {
            "fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"},
            "validate": {"model", "dataloaders", "datamodule"},
        }


def main(args: list[str] | None = None) -> GSLightningCLI | None:
    """Run the CLI; ``args`` lets tests call it in-process (``None`` reads ``sys.argv``)."""
    cli_kwargs: dict[str, Any] = dict(
        model_class=SAETrainingModule,
        datamodule_class=ActivationDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": "Train and validate sparse autoencoders on language-model activations."},
        args=args,
    )
    try:
        return GSLightningCLI(**cli_kwargs)
    except ConfigError as err:
        print(f"gs_lightning: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
