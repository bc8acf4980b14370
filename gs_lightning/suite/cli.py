"""``python -m gs_lightning suite``: one YAML trains, evaluates and releases a suite of SAEs."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, Namespace

from gs_lightning.suite.config import EvalSpec, HarvestSpec, SlurmSpec, SuiteConfig, TrainerSpec, WidthSpec

Stage = Literal["all", "harvest", "gather"]


def build_parser() -> ArgumentParser:
    """The parser of ``suite``; ``--help`` documents every key of the suite YAML and every flag."""
    parser = ArgumentParser(
        prog="python -m gs_lightning suite",
        description=(
            "Train, evaluate and release a suite of SAEs: every site x width x sparsity level of one YAML. "
            "Resumable: run the same command again after a kill and it continues where it stopped."
        ),
    )
    parser.add_argument("--config", action=ActionConfigFile, help="The suite YAML (configs/suite_*.yaml).")
    parser.add_class_arguments(SuiteConfig)
    parser.add_argument("--plan", action=ActionYesNo, default=False,
                        help="Print what the suite will cost (storage, FLOPs, hours) and exit; nothing runs.")
    parser.add_argument("--emit", type=Literal["slurm"] | None, default=None,
                        help="Write per-group job scripts for a cluster (slurm) under <output>/slurm and exit.")
    parser.add_argument("--devices", type=int, default=1,
                        help="Groups trained at once, one per device (one process each).")
    parser.add_argument("--group", type=str | None, default=None,
                        help="Run only this group (its id, as listed by --plan); the harvest must be done.")
    parser.add_argument("--stage", type=Stage, default="all",
                        help="all: everything; harvest: only the harvest; gather: only the table, release "
                             "and report from finished groups.")
    return parser


_NESTED = {"widths": WidthSpec, "harvest": HarvestSpec, "trainer": TrainerSpec, "evaluate": EvalSpec,
           "slurm": SlurmSpec}


def config_from(cfg: Namespace) -> tuple[SuiteConfig, dict[str, Any]]:
    """The SuiteConfig and its plain-dict form (written to ``<output>/suite.yaml``)."""
    plain = {f.name: _plain(cfg[f.name]) for f in dataclasses.fields(SuiteConfig)}
    values = dict(plain)
    for key, cls in _NESTED.items():
        values[key] = [cls(**w) for w in plain[key]] if key == "widths" else cls(**plain[key])
    return SuiteConfig(**values), plain


def _plain(value: Any) -> Any:
    if isinstance(value, Namespace):
        return _plain(value.as_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def suite_main(args: list[str]) -> Any:
    """Entry point of ``python -m gs_lightning suite``."""
    from gs_lightning.suite import run

    parser = build_parser()
    cfg = parser.parse_args(args)
    config, plain = config_from(cfg)
    if cfg.plan:
        from gs_lightning.suite.plan import print_plan

        return print_plan(config)
    if cfg.emit == "slurm":
        from gs_lightning.suite.slurm import emit_slurm

        groups = run.plan_groups(config)
        return emit_slurm(config, groups, run.write_resolved(config, plain))
    if cfg.group is not None:
        return run.run_one_group(config, cfg.group)
    if cfg.stage == "harvest":
        groups = run.plan_groups(config)
        from gs_lightning.suite.harvesting import check_harvest, ensure_harvest

        check_harvest(config, [g.site for g in groups])
        return ensure_harvest(config, [g.site for g in groups])
    if cfg.stage == "gather":
        from gs_lightning.suite.gather import gather

        return gather(config, run.plan_groups(config))
    if cfg.devices < 1 or (cfg.devices > 1 and config.trainer.devices_per_group > 1):
        from gs_lightning.errors import ConfigError

        raise ConfigError(f"--devices={cfg.devices}: give at least 1, and more than 1 only with "
                          f"trainer.devices_per_group: 1 (now {config.trainer.devices_per_group}); "
                          "--devices runs one group per device")
    return run.run_suite(config, plain, cfg.devices)
