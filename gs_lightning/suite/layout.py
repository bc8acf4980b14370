"""Where a suite keeps things on disk.

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

The files inside a group's folder, and what makes the suite resumable, are
:mod:`gs_lightning.suite.state`'s.
"""

from __future__ import annotations

from pathlib import Path

from gs_lightning.harvest.model import site_folder
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import Group


def harvest_root(config: SuiteConfig, split: str) -> Path:
    """``<output>/harvest/<split>`` (``train`` or ``val``)."""
    return Path(config.output) / "harvest" / split


def harvest_site(config: SuiteConfig, split: str, site: str) -> Path:
    """One site's shard folder of one split."""
    return site_folder(harvest_root(config, split), site)


def group_dir(config: SuiteConfig, group: Group) -> Path:
    """``<output>/groups/<group id>``."""
    return Path(config.output) / "groups" / group.id
