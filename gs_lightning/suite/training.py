"""Train one group: write its fit config, run ``fit`` (resuming a killed run), record its reads.

A group's fit config is an ordinary ``python -m gs_lightning fit`` YAML (``fit.yaml`` in
the group's folder), so a group can also be rerun or inspected by hand. The run reads the
site's harvested shards through :class:`~gs_lightning.data.ShardedActivationDataModule`
and trains the width's sparsity levels as one packed sweep.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from gs_lightning.data.shard_format import read_manifest
from gs_lightning.train.packed import member_name, sweep_members
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import Group
from gs_lightning.suite.harvesting import harvest_config, site_identity
from gs_lightning.suite.state import (
    CHECKPOINT,
    FIT_FILE,
    PREEMPTED,
    STATE_FILE,
    TRAINED,
    group_dir,
    harvest_site,
    identity,
    read_state,
    write_json,
)


def fit_config(config: SuiteConfig, group: Group) -> dict[str, Any]:
    """The complete fit config of ``group`` (what ``fit.yaml`` holds)."""
    folder = group_dir(config, group)
    model = copy.deepcopy(config.recipe)
    # jsonargparse fills every constructor default into the recipe, d_in/d_sae as None.
    init_args = {k: v for k, v in (model["sae"].get("init_args") or {}).items() if k not in ("d_in", "d_sae", "d_out")}
    init_args.update(d_in=group.site.d_in, d_sae=group.width.d_sae)
    if group.site.d_out is not None:
        init_args["d_out"] = group.site.d_out
    model["sae"] = {"class_path": model["sae"]["class_path"], "init_args": init_args}
    model["sweep"] = {key: list(values) for key, values in group.width.sparsity.items()}
    data: dict[str, Any] = {
        "path": str(harvest_site(config, "train", group.site.site)),
        "model": config.model,
        "batch_size": config.batch_size,
        "window_tokens": config.trainer.window_tokens,
        "seed": config.seed,
    }
    if group.site.target is None:
        data["val_path"] = str(harvest_site(config, "val", group.site.site))
    else:  # a transcoder's data pairs the input with its target site
        data["target_path"] = str(harvest_site(config, "train", group.site.target))
    spec = config.trainer
    trainer = {
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
    return {"seed_everything": config.seed, "trainer": trainer, "model": model,
            "data": {"class_path": "gs_lightning.data.ShardedActivationDataModule", "init_args": data}}


def group_identity(config: SuiteConfig, group: Group) -> str:
    """Hash of the group's fit config and of the harvest options its shards came from."""
    harvest = site_identity(harvest_config(config, "train", [group.site.site]))
    # Paths relative to the suite's folder: a moved or copied suite keeps its finished groups.
    fit = json.dumps(fit_config(config, group), sort_keys=True).replace(str(Path(config.output)), "$OUTPUT")
    return identity(fit, harvest)


def member_paths(config: SuiteConfig, group: Group) -> dict[str, Path]:
    """Each sparsity level's name (e.g. ``target_l0=30``) -> its saved SAE folder."""
    root = group_dir(config, group) / "saes"
    return {member_name(values): root / member_name(values) / "sae" for values in sweep_members(group.width.sparsity)}


def prepare(config: SuiteConfig, group: Group) -> dict[str, Any]:
    """The group's state after reconciling it with the current config: a group trained with
    another identity is removed (it will be retrained); ``fit.yaml`` is (re)written."""
    folder = group_dir(config, group)
    want = group_identity(config, group)
    state = read_state(folder)
    if state and state.get("identity") != want:
        print(f"suite: {group.id}: its config changed since it was trained; retraining it", flush=True)
        shutil.rmtree(folder)
        state = {}
    elif not state and folder.exists():
        # A folder without a state: a run killed before writing it, so nothing in it is
        # known to belong to this identity; start clean.
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not state:
        state = {"identity": want, "group": group.id, "status": "new"}
        write_json(folder / STATE_FILE, state)
    (folder / FIT_FILE).write_text(yaml.safe_dump(fit_config(config, group), sort_keys=False))
    return state


def _latest_checkpoint(folder: Path) -> Path | None:
    """The newest of ``last.ckpt`` (periodic) and ``preempted.ckpt`` (saved on SIGTERM)."""
    found = [p for p in (folder / CHECKPOINT, folder / PREEMPTED) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _run_fit(config: SuiteConfig, args: list[str]) -> int | None:
    """Run ``fit``; return the rows it read from shards (None when it ran in other processes).

    A one-device group runs in this process. A group on several devices or nodes runs
    ``python -m gs_lightning fit`` as a child (Lightning then starts one process per
    device), under ``srun`` inside a SLURM allocation of several tasks, so this driver
    stays one process however many ranks train.
    """
    from gs_lightning.cli import main  # the CLI imports Lightning's whole stack: only when training

    if config.trainer.devices_per_group * config.trainer.num_nodes == 1:
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


def train(config: SuiteConfig, group: Group, state: dict[str, Any]) -> dict[str, Any]:
    """Run the group's packed fit (from the latest checkpoint a killed run left); return its state."""
    folder = group_dir(config, group)
    checkpoint = _latest_checkpoint(folder)
    args = ["fit", "--config", str(folder / FIT_FILE)]
    if checkpoint is not None:
        args += ["--ckpt_path", str(checkpoint)]
    levels = len(group.width.sparsity[next(iter(group.width.sparsity))])
    print(f"suite: {group.id}: training {levels} SAEs in one packed run, {group.steps} steps"
          f"{f' (resuming from {checkpoint})' if checkpoint else ''}", flush=True)
    start = time.perf_counter()
    rows_read = _run_fit(config, args)
    missing = [name for name, path in member_paths(config, group).items() if not path.is_dir()]
    if missing:
        raise RuntimeError(f"{group.id}: fit ended without saving {missing}")
    site_tokens = int(read_manifest(harvest_site(config, "train", group.site.site))["tokens"])
    passes = None if rows_read is None else rows_read / site_tokens
    state = {**state, "status": TRAINED, "steps": group.steps, "rows_read": rows_read, "site_tokens": site_tokens,
             "passes_over_shards": passes, "resumed": checkpoint is not None or state.get("resumed", False),
             "train_seconds": time.perf_counter() - start + float(state.get("train_seconds", 0.0))}
    write_json(folder / STATE_FILE, state)
    for name in (CHECKPOINT, PREEMPTED):  # the SAEs are saved: checkpoints are dead weight
        (folder / name).unlink(missing_ok=True)
    if rows_read is not None:
        print(f"suite: {group.id}: read {rows_read:,} rows of the site's {site_tokens:,} harvested tokens "
              f"({passes:.2f} passes) for {levels} SAEs", flush=True)
    return state
