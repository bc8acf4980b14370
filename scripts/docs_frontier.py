"""Draw docs/assets/frontier.png, the README's and the docs' picture, from a quality run.

    python scripts/docs_frontier.py [docs/results/quality.json]

The JSON is what ``python benchmarks/quality.py`` writes (its record is committed as
docs/results/quality.json); the picture shows the JumpReLU frontiers of both tools, each
configuration a curve, on every held-out site at the run's full length: FVU and delta LM
loss against L0 (a site without a next-token loss has no delta LM loss).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gs_lightning.evaluation.plots import plot_frontier_curves

ROOT = Path(__file__).resolve().parents[1]


def main(source: str = "docs/results/quality.json", out: str = "docs/assets/frontier.png") -> Path:
    rows = json.loads((ROOT / source).read_text())["rows"]
    steps = max(r["steps"] for r in rows)
    panels: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["held_out"] and r["family"] == "jumprelu" and r["steps"] == steps:
            panel = panels.setdefault(f"{r['site']} (held out), JumpReLU, {steps:,} steps", {})
            panel.setdefault(f"{r['tool']}, {r['config']}", []).append(r)
    return plot_frontier_curves(panels, ROOT / out)


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
