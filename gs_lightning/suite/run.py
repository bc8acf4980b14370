"""Run a suite: check, harvest, train and evaluate every group, then gather the release.

Every step leaves its result on disk before the next starts (see
:mod:`gs_lightning.suite.state`), so the same command after a kill skips what is done and
resumes the group that was interrupted from its last checkpoint.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml

from gs_lightning.errors import ConfigError
from gs_lightning.suite import training
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import Group, expand_groups
from gs_lightning.suite.harvesting import (
    check_harvest,
    ensure_harvest,
    missing_sites,
    needed_sites,
)
from gs_lightning.suite.plan import plan_model_config
from gs_lightning.suite.state import (
    EVAL_FILE,
    EVALUATED,
    TRAINED,
    read_json,
    reconcile,
    save_evaluated,
    save_trained,
)

RESOLVED_CONFIG = "suite.yaml"


def plan_groups(config: SuiteConfig) -> list[Group]:
    """Validate ``config`` and expand it into groups, reading only the model's config (or
    ``model_config`` where the model cannot be reached, e.g. when emitting job scripts)."""
    config.validate()
    return expand_groups(config, plan_model_config(config)[0])


def write_resolved(config: SuiteConfig, resolved: dict[str, Any]) -> Path:
    """``<output>/suite.yaml``: the full config every worker and job script reads."""
    path = Path(config.output) / RESOLVED_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    return path


def run_group(config: SuiteConfig, group: Group) -> list[dict[str, Any]]:
    """Train (or resume) and evaluate one group; a finished group is only read back, and one
    whose evaluation options changed is evaluated again without retraining."""
    run = training.plan_run(config, group)
    state = reconcile(run.folder, run.identity, group.id, run.fit)
    if state.get("status") == EVALUATED and state.get("evaluation") == run.evaluation:
        print(f"suite: {group.id}: done, skipping", flush=True)
        return read_json(run.folder / EVAL_FILE)
    if state.get("status") not in (TRAINED, EVALUATED):
        trained = training.train(run, state)
        state = save_trained(run.folder, trained)
    from gs_lightning.suite.evaluation import (
        evaluate_group,  # loads the language model on first use
    )

    start = time.perf_counter()
    rows = evaluate_group(config, run)
    for row in rows:
        row["passes_over_shards"] = state.get("passes_over_shards")
    save_evaluated(run.folder, state, rows, run.evaluation, time.perf_counter() - start)
    return rows


def run_groups_in_parallel(resolved: Path, groups: list[Group], devices: int) -> None:
    """Run groups ``devices`` at a time, each in its own process pinned to one device.

    On CUDA each worker sees one GPU (``CUDA_VISIBLE_DEVICES``); on CPU the workers
    share the cores and split the threads (unless ``OMP_NUM_THREADS`` is set).
    """
    free: queue.Queue[int] = queue.Queue()
    for device in range(devices):
        free.put(device)
    threads = max(1, (os.cpu_count() or 1) // devices)

    def work(group: Group) -> None:
        device = free.get()
        try:
            env = {"OMP_NUM_THREADS": str(threads), **os.environ}  # a thread count set by the user wins
            if torch.cuda.is_available():
                env["CUDA_VISIBLE_DEVICES"] = str(device)
            command = [sys.executable, "-m", "gs_lightning", "suite", "--config", str(resolved), "--group", group.id]
            done = subprocess.run(command, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"suite: group {group.id} failed (exit {done.returncode}): {' '.join(command)}")
        finally:
            free.put(device)

    with ThreadPoolExecutor(devices) as pool:
        for future in [pool.submit(work, group) for group in groups]:
            future.result()


def run_suite(config: SuiteConfig, resolved: dict[str, Any], devices: int = 1) -> list[dict[str, Any]]:
    """The whole suite: harvest, every group, then the table, release and report."""
    from gs_lightning.suite.gather import gather

    groups = plan_groups(config)
    check_harvest(config, [g.site for g in groups])  # a disagreeing harvest fails before any work
    path = write_resolved(config, resolved)
    ensure_harvest(config, [g.site for g in groups])
    if devices > 1:
        run_groups_in_parallel(path, groups, devices)
    else:
        for index, group in enumerate(groups, 1):
            print(f"suite: group {index}/{len(groups)}: {group.id}", flush=True)
            run_group(config, group)
    return gather(config, groups)


def run_one_group(config: SuiteConfig, group_id: str) -> list[dict[str, Any]]:
    """``--group ID``: one group of an already harvested suite (a worker or an array job)."""
    groups = {g.id: g for g in plan_groups(config)}
    if group_id not in groups:
        raise ConfigError(f"--group {group_id!r} is not a group of this suite; groups: {', '.join(groups)}")
    group = groups[group_id]
    for split in ("train", "val"):
        if missing_sites(config, split, needed_sites([group.site])):
            raise ConfigError(f"--group {group_id}: the {split} harvest of its site is not complete; "
                              "run `suite --stage harvest` first")
    return run_group(config, group)
