"""The tables, files and headline figures of ``benchmarks/quality.py``, from its rows alone.

Nothing here trains or reads activations: every function takes the rows the benchmark
measured (dicts with ``site``, ``held_out``, ``tool``, ``family``, ``config``, ``setting``,
``steps``, ``l0``, ``fvu``, ``delta_loss``, ``never_fire``, ...), so ``--rescore`` and
the tests use them on a saved ``quality.json``.

A *curve* is one configuration of one tool and architecture at one site and run length:
its SAEs over the L0 targets (or k), joined in L0 order. Each side may bring several
configurations; at each L0 a side counts with its best (:func:`gs_lightning.evaluation.frontier.lowest`),
so the comparison is frontier against frontier, each tool at its best setting there,
read where both are defined (nothing is extrapolated). Lower is better for FVU and delta
LM loss, so a figure is a ratio, ours over theirs, and its worst case is the largest.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gs_lightning.evaluation import frontier
from gs_lightning.evaluation.plots import plot_frontier_curves

OURS, THEIRS = "gs_lightning", "SAELens"
FAMILIES = ("jumprelu", "topk", "batchtopk", "matryoshka")
COLUMNS = (  # (header, row key, format)
    ("tool", "tool", "{}"), ("architecture", "family", "{}"), ("configuration", "config", "{}"),
    ("setting", "setting", "{}"), ("steps", "steps", "{:,}"), ("L0", "l0", "{:.2f}"), ("FVU", "fvu", "{:.4f}"),
    ("delta LM loss", "delta_loss", "{:.4f}"), ("never fire", "never_fire", "{:.1%}"), ("dense", "dense", "{:.1%}"),
    ("train s", "seconds", "{:.1f}"),
)
Point = tuple[float, float]
Curves = dict[str, list[dict[str, Any]]]


def points(rows: Sequence[dict[str, Any]], key: str) -> list[Point]:
    """``(l0, row[key])`` of the rows that have a value for ``key``."""
    return [(float(r["l0"]), float(r[key])) for r in rows if r.get(key) is not None]


def curves(rows: Sequence[dict[str, Any]], site: str, steps: int, tool: str, family: str) -> Curves:
    """``{config: rows}`` of one tool's architecture at one site and run length."""
    out: Curves = {}
    for row in rows:
        if (row["site"], row["steps"], row["tool"], row["family"]) == (site, steps, tool, family):
            out.setdefault(row["config"], []).append(row)
    return out


def best_at(by_config: Curves, l0: float, key: str) -> tuple[float, str] | None:
    """The lowest ``key`` any configuration reaches at ``l0``, and that configuration."""
    found = [(v, name) for name, rows in by_config.items()
             if (v := frontier.interpolate(points(rows, key), l0)) is not None]
    return min(found) if found else None


def comparison(rows: Sequence[dict[str, Any]], site: str, steps: int, family: str) -> list[dict[str, Any]]:
    """Our frontier against SAELens' at every L0 of either side where both are defined: per
    L0, each side's best FVU and delta LM loss, the configuration that gave it, and that
    configuration's never-firing fraction (read on the same curve)."""
    ours, theirs = (curves(rows, site, steps, tool, family) for tool in (OURS, THEIRS))
    out = []
    for l0 in sorted({float(r["l0"]) for group in (*ours.values(), *theirs.values()) for r in group}):
        mine, other = best_at(ours, l0, "fvu"), best_at(theirs, l0, "fvu")
        if mine is None or other is None:
            continue
        entry = {"l0": l0, "fvu_ratio": mine[0] / other[0], "ours": mine[1], "theirs": other[1],
                 "ours_never_fire": frontier.interpolate(points(ours[mine[1]], "never_fire"), l0),
                 "theirs_never_fire": frontier.interpolate(points(theirs[other[1]], "never_fire"), l0)}
        dl_mine, dl_other = best_at(ours, l0, "delta_loss"), best_at(theirs, l0, "delta_loss")
        if dl_mine is not None and dl_other is not None and dl_other[0] > 0:
            entry["delta_loss_ratio"] = dl_mine[0] / dl_other[0]
        out.append(entry)
    return out


def site_figures(rows: Sequence[dict[str, Any]], site: str, steps: int) -> dict[str, list[float]]:
    """Each figure's values at one site and run length (empty lists: nothing to compare)."""
    out: dict[str, list[float]] = {}
    for family in FAMILIES:
        found = comparison(rows, site, steps, family)
        out.setdefault(f"{family}_fvu_ratio_vs_saelens", []).extend(c["fvu_ratio"] for c in found)
        if family == "jumprelu":
            out.setdefault("jumprelu_delta_loss_ratio_vs_saelens", []).extend(
                c["delta_loss_ratio"] for c in found if "delta_loss_ratio" in c)
            out.setdefault("jumprelu_dead_vs_saelens", []).extend(
                c["ours_never_fire"] - c["theirs_never_fire"] for c in found)
    mine = [r["never_fire"] for r in rows if (r["site"], r["steps"], r["tool"]) == (site, steps, OURS)]
    out["dead_frac_max"] = mine
    return out


def figures(rows: Sequence[dict[str, Any]], held_out: bool) -> dict[str, float]:
    """The figures over the held-out sites (or the tuning sites): the worst ratio at matched L0
    over every L0 and site, the worst difference in never-firing fraction, our largest
    never-firing fraction. A shorter run's figures get the suffix ``_<steps>``."""
    lengths = sorted({r["steps"] for r in rows})
    pooled: dict[str, list[float]] = {}
    for steps in lengths:
        suffix = "" if steps == lengths[-1] else f"_{steps}"
        for site in dict.fromkeys(r["site"] for r in rows if r["held_out"] == held_out):
            for name, values in site_figures(rows, site, steps).items():
                pooled.setdefault(name + suffix, []).extend(values)
    return {name: max(values) for name, values in pooled.items() if values}


def table(rows: Sequence[dict[str, Any]], site: str) -> str:
    """One site's rows as a Markdown table."""
    mine = [r for r in rows if r["site"] == site]
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join("-" if r.get(key) is None else fmt.format(r[key]) for _, key, fmt in COLUMNS) + " |"
              for r in mine]
    return "\n".join(lines)


def matched(rows: Sequence[dict[str, Any]], site: str, steps: int, family: str) -> str:
    """Our frontier against SAELens' at matched L0: which configuration each side's best was."""
    lines = []
    for c in comparison(rows, site, steps, family):
        dl = f", delta loss x{c['delta_loss_ratio']:.3f}" if "delta_loss_ratio" in c else ""
        lines.append(f"  L0 {c['l0']:6.2f}: FVU x{c['fvu_ratio']:.3f}{dl}; ours {c['ours']} "
                     f"(never fire {c['ours_never_fire']:.1%}), SAELens {c['theirs']} "
                     f"(never fire {c['theirs_never_fire']:.1%})")
    return "\n".join(lines)


def write(payload: dict[str, Any], output: Path) -> list[Path]:
    """``quality.json`` (the payload), ``quality.csv`` (its rows) and ``quality_frontier.png``
    (FVU and delta LM loss against L0, one row of panels per site and run length)."""
    output.mkdir(parents=True, exist_ok=True)
    rows = payload["rows"]
    paths = [output / "quality.json", output / "quality.csv"]
    paths[0].write_text(json.dumps(payload, indent=2) + "\n")
    with open(paths[1], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    panels: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        role = "held out" if r["held_out"] else "tuning"
        panel = f"{r['site']} ({role}, {r['steps']:,} steps)"
        panels.setdefault(panel, {}).setdefault(f"{r['tool']} {r['family']} {r['config']}", []).append(r)
    paths.append(plot_frontier_curves(panels, output / "quality_frontier.png"))
    return paths


def report(payload: dict[str, Any], output: Path) -> dict[str, float]:
    """Write ``payload``'s files, print a table per site and the comparisons at matched L0;
    return the held-out figures (``result:`` lines; the tuning sites' print as ``tune:``)."""
    rows, settings = payload["rows"], payload["settings"]
    for site in dict.fromkeys(r["site"] for r in rows):
        role = "held out" if next(r["held_out"] for r in rows if r["site"] == site) else "tuning site"
        print(f"\n## {site} ({role})\n\n{table(rows, site)}")
        for steps in sorted({r["steps"] for r in rows if r["site"] == site}):
            for family in FAMILIES:
                text = matched(rows, site, steps, family)
                if text:
                    print(f"\n{family}, {steps:,} steps, ours / SAELens at matched L0 (each at its best configuration):"
                          f"\n{text}")
    print(f"\n{given(settings)}")
    paths = write(payload, output)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    headline = figures(rows, held_out=True)
    for name, value in headline.items():
        print(f"result: {name} {value:.4g}")
    for name, value in figures(rows, held_out=False).items():
        print(f"tune: {name} {value:.4g}")
    return headline


def given(settings: dict[str, Any]) -> str:
    """What each side was given, in one paragraph under the tables."""
    peers = "; ".join(f"{name}: {_spelled(fields)}" for name, fields in settings["peer_jumprelu"].items())
    return (f"Each SAE: {settings['steps']:,} steps of {settings['batch']:,} activations from one seeded stream, "
            f"the same batches in the same order for every fit of a site (checked by fingerprint), scored on the "
            f"same held-out tokens. gs_lightning: each class's default recipe, {_spelled(settings['ours'])}; "
            f"JumpReLU configurations {', '.join(settings['ours_jumprelu'])}. SAELens: its own SAETrainer stepped "
            f"on each batch, {_spelled(settings['peer_trainer'])}; JumpReLU configurations: {peers}; TopK family: "
            f"{_spelled(settings['peer_topk'])}.")


def _spelled(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "its defaults"


def tune_ranking(rows: Sequence[dict[str, Any]], reference: str) -> list[tuple[float, str]]:
    """A ``--tune`` grid's SAELens JumpReLU configurations, best first: each one's geometric
    mean FVU ratio to the ``reference`` configuration at matched L0, over every site (so a
    configuration that never overlaps the reference's L0 range ranks last)."""
    logs: dict[str, list[float]] = {}
    for site in dict.fromkeys(r["site"] for r in rows):
        for steps in {r["steps"] for r in rows}:
            by = curves(rows, site, steps, THEIRS, "jumprelu")
            if reference not in by:
                continue
            for name, group in by.items():
                found = frontier.ratios(points(group, "fvu"), points(by[reference], "fvu"))
                logs.setdefault(name, []).extend(math.log(r) for _, r in found)
    ranked = [(math.exp(sum(v) / len(v)) if v else math.inf, name) for name, v in logs.items()]
    return sorted(ranked)
