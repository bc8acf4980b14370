"""Comparing sparsity-fidelity frontiers: FVU at matched L0.

Two trainers rarely land on the same L0, so their SAEs are compared on frontiers: each
trainer's (L0, FVU) points, sorted by L0 and joined piecewise linearly in (log L0, log
FVU), the axes on which such frontiers are close to straight. One frontier is read at the
other's L0s where the two overlap; outside the overlap nothing is extrapolated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]
"""An SAE on the frontier: ``(l0, value)``, the value being FVU, delta LM loss, ..."""


def interpolate(points: Sequence[Point], l0: float) -> float | None:
    """The frontier through ``points`` read at ``l0``; ``None`` outside their L0 range.

    Between the two points around ``l0`` the value is interpolated linearly in (log L0,
    log value); a value of 0 or below is interpolated linearly instead of in logs.
    """
    pts = sorted((float(a), float(b)) for a, b in points if a > 0)
    if not pts or not pts[0][0] <= l0 <= pts[-1][0]:
        return None
    for (a0, v0), (a1, v1) in zip(pts, pts[1:]):
        if a0 <= l0 <= a1:
            if a1 == a0:
                return min(v0, v1)
            w = (math.log(l0) - math.log(a0)) / (math.log(a1) - math.log(a0))
            if v0 > 0 and v1 > 0:
                return math.exp((1 - w) * math.log(v0) + w * math.log(v1))
            return (1 - w) * v0 + w * v1
    return pts[0][1]  # a single point, read at its own L0


def ratios(ours: Sequence[Point], theirs: Sequence[Point]) -> list[tuple[float, float]]:
    """``(l0, ours / theirs)`` at every L0 of either frontier inside the range both cover."""
    out = []
    for l0 in sorted({p[0] for p in ours} | {p[0] for p in theirs}):
        a, b = interpolate(ours, l0), interpolate(theirs, l0)
        if a is not None and b is not None and b > 0:
            out.append((l0, a / b))
    return out


def worst_ratio(ours: Sequence[Point], theirs: Sequence[Point]) -> float | None:
    """The largest ``ours / theirs`` over the overlapping L0 range (``None``: no overlap).
    Below 1 everywhere means our frontier is better (lower FVU) at every matched L0."""
    found = ratios(ours, theirs)
    return max(r for _, r in found) if found else None


def mean_log_ratio(ours: Sequence[Point], theirs: Sequence[Point]) -> float | None:
    """Geometric mean of ``ours / theirs`` over the overlap: which of two frontiers is better overall."""
    found = ratios(ours, theirs)
    return math.exp(sum(math.log(r) for _, r in found) / len(found)) if found else None
