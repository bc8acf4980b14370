"""The state files that make a suite resumable, and a group's identity.

Every step leaves its result in the group's folder (see :mod:`gs_lightning.suite.layout`)
before the next starts: ``fit.yaml`` when the group is planned, ``state.json`` after
training and again, with ``eval.json``, after evaluation. Writes are atomic, so a kill
leaves the old file or the new.

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

STATE_FILE, EVAL_FILE, FIT_FILE, CHECKPOINT = "state.json", "eval.json", "fit.yaml", "last.ckpt"
PREEMPTED = "preempted.ckpt"
TRAINED, EVALUATED = "trained", "evaluated"


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


def save_trained(folder: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Record a finished fit (``state`` with status ``trained``), then drop its checkpoints:
    the SAEs are saved, so a kill after this resumes at evaluation, not training."""
    write_json(folder / STATE_FILE, state)
    for name in (CHECKPOINT, PREEMPTED):  # dead weight once the state says trained
        (folder / name).unlink(missing_ok=True)
    return state


def save_evaluated(folder: Path, state: dict[str, Any], rows: list[dict[str, Any]], evaluation: str,
                   seconds: float) -> None:
    """Record a group's evaluation: its rows (``eval.json``), then the state that says they are
    final for the evaluation identity ``evaluation``."""
    write_json(folder / EVAL_FILE, rows)
    write_json(folder / STATE_FILE, {**state, "status": EVALUATED, "evaluation": evaluation, "eval_seconds": seconds})
