"""The tables, files and headline figures of ``benchmarks/synthetic.py``, from its rows alone.

Nothing here trains or reads a world: every function takes the rows the benchmark
scored (dicts with ``world``, ``tool``, ``family``, ``setting``, ``l0``, ``mcc``, ``f1``,
...), so ``--rescore`` and the tests use them on a saved ``synthetic.json``.

Two trainers rarely land on the same L0, so they are compared on curves: a (tool,
architecture) pair's SAEs of one world, joined in L0 order and read at the other's L0s
where the two overlap (:func:`gs_lightning.evaluation.frontier.interpolate`, linear in log L0;
nothing is extrapolated). Scores are higher-is-better, so a comparison is a difference,
ours minus theirs, and its worst case is the smallest.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gs_lightning.evaluation import frontier
from gs_lightning.evaluation.plots import plot_frontier_curves

TUNE_WORLD = "tune"
"""The world ``--tune`` sweeps by default."""
TUNING_WORLDS = (TUNE_WORLD, "tune_flat")
"""The worlds the defaults were tuned on (with and without a hierarchy): their figures are
printed apart, as ``tune:`` lines, never in the ``result:`` lines."""
OURS, THEIRS = "gs_lightning", "SAELens"
HEADLINE = (  # (figure, our family, their family, score)
    ("synth_jumprelu_mcc_vs_saelens", "jumprelu", "jumprelu", "mcc"),
    ("synth_batchtopk_mcc_vs_saelens", "batchtopk", "batchtopk", "mcc"),
    ("synth_matryoshka_mcc_vs_saelens", "matryoshka", "matryoshka", "mcc"),
    ("synth_jumprelu_f1_vs_saelens", "jumprelu", "jumprelu", "f1"),
)
COLUMNS = (  # (header, row key, format)
    ("tool", "tool", "{}"), ("architecture", "family", "{}"), ("setting", "setting", "{}"),
    ("L0", "l0", "{:.2f}"), ("MCC", "mcc", "{:.4f}"), ("F1", "f1", "{:.4f}"),
    ("uniqueness", "uniqueness", "{:.4f}"), ("EV", "explained_variance", "{:.4f}"),
    ("dead %", "dead_frac", "{:.1%}"), ("train s", "seconds", "{:.1f}"),
)

NEAR_TARGET = 1.5
"""A ``--tune`` config competes when its L0 is within this factor of its target."""

Point = tuple[float, float]


def points(rows: Sequence[dict[str, Any]], key: str) -> list[Point]:
    """``(l0, row[key])`` of each row."""
    return [(float(r["l0"]), float(r[key])) for r in rows]


def differences(ours: Sequence[Point], theirs: Sequence[Point]) -> list[Point]:
    """``(l0, ours - theirs)`` at every L0 of either curve inside the range both cover."""
    out = []
    for l0 in sorted({p[0] for p in ours} | {p[0] for p in theirs}):
        a, b = frontier.interpolate(ours, l0), frontier.interpolate(theirs, l0)
        if a is not None and b is not None:
            out.append((l0, a - b))
    return out


def margin_over_best(ours: Sequence[Point], others: Sequence[Sequence[Point]]) -> list[Point]:
    """``(l0, ours - best)`` where ``best`` is the highest of ``others`` read at ``l0``: at every
    L0 of any curve inside our range where at least one of the others is defined."""
    out = []
    for l0 in sorted({p[0] for curve in (ours, *others) for p in curve}):
        mine = frontier.interpolate(ours, l0)
        found = [v for v in (frontier.interpolate(c, l0) for c in others) if v is not None]
        if mine is not None and found:
            out.append((l0, mine - max(found)))
    return out


def curves(rows: Sequence[dict[str, Any]], world: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``{(tool, family): rows}`` of one world, in the order the rows came."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["world"] == world:
            out.setdefault((row["tool"], row["family"]), []).append(row)
    return out


def world_figures(rows: Sequence[dict[str, Any]], world: str) -> dict[str, list[float]]:
    """Each headline figure's differences at matched L0 in one world (empty: no overlap)."""
    by = curves(rows, world)
    out: dict[str, list[float]] = {}
    for name, mine, theirs, key in HEADLINE:
        if (OURS, mine) in by and (THEIRS, theirs) in by:
            found = differences(points(by[OURS, mine], key), points(by[THEIRS, theirs], key))
            out[name] = [d for _, d in found]
    if (OURS, "jumprelu") in by:
        others = [points(r, "mcc") for label, r in by.items() if label != (OURS, "jumprelu")]
        out["synth_jumprelu_mcc_vs_best"] = [d for _, d in margin_over_best(points(by[OURS, "jumprelu"], "mcc"),
                                                                              others)]
    ours = [r["dead_frac"] for (tool, _), group in by.items() if tool == OURS for r in group]
    if ours:
        out["synth_dead_frac_max"] = ours
    return out


def figures(rows: Sequence[dict[str, Any]], worlds: Sequence[str]) -> dict[str, float]:
    """The headline figures over ``worlds``: the worst (smallest) ours-minus-theirs difference
    at matched L0 over every L0 and world, and the largest never-firing fraction of ours.
    A figure none of the worlds could compare is left out."""
    pooled: dict[str, list[float]] = {}
    for world in worlds:
        for name, values in world_figures(rows, world).items():
            pooled.setdefault(name, []).extend(values)
    return {name: (max(v) if name == "synth_dead_frac_max" else min(v)) for name, v in pooled.items() if v}


def table(rows: Sequence[dict[str, Any]], world: str) -> str:
    """One world's rows as a Markdown table."""
    mine = [r for r in rows if r["world"] == world]
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
    lines += ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in COLUMNS) + " |" for r in mine]
    return "\n".join(lines)


def given(settings: dict[str, Any], world: str) -> str:
    """What each side was given in ``world``: one line under its table."""
    w = settings["worlds"].get(world, {})
    samples = settings["steps"] * settings["batch"]
    return (f"Each SAE: width {w.get('width')}, {settings['steps']:,} steps of {settings['batch']:,} rows "
            f"({samples:,} samples) from the same stored stream of {w.get('rows', 0):,} rows in the same order "
            f"(true L0 {w.get('true_l0', 0):.2f}); scored on the same {w.get('val_rows', 0):,} held-out rows. "
            f"gs_lightning: each class's default recipe at the L0 target or k of its row, one packed fit per "
            f"architecture (train s: its wall time over its members), {_spelled(settings['ours'])}. "
            f"SAELens: its own SAETrainer stepped on each batch, {_spelled(settings['peer'])}.")


def _spelled(settings: dict[str, Any]) -> str:
    """``a=1, b=2`` of a flat dict; ``group: a=1; other: ...`` of a dict of dicts."""
    if all(isinstance(v, dict) for v in settings.values()):
        return "; ".join(f"{k}: {_spelled(v) or 'defaults'}" for k, v in settings.items())
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def best_settings(rows: Sequence[dict[str, Any]], world: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The winners of a ``--tune`` grid: the row of highest MCC of each (tool, family) in
    ``world`` among those within :data:`NEAR_TARGET` of their target L0 (MCC moves with L0,
    so a config that missed its target wins nothing), or among all if none is."""
    out = {}
    for label, group in curves(rows, world).items():
        near = [r for r in group if r["target"] / NEAR_TARGET <= r["l0"] <= r["target"] * NEAR_TARGET]
        out[label] = max(near or group, key=lambda r: r["mcc"])
    return out


def write(payload: dict[str, Any], output: Path, stem: str) -> list[Path]:
    """``<stem>.json`` (the payload), ``<stem>.csv`` (its rows) and, for a benchmark run,
    ``<stem>.png`` (MCC and F1 against L0, one row of panels per world)."""
    output.mkdir(parents=True, exist_ok=True)
    rows = payload["rows"]
    paths = [output / f"{stem}.json", output / f"{stem}.csv"]
    paths[0].write_text(json.dumps(payload, indent=2) + "\n")
    with open(paths[1], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if payload["settings"].get("mode") != "tune":  # a grid at one L0 draws no curve
        worlds = list(dict.fromkeys(r["world"] for r in rows))
        panels = {w: {f"{t} {f}": group for (t, f), group in curves(rows, w).items()} for w in worlds}
        paths.append(plot_frontier_curves(panels, output / f"{stem}.png", keys=(("mcc", "MCC"), ("f1", "F1"))))
    return paths


def report(payload: dict[str, Any], output: Path, stem: str = "synthetic") -> dict[str, float]:
    """Write ``payload``'s files, print a table per world and the figures; return the
    headline figures (``result:`` lines, over every world but the tuning world's)."""
    rows, settings = payload["rows"], payload["settings"]
    for world in dict.fromkeys(r["world"] for r in rows):
        print(f"\n## {world}\n\n{table(rows, world)}\n\n{given(settings, world)}")
        if settings.get("mode") == "tune":
            for (tool, family), row in best_settings(rows, world).items():
                print(f"best {tool} {family} on MCC: {row['setting']} (MCC {row['mcc']:.4f}, L0 {row['l0']:.2f})")
    paths = write(payload, output, stem)
    print("\nwrote " + ", ".join(str(p) for p in paths))
    if settings.get("mode") == "tune":
        return {}
    worlds = list(dict.fromkeys(r["world"] for r in rows))
    headline = figures(rows, [w for w in worlds if w not in TUNING_WORLDS])
    for name, value in headline.items():
        print(f"result: {name} {value:.4g}")
    for name, value in figures(rows, [w for w in worlds if w in TUNING_WORLDS]).items():
        print(f"tune: {name} {value:.4g}")
    return headline
