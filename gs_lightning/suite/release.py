"""Write a suite's release: Gemma Scope layout, SAELens folders and an index of both.

Under ``<output>/release``::

    <name>-<kind>/layer_{L}/width_{W}/average_l0_{N}/params.npz     Gemma Scope layout
    saelens/<name>-<kind>/layer_{L}/width_{W}/average_l0_{N}/        SAELens folders
    pretrained_saes.yaml    the SAELens folders as entries of SAELens' pretrained-SAE directory
    index.json              every SAE: where each format holds it, and its figures

``<kind>`` is ``res``, ``mlp``, ``att`` or ``transcoder``, as Gemma Scope names its
repositories; ``N`` is the SAE's L0 on the held-out harvest, rounded. The release is
rebuilt whole each time (in a temporary folder, then swapped in), so it always matches
the suite table. Formats that cannot hold an SAE (SAELens has no transcoder folder here;
Gemma Scope holds JumpReLU and ReLU only) are left out of its index entry, with why.
Each format is written through the format registry (:mod:`gs_lightning.formats`);
:data:`LAYOUTS` says which ones a release holds and where.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from gs_lightning import formats
from gs_lightning.errors import ConfigError
from gs_lightning.formats.gemma_scope import gemma_scope_folder
from gs_lightning.formats.io import load_sae, load_sae_config
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.state import write_json

RELEASE = "release"
# The formats a release holds, each under its own subfolder of the release ("": its root).
LAYOUTS = {"gemma_scope": "", "saelens": "saelens"}


def leaf(row: dict[str, Any], clashes: Counter) -> str:
    """The SAE's ``layer/width/average_l0`` folder; two SAEs of a site and width that round
    to the same L0 get their sparsity level appended."""
    folder = gemma_scope_folder(row["layer"], row["d_sae"], row["l0"])
    key = (row["kind"], folder)
    return folder if clashes[key] == 1 else f"{folder}_{row['sparsity_key']}={row['sparsity']}"


def write_release(config: SuiteConfig, rows: list[dict[str, Any]]) -> Path:
    """Build the release from the suite's rows (each with its saved SAE path); return its folder."""
    final = Path(config.output) / RELEASE
    tmp = final.with_name(f".{RELEASE}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    clashes = Counter((r["kind"], gemma_scope_folder(r["layer"], r["d_sae"], r["l0"])) for r in rows)
    entries = [_release_one(config, row, tmp, leaf(row, clashes)) for row in rows]
    write_json(tmp / "index.json", entries)
    (tmp / "pretrained_saes.yaml").write_text(yaml.safe_dump(_directory(config, entries), sort_keys=False))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _release_one(config: SuiteConfig, row: dict[str, Any], root: Path, folder: str) -> dict[str, Any]:
    source = Path(config.output) / row["sae"]
    sae = load_sae(source)
    repo = f"{config.release_name}-{row['kind']}"
    entry: dict[str, Any] = {k: row[k] for k in ("site", "kind", "layer", "d_sae", "sparsity_key", "sparsity",
                                                 "l0", "fvu", "delta_loss", "dead_frac", "dense_frac")}
    entry.update(id=f"{repo}/{folder}", source=row["sae"])
    meta = load_sae_config(source).get("metadata", {})
    for name, subfolder in LAYOUTS.items():
        try:
            path = formats.get(name).write(sae, root / subfolder / repo / folder, metadata=meta,
                                           layer=row["layer"], average_l0=row["l0"])
            entry[name] = str(path.relative_to(root))
        except ConfigError as err:
            entry[name], entry[f"{name}_skipped"] = None, str(err)
    return entry


def _directory(config: SuiteConfig, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """SAELens' ``pretrained_saes.yaml`` form: one release per kind, its SAEs with id, path and L0.

    ``repo_id`` is the local folder of the release's SAELens folders (upload it to a hub
    repository and put that repository's id here to publish it).
    """
    directory: dict[str, Any] = {}
    root = (Path(config.output) / RELEASE).resolve()
    for entry in entries:
        if entry["saelens"] is None:
            continue
        repo = entry["id"].split("/", 1)[0]
        release = directory.setdefault(repo, {
            "repo_id": str(root / "saelens" / repo), "model": config.model, "saes": []})
        path = entry["saelens"].split("/", 2)[2]
        release["saes"].append({"id": path, "path": path, "l0": round(entry["l0"], 2),
                                "variance_explained": round(1 - entry["fvu"], 4), "hook_name": entry["site"]})
    return directory
