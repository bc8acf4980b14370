"""Learning-rate and sparsity-coefficient schedules (Gemma Scope defaults)."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int | None = None, decay_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``.

    Cosine warm-up from 0.1 to 1 over ``warmup_steps`` (Gemma Scope), then constant; with
    ``decay_fraction > 0`` and a known ``total_steps``, a linear decay to 0 over the last
    fraction of training (Anthropic's 2025 recipe uses 0.2).
    """
    factor = 1.0
    if warmup_steps > 0 and step < warmup_steps:
        factor = 0.1 + 0.9 * 0.5 * (1.0 - math.cos(math.pi * step / warmup_steps))
    if decay_fraction > 0 and total_steps:
        decay_start = total_steps * (1.0 - decay_fraction)
        if step >= decay_start:
            factor *= max(0.0, (total_steps - step) / (total_steps - decay_start))
    return factor


def sparsity_warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up of the sparsity coefficient from 0 to 1 over ``warmup_steps``."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)
