"""Write the static feature browser: an index of latents, a page per latent, a summary.

The site is a folder that opens from ``file://`` with no server::

    index.html, app.js, style.css        the page (gs_lightning/browse/assets)
    data/summary.js                      GS_SUMMARY: the SAE's figures and density histogram
    data/index.js                        GS_INDEX: one compact row per latent (sort, search, flags)
    data/latents/chunk_00000.js ...      GS_CHUNK(n, [...]): full records of latents n*chunk ...

Data are JavaScript files rather than JSON because browsers refuse ``fetch()`` of local
files; a latent's chunk is added as a script tag when its page is opened, so 16k latents
cost the index page only their index rows.

A latent record (what :func:`write_site` takes, one per latent, in id order)::

    {"id": 7, "count": 120, "frequency": 1.3e-4, "mean": 0.8, "max": 2.1,
     "histogram": {"edges": [...], "counts": [...]},
     "groups": [{"kind": "top" | "interval", "title": str, "bin_min": float, "bin_max": float,
                 "bin_contains": float, "examples": [{"tokens": [str], "values": [float], "peak": int}]}],
     "effects": [{"title": str, "promoted": [[token, value]], "suppressed": [[token, value]]}],
     "neighbours": [[latent, cosine]],
     "input_neighbours": [[latent, cosine]]}       (transcoders only: by encoder direction)
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gs_lightning.evaluation.metrics import DENSE_THRESHOLD

ASSETS = Path(__file__).with_name("assets")
INDEX_COLUMNS = ("id", "frequency", "max", "mean", "l0_share", "flag", "search")
SEARCH_TOKENS = 6
"""Distinct firing tokens of a latent's top examples that the index searches and shows."""


def write_site(out: str | Path, summary: dict[str, Any], records: Iterable[dict[str, Any]], d_sae: int,
               dense_threshold: float = DENSE_THRESHOLD, chunk_size: int = 256) -> Path:
    """Write the site into ``out`` (replacing it) and return its ``index.html``.

    Built in ``<out>.partial`` and renamed at the end, so an interrupted build never
    leaves a site that looks whole.

    Args:
        out: Folder of the site.
        summary: ``name``, ``facts`` (``[[label, value], ...]`` shown on the summary page)
            and optionally ``run`` (a link back to the run, relative to ``out``).
        records: One latent record per latent, ids ``0 .. d_sae - 1`` in order (see the
            module docstring); consumed once, chunk by chunk.
        d_sae: Number of latents.
        dense_threshold: Frequency above which a latent is flagged dense (evaluate's, 0.1).
        chunk_size: Latent records per data file.
    """
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "data" / "latents").mkdir(parents=True)
    for asset in ("index.html", "app.js", "style.css"):
        shutil.copyfile(ASSETS / asset, partial / asset)
    rows = []
    for number, chunk in enumerate(_chunks(records, chunk_size)):
        for offset, record in enumerate(chunk):
            if record["id"] != number * chunk_size + offset:
                raise ValueError(f"latent records must come in id order: got {record['id']} at "
                                 f"{number * chunk_size + offset}")
            rows.append(_index_row(record, dense_threshold))
        _write_js(partial / "data" / "latents" / f"chunk_{number:05d}.js", f"GS_CHUNK({number}, ", chunk, ");")
    if len(rows) != d_sae:
        raise ValueError(f"got {len(rows)} latent records for an SAE of {d_sae} latents")
    total = sum(r[1] for r in rows) or 1.0
    for row in rows:
        row[4] = row[1] / total  # the latent's share of the SAE's L0
    frequencies = [r[1] for r in rows]
    _write_js(partial / "data" / "index.js", "const GS_INDEX = ", {"columns": INDEX_COLUMNS, "rows": rows}, ";")
    summary = {**summary, "chunk_size": chunk_size, "density": density_histogram(frequencies)}
    _write_js(partial / "data" / "summary.js", "const GS_SUMMARY = ", summary, ";")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out / "index.html"


def density_histogram(frequencies: list[float], bins: int = 40) -> dict[str, list[float]]:
    """Histogram of log10 firing frequency over the latents that fired, from 1e-7 (or the
    rarest) up to 1."""
    logs = [math.log10(f) for f in frequencies if f > 0]
    low = min([-7.0, *(math.floor(x) for x in logs)])
    width = -low / bins
    counts = [0] * bins
    for x in logs:
        counts[min(bins - 1, int((x - low) / width))] += 1
    return {"edges": [low + i * width for i in range(bins + 1)], "counts": counts}


def _index_row(record: dict[str, Any], dense_threshold: float) -> list[Any]:
    flag = "dead" if record["count"] == 0 else "dense" if record["frequency"] > dense_threshold else ""
    tokens: list[str] = []
    for group in record["groups"]:
        if group["kind"] != "top":
            continue
        for example in group["examples"]:
            token = example["tokens"][example["peak"]].strip()
            if token and token not in tokens:
                tokens.append(token)
    return [record["id"], record["frequency"], record["max"], record["mean"], 0.0, flag,
            " ".join(tokens[:SEARCH_TOKENS])]


def _chunks(records: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_js(path: Path, prefix: str, data: Any, suffix: str) -> None:
    # ASCII-only JSON is valid JavaScript whatever the page's encoding; NaN is not JSON.
    path.write_text(prefix + json.dumps(data, allow_nan=False, separators=(",", ":")) + suffix + "\n")
