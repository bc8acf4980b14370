"""Train one group: plan its run once (:func:`plan_run`), run ``fit`` (resuming a killed run), count its reads.

A group's fit config is an ordinary ``python -m gs_lightning fit`` YAML (``fit.yaml`` in
the group's folder), so a group can also be rerun or inspected by hand. The run reads the
site's harvested shards through :class:`~gs_lightning.data.ShardedActivationDataModule`
and trains the width's sparsity levels as one packed sweep.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gs_lightning.data.shard_format import read_manifest
from gs_lightning.suite.config import SuiteConfig, TrainerSpec
from gs_lightning.suite.groups import Group
from gs_lightning.suite.harvesting import harvest_config, site_identity
from gs_lightning.suite.layout import group_dir, harvest_site
from gs_lightning.suite.state import CHECKPOINT, FIT_FILE, PREEMPTED, TRAINED, identity
from gs_lightning.train.packed import member_name, sweep_members


@dataclasses.dataclass(frozen=True)
class GroupRun:
    """What the stages of one group need from the suite config, derived once by :func:`plan_run`."""

    group: Group
    folder: Path  # <output>/groups/<group id>
    fit: dict[str, Any]  # the complete fit config (fit.yaml)
    identity: str  # hash of the fit config and of the harvest options its shards came from
    evaluation: str  # hash of what decides its evaluation but not its training
    site_shards: Path  # the input site's training shards
    val_shards: tuple[Path, Path]  # held-out shards of the input site and of the target (the same for an SAE)
    members: dict[str, Path]  # each sparsity level's name (e.g. ``target_l0=30``) -> its saved SAE folder
    in_process: bool  # one device on one node: fit runs in this process


def plan_run(config: SuiteConfig, group: Group) -> GroupRun:
    """The group's folder, fit config and identity, where its shards and SAEs lie, and how its fit runs."""
    site = group.site
    harvest = site_identity(harvest_config(config, "train", [site.site]))
    folder, train = group_dir(config, group), harvest_site(config, "train", site.site)
    val = harvest_site(config, "val", site.site)
    val_target = val if site.target is None else harvest_site(config, "val", site.target)
    # A transcoder's data pairs the input with its target site; an SAE's validates on held-out shards.
    other = {"val_path": val} if site.target is None else {"target_path": harvest_site(config, "train", site.target)}
    fit = fit_config(config, group, folder, train, other)
    members = _members(folder, group.width.sparsity)
    # Paths relative to the suite's folder: a moved or copied suite keeps its finished groups.
    relative = json.dumps(fit, sort_keys=True).replace(str(Path(config.output)), "$OUTPUT")
    spec = config.trainer
    evaluation = identity(dataclasses.asdict(config.evaluate), config.val_split, config.harvest.val_tokens)
    return GroupRun(group, folder, fit, identity(relative, harvest), evaluation, train, (val, val_target), members,
                    spec.devices_per_group * spec.num_nodes == 1)


def fit_config(config: SuiteConfig, group: Group, folder: Path, train: Path, other: dict[str, Path]) -> dict[str, Any]:
    """The complete fit config of ``group`` (what ``fit.yaml`` holds): it trains on the
    ``train`` shards; ``other`` is its ``val_path`` or a transcoder's ``target_path``."""
    model = copy.deepcopy(config.recipe)
    # jsonargparse fills every constructor default into the recipe, d_in/d_sae as None.
    init_args = {k: v for k, v in (model["sae"].get("init_args") or {}).items() if k not in ("d_in", "d_sae", "d_out")}
    init_args.update(d_in=group.site.d_in, d_sae=group.width.d_sae)
    if group.site.d_out is not None:
        init_args["d_out"] = group.site.d_out
    model["sae"] = {"class_path": model["sae"]["class_path"], "init_args": init_args}
    model["sweep"] = {key: list(values) for key, values in group.width.sparsity.items()}
    data: dict[str, Any] = {
        "path": str(train),
        "model": config.model,
        "batch_size": config.batch_size,
        "window_tokens": config.trainer.window_tokens,
        "seed": config.seed,
    }
    data.update({key: str(path) for key, path in other.items()})
    return {"seed_everything": config.seed, "trainer": _trainer(config.trainer, group, folder), "model": model,
            "data": {"class_path": "gs_lightning.data.ShardedActivationDataModule", "init_args": data}}


def _trainer(spec: TrainerSpec, group: Group, folder: Path) -> dict[str, Any]:
    return {
        "accelerator": spec.accelerator, "devices": spec.devices_per_group, "num_nodes": spec.num_nodes,
        "precision": spec.precision, "max_steps": group.steps, "log_every_n_steps": spec.log_every_n_steps,
        # Every SAE is evaluated after training on the held-out harvest (eval.json); no
        # validation loop during training.
        "limit_val_batches": 0, "num_sanity_val_steps": 0,
        "enable_checkpointing": False, "enable_model_summary": False, "default_root_dir": str(folder),
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(folder), "name": "", "version": "train"}},
        "callbacks": [
            {"class_path": "callbacks.SaveSAE", "init_args": {"dirpath": str(folder / "saes" / "sae")}},
            {"class_path": "callbacks.LastCheckpoint",
             "init_args": {"path": str(folder / CHECKPOINT), "every_n_steps": spec.checkpoint_every_n_steps}},
            # SIGTERM (a cluster's notice): checkpoint at the step boundary, exit 143 (not done).
            {"class_path": "callbacks.SaveOnSigterm",
             "init_args": {"dirpath": str(folder), "filename": PREEMPTED.removesuffix(".ckpt"), "exit_code": 143}},
        ],
    }


def _members(folder: Path, sparsity: dict[str, list[int | float]]) -> dict[str, Path]:
    root = folder / "saes"
    return {member_name(values): root / member_name(values) / "sae" for values in sweep_members(sparsity)}


def _latest_checkpoint(folder: Path) -> Path | None:
    """The newest of ``last.ckpt`` (periodic) and ``preempted.ckpt`` (saved on SIGTERM)."""
    found = [p for p in (folder / CHECKPOINT, folder / PREEMPTED) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _run_fit(in_process: bool, args: list[str]) -> int | None:
    """Run ``fit``; return the rows it read from shards (None when it ran in other processes).

    A one-device group runs in this process. A group on several devices or nodes runs
    ``python -m gs_lightning fit`` as a child (Lightning then starts one process per
    device), under ``srun`` inside a SLURM allocation of several tasks, so this driver
    stays one process however many ranks train.
    """
    from gs_lightning.cli import (
        main,  # the CLI imports Lightning's whole stack: only when training
    )

    if in_process:
        argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both argv and args
        try:
            cli = main(args)
        finally:
            sys.argv = argv
        return int(cli.datamodule.reader.rows_read)
    command = [sys.executable, "-m", "gs_lightning", *args]
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        command = ["srun", *command]
    done = subprocess.run(command)
    if done.returncode != 0:
        raise SystemExit(done.returncode)  # e.g. 143 after SIGTERM: the checkpoint is saved, rerun to resume
    return None


def train(run: GroupRun, state: dict[str, Any]) -> dict[str, Any]:
    """Run the group's packed fit (from the latest checkpoint a killed run left); return its
    ``trained`` state, for the caller to record."""
    folder, group = run.folder, run.group
    checkpoint = _latest_checkpoint(folder)
    args = ["fit", "--config", str(folder / FIT_FILE)]
    if checkpoint is not None:
        args += ["--ckpt_path", str(checkpoint)]
    levels = len(group.width.sparsity[next(iter(group.width.sparsity))])
    print(f"suite: {group.id}: training {levels} SAEs in one packed run, {group.steps} steps"
          f"{f' (resuming from {checkpoint})' if checkpoint else ''}", flush=True)
    start = time.perf_counter()
    rows_read = _run_fit(run.in_process, args)
    missing = [name for name, path in run.members.items() if not path.is_dir()]
    if missing:
        raise RuntimeError(f"{group.id}: fit ended without saving {missing}")
    site_tokens = int(read_manifest(run.site_shards)["tokens"])
    passes = None if rows_read is None else rows_read / site_tokens
    if rows_read is not None:
        print(f"suite: {group.id}: read {rows_read:,} rows of the site's {site_tokens:,} harvested tokens "
              f"({passes:.2f} passes) for {levels} SAEs", flush=True)
    return {**state, "status": TRAINED, "steps": group.steps, "rows_read": rows_read, "site_tokens": site_tokens,
            "passes_over_shards": passes, "resumed": checkpoint is not None or state.get("resumed", False),
            "train_seconds": time.perf_counter() - start + float(state.get("train_seconds", 0.0))}
