"""PNG pictures of a set of SAEs: the L0-FVU and L0-delta-LM-loss frontiers, feature density."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402


def run_label(sae_path: str) -> str:
    """A short name for a saved SAE: its path without Lightning's ``lightning_logs/version_N/sae``."""
    parts = [p for p in Path(sae_path).parts if p not in ("sae", "lightning_logs") and not p.startswith("version_")]
    return parts[-1] if parts else sae_path


def plot_frontier(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Two panels, L0 (log scale when it spans > 4x) against FVU and against delta LM loss, one point per SAE."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "fvu", "FVU (variance unexplained)"), (axes[1], "delta_loss", "delta LM loss (nats)")):
        # Points, not a line: SAEs of different variants or sites are not one curve.
        for row in rows:
            if key in row:
                ax.plot(row["l0"], row[key], "o")
                ax.annotate(run_label(str(row["sae"])), (row["l0"], row[key]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        l0s = [row["l0"] for row in rows if row["l0"] > 0]
        if l0s and max(l0s) > 4 * min(l0s):  # a log axis only pays off over a wide range
            log_l0_axis(ax)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle("sparsity-fidelity frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_density(densities: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Histogram of log10 firing rate per latent, one curve per SAE; dead latents counted apart."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, density in densities.items():
        alive = density[density > 0].double()
        dead = int((density == 0).sum())
        ax.hist(alive.log10().numpy(), bins=50, histtype="step", label=f"{run_label(name)} ({dead} dead)")
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier_curves(curves: dict[str, dict[str, list[dict[str, float]]]], path: str | Path,
                         keys: Sequence[tuple[str, str]] = (("fvu", "FVU"), ("delta_loss", "delta LM loss (nats)")),
                         ) -> Path:
    """One row per panel group (e.g. a site), one column per metric of ``keys``: each
    labelled curve is a trainer's frontier, its points (dicts with ``l0`` and the keys)
    joined in L0 order, L0 on a log axis."""
    path = Path(path)
    fig, axes = plt.subplots(len(curves), len(keys), figsize=(5 * len(keys), 3.6 * len(curves)), squeeze=False)
    for row, (group, labelled) in zip(axes, curves.items()):
        for ax, (key, label) in zip(row, keys):
            for name, points in labelled.items():
                pts = sorted((p["l0"], p[key]) for p in points if p.get(key) is not None and p["l0"] > 0)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=name, markersize=4)
            log_l0_axis(ax)
            ax.set_xlabel("L0 (active latents per token)")
            ax.set_ylabel(label)
            ax.set_title(group, fontsize=9)
            ax.grid(True, alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_l0_axis(ax: plt.Axes) -> None:
    """A log L0 axis labelled in plain numbers; minor labels off (they overlap)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    _label_within_decade(ax)


def _label_within_decade(ax: plt.Axes) -> None:
    """Label a log axis at 1, 2, 3 and 5 times its power of ten when it holds no power of ten
    (e.g. a TopK panel spanning k 16-64), where the major ticks, and so every label, would
    be missing."""
    low, high = ax.get_xlim()
    decade = math.floor(math.log10(low))
    if math.floor(math.log10(high)) > decade:
        return
    ticks = [m * 10.0**decade for m in (1, 2, 3, 5)] + [10.0 ** (decade + 1)]
    ax.set_xticks([t for t in ticks if low <= t <= high])
    ax.set_xlim(low, high)
