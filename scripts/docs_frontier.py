"""Draw docs/assets/frontier.png, the README's and the docs' picture, from a quality run.

    python scripts/docs_frontier.py [runs/quality/quality.csv]

The CSV is what ``python benchmarks/quality.py --quick`` writes; the picture shows the
JumpReLU frontiers (gs_lightning's default recipe against SAELens at the same numbers) on
its first site, FVU and delta LM loss against L0.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from gs_lightning.plots import plot_frontier_curves

ROOT = Path(__file__).resolve().parents[1]


def main(source: str = "runs/quality/quality.csv", out: str = "docs/assets/frontier.png") -> Path:
    rows = list(csv.DictReader(open(ROOT / source)))
    site = rows[0]["site"]
    curves: dict[str, list[dict[str, float]]] = {}
    for row in rows:
        if row["site"] == site and row["family"] == "jumprelu":
            label = "gs_lightning" if row["tool"] == "gs_lightning" else f"{row['tool']} (our numbers)"
            curves.setdefault(label, []).append({k: float(row[k]) for k in ("l0", "fvu", "delta_loss")})
    return plot_frontier_curves({f"{site}, JumpReLU, held-out tokens": curves}, ROOT / out)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
