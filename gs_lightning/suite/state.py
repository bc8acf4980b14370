"""Where a suite keeps things on disk, and the state files that make it resumable.

Layout under ``output``::

    harvest/train/<site>/            shards of the training split (one harvest pass)
    harvest/val/<site>/              shards of the held-out split
    groups/<group id>/fit.yaml       the group's complete fit config (runnable on its own)
    groups/<group id>/state.json     identity, status (trained, evaluated), reads, timings
    groups/<group id>/last.ckpt      the latest checkpoint while the group trains
    groups/<group id>/preempted.ckpt saved on SIGTERM at a step boundary
    groups/<group id>/saes/<level>/sae   the trained SAEs (gs_lightning format)
    groups/<group id>/eval.json      one evaluation row per SAE
    suite.csv, suite.json            every SAE's row
    release/                         Gemma Scope and SAELens layouts and the index
    report/                          figures and report.md

A group's *identity* is a hash of everything that decides its SAEs' bytes (its fit config
and the options of the harvest it reads); a group whose state holds another identity is
retrained from scratch, so changing one entry of the suite YAML retrains what it affects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from gs_lightning.errors import ConfigError
from gs_lightning.harvest.model import site_folder
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import Group

STATE_FILE, EVAL_FILE, FIT_FILE, CHECKPOINT = "state.json", "eval.json", "fit.yaml", "last.ckpt"
PREEMPTED = "preempted.ckpt"
TRAINED, EVALUATED = "trained", "evaluated"


def harvest_root(config: SuiteConfig, split: str) -> Path:
    """``<output>/harvest/<split>`` (``train`` or ``val``)."""
    return Path(config.output) / "harvest" / split


def harvest_site(config: SuiteConfig, split: str, site: str) -> Path:
    """One site's shard folder of one split."""
    return site_folder(harvest_root(config, split), site)


def group_dir(config: SuiteConfig, group: Group) -> Path:
    """``<output>/groups/<group id>``."""
    return Path(config.output) / "groups" / group.id


def identity(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts (key order does not matter)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json(path: Path, content: Any) -> None:
    """Write JSON atomically (a temporary sibling, then rename): a kill leaves the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(content, handle, indent=2, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """Read a JSON file the suite wrote; a damaged one is a ConfigError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); delete it to redo that step") from err


def read_state(folder: Path) -> dict[str, Any]:
    """A group's state, or ``{}`` if it has none yet."""
    path = folder / STATE_FILE
    return read_json(path) if path.is_file() else {}


def reconcile(folder: Path, want: str, group_id: str, fit: dict[str, Any]) -> dict[str, Any]:
    """A group's state after reconciling it with the identity ``want``: a group trained with
    another identity is removed (it will be retrained); ``fit.yaml`` is (re)written."""
    state = read_state(folder)
    if state and state.get("identity") != want:
        print(f"suite: {group_id}: its config changed since it was trained; retraining it", flush=True)
        shutil.rmtree(folder)
        state = {}
    elif not state and folder.exists():
        # A folder without a state: a run killed before writing it, so nothing in it is
        # known to belong to this identity; start clean.
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not state:
        state = {"identity": want, "group": group_id, "status": "new"}
        write_json(folder / STATE_FILE, state)
    (folder / FIT_FILE).write_text(yaml.safe_dump(fit, sort_keys=False))
    return state
