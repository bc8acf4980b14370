"""The suite's report: the figures the Gemma Scope report draws, and one page linking them.

* ``fvu_by_layer.png`` and ``delta_loss_by_layer.png``: one panel per site kind, the metric
  against layer, one line per width and sparsity level;
* ``frontier.png``: one panel per site kind, L0 against FVU, one curve per site (layer);
* ``report.md``: the suite table and the figures.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from gs_lightning.evaluation.plots import log_l0_axis  # noqa: E402
from gs_lightning.lm.sites import SITE_KINDS, TRANSCODER  # noqa: E402

REPORT = "report"
KIND_TITLES = {kind.release: kind.label for kind in SITE_KINDS.values()} | {TRANSCODER: "transcoders"}


def _kinds(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["kind"] for r in rows))


def _panels(n: int) -> tuple[plt.Figure, list[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    return fig, list(axes[0])


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_by_layer(rows: Sequence[dict[str, Any]], metric: str, label: str, path: Path) -> Path:
    """``metric`` against layer, a panel per site kind, a line per (width, sparsity level)."""
    kinds = _kinds(rows)
    fig, axes = _panels(len(kinds))
    for ax, kind in zip(axes, kinds):
        lines: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if r["kind"] == kind and r.get(metric) is not None:
                lines[(r["d_sae"], r["sparsity_key"], r["sparsity"])].append((r["layer"], r[metric]))
        for (d_sae, key, level), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{key} {level:g}, {d_sae} latents")
        ax.set(title=KIND_TITLES.get(kind, kind), xlabel="layer", ylabel=label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_frontiers(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """L0 against FVU, a panel per site kind, a curve per site (its sparsity levels)."""
    kinds = _kinds(rows)
    fig, axes = _panels(len(kinds))
    for ax, kind in zip(axes, kinds):
        curves: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r["kind"] == kind:
                curves[(r["layer"], r["d_sae"])].append((r["l0"], r["fvu"]))
        for (layer, d_sae), points in sorted(curves.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"layer {layer}, {d_sae}")
        log_l0_axis(ax)
        ax.set(title=KIND_TITLES.get(kind, kind), xlabel="L0", ylabel="FVU")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


COLUMNS = ("site", "d_sae", "sparsity_key", "sparsity", "l0", "fvu", "delta_loss", "dead_frac", "dense_frac")


def write_report(rows: Sequence[dict[str, Any]], output: Path, summary: dict[str, Any]) -> Path:
    """Draw the figures into ``output/report`` and write ``report.md``; return the page's path."""
    folder = output / REPORT
    folder.mkdir(parents=True, exist_ok=True)
    figures = {
        "FVU against layer": plot_by_layer(rows, "fvu", "FVU", folder / "fvu_by_layer.png"),
        "Delta LM loss against layer": plot_by_layer(rows, "delta_loss", "delta LM loss (nats)",
                                                     folder / "delta_loss_by_layer.png"),
        "L0-FVU frontier per site": plot_frontiers(rows, folder / "frontier.png"),
    }
    lines = [f"# Suite report: {summary['release_name']}", ""]
    lines += [f"- {key}: {value}" for key, value in summary.items() if key != "release_name"]
    lines += ["", "Figures:", ""] + [f"## {title}\n\n![{title}]({p.name})\n" for title, p in figures.items()]
    lines += ["## Every SAE", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |")
    page = folder / "report.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
