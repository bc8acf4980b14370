"""Gather finished groups into the suite table (``suite.csv``, ``suite.json``), release and report."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from gs_lightning.errors import ConfigError
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import Group
from gs_lightning.suite.layout import group_dir
from gs_lightning.suite.release import write_release
from gs_lightning.suite.report import write_report
from gs_lightning.suite.state import (
    EVAL_FILE,
    EVALUATED,
    read_json,
    read_state,
    write_json,
)

TABLE_COLUMNS = ("site", "kind", "layer", "d_sae", "sparsity_key", "sparsity", "l0", "fvu", "explained_variance",
                 "dead_frac", "dense_frac", "delta_loss", "kl", "loss_recovered", "ce_clean", "ce_spliced",
                 "eval_tokens", "passes_over_shards", "group", "sae")


def collect(config: SuiteConfig, groups: list[Group]) -> list[dict[str, Any]]:
    """Every SAE's row, in group order; a group that has not finished is a ConfigError naming it."""
    unfinished = [g.id for g in groups if read_state(group_dir(config, g)).get("status") != EVALUATED]
    if unfinished:
        raise ConfigError(f"{len(unfinished)} group(s) have not finished: {', '.join(unfinished)}; "
                          "run them (`suite --group ID` or the whole suite) before gathering")
    return [row for g in groups for row in read_json(group_dir(config, g) / EVAL_FILE)]


def write_table(rows: list[dict[str, Any]], output: Path) -> tuple[Path, Path]:
    """``suite.csv`` (the main columns) and ``suite.json`` (every field)."""
    with open(output / "suite.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_json(output / "suite.json", rows)
    return output / "suite.csv", output / "suite.json"


def gather(config: SuiteConfig, groups: list[Group]) -> list[dict[str, Any]]:
    """Write the table, the release and the report from the finished groups; return the rows."""
    rows = collect(config, groups)
    output = Path(config.output)
    csv_path, _ = write_table(rows, output)
    release = write_release(config, rows)
    states = [read_state(group_dir(config, g)) for g in groups]
    passes = [s["passes_over_shards"] for s in states if s.get("passes_over_shards") is not None]
    summary = {
        "release_name": config.release_name, "model": config.model, "SAEs": len(rows), "groups": len(groups),
        "training time (s, all groups)": round(sum(s.get("train_seconds", 0.0) for s in states), 1),
        "evaluation time (s)": round(sum(s.get("eval_seconds", 0.0) for s in states), 1),
        "most passes over a site's shards in one group": round(max(passes), 3) if passes else None,
        "table": f"../{csv_path.name}", "release index": f"../{release.name}/index.json",
    }
    page = write_report(rows, output, summary)
    print(f"suite: {len(rows)} SAEs -> {csv_path}, release {release}, report {page}", flush=True)
    return rows
