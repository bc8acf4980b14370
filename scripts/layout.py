"""The package's stages and the imports between them, read from the code; draws
``docs/assets/layout.png`` for ``docs/guide/layout.md``.

    python scripts/layout.py            # print the stage-to-stage imports and redraw the picture

``tests/test_layout.py`` holds the package to the same stages: imports only run down them.
"""

from __future__ import annotations

import ast
import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gs_lightning"

# Lowest first: a module may import its own stage and any stage below it, never one above.
STAGES: list[tuple[str, ...]] = [
    ("errors", "console", "embedded", "kernels"),
    ("saes", "lm"),
    ("formats", "data"),
    ("evaluation", "harvest"),
    ("train",),
    ("browse",),
    ("cli",),
    ("sweep", "suite"),
]
RANK = {name: rank for rank, names in enumerate(STAGES) for name in names}
FACE = ("__init__", "__main__", "_moved")
EVERYONE = ("errors", "console")  # used from every stage: drawn without their arrows  # the package's face, its entry point, the old paths

WHAT = {
    "errors": "one-line errors", "console": "quiet console", "embedded": "tiny Gemma 2 + KJV",
    "kernels": "JumpReLU maths, fused steps", "saes": "one class per variant",
    "lm": "model, sites, text", "formats": "file formats, load/save, export",
    "data": "activation sources, shards", "evaluation": "scoring, evaluate, delta loss",
    "harvest": "model and world harvests", "train": "LightningModule, packed, parallel",
    "browse": "feature browser", "cli": "LightningCLI + subcommands",
    "sweep": "W&B sweeps", "suite": "suites: plan to release",
}


def stage_of(module: str) -> str:
    """The stage a dotted module name belongs to: its first name under ``gs_lightning``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> set[str]:
    """The gs_lightning modules a file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gs_lightning"):
            if node.module == "gs_lightning":
                found.update(f"gs_lightning.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("gs_lightning"))
    return found


def stage_edges(package: Path = PACKAGE) -> collections.Counter[tuple[str, str]]:
    """How many module-to-module imports run from each stage to each other one."""
    edges: collections.Counter[tuple[str, str]] = collections.Counter()
    for module, path in modules(package).items():
        here = stage_of(module)
        for target in imports(path):
            there = stage_of(target)
            if here != there and here not in FACE and there not in FACE:
                edges[here, there] += 1
    return edges


def draw(edges: collections.Counter[tuple[str, str]], out: Path) -> None:
    """Stages as rows of boxes, lowest at the bottom; an arrow for each stage-to-stage import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    place = {}
    for rank, names in enumerate(STAGES):
        for i, name in enumerate(names):
            place[name] = ((i + 1) / (len(names) + 1), rank)
    fig, ax = plt.subplots(figsize=(10, 8))
    for (a, b), count in sorted(edges.items()):
        if b in EVERYONE:
            continue
        (xa, ya), (xb, yb) = place[a], place[b]
        ax.annotate("", xy=(xb, yb + 0.22), xytext=(xa, ya - 0.22),
                    arrowprops={"arrowstyle": "->", "color": "#7f8fa3", "alpha": 0.7,
                                    "lw": 0.6 + 0.25 * min(count, 8)})
    for name, (x, y) in place.items():
        ax.text(x, y, f"{name}/\n{WHAT[name]}" if (PACKAGE / name).is_dir() else f"{name}.py\n{WHAT[name]}",
                ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round", "facecolor": "#dde8f5", "edgecolor": "#46627f"})
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, len(STAGES) - 0.4)
    ax.axis("off")
    ax.set_title("gs_lightning by stage: imports run down (arrow width: number of imports;\n"
                 "arrows into errors.py and console.py, which most stages use, left out)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    edges = stage_edges()
    upward = [(a, b) for a, b in edges if RANK[b] > RANK[a]]
    for (a, b), count in sorted(edges.items(), key=lambda e: (-RANK[e[0][0]], e[0])):
        print(f"{a:>10} -> {b:<10} {count:3d}")
    print(f"{len(edges)} stage-to-stage arrows, {len(upward)} running up")
    draw(edges, ROOT / "docs" / "assets" / "layout.png")
    sys.exit(1 if upward else 0)


if __name__ == "__main__":
    main()
