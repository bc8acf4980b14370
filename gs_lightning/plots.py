"""PNG pictures of a set of SAEs: the L0-FVU and L0-delta-LM-loss frontiers, feature density."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_frontier(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Two panels, L0 (log scale) against FVU and against delta LM loss, one point per SAE."""
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "fvu", "FVU (variance unexplained)"), (axes[1], "delta_loss", "delta LM loss (nats)")):
        points = sorted((r["l0"], r[key], Path(str(r["sae"])).parent.name or str(r["sae"])) for r in rows if key in r)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        for l0, value, name in points:
            ax.annotate(name, (l0, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
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
        ax.hist(alive.log10().numpy(), bins=50, histtype="step", label=f"{name} ({dead} dead)")
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
