"""Input scaling: one fixed scalar per site, estimated once from the data.

Gemma Scope scales each site so that E||x||^2 = 1; SAELens scales so that
E||x|| = sqrt(d). The two differ by sqrt(d), so the sparsity coefficient and the
bandwidth do not carry over between them: the scheme is always explicit in config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

from gs_lightning.errors import ConfigError

ScalingScheme = Literal["none", "unit_mean_squared_norm", "sqrt_d_mean_norm"]
SCHEMES: tuple[str, ...] = ("none", "unit_mean_squared_norm", "sqrt_d_mean_norm")


def estimate_input_scale(batches: Iterable[torch.Tensor], scheme: ScalingScheme) -> float:
    """Return the scalar ``s`` such that ``s * x`` satisfies ``scheme`` on ``batches``.

    ``batches`` yields ``[N, d]`` activations; statistics are accumulated in float64 so
    that millions of tokens do not lose precision.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"input_scaling={scheme!r} is not one of {list(SCHEMES)}")
    if scheme == "none":
        return 1.0
    n = 0
    sum_sq = 0.0
    sum_norm = 0.0
    d = None
    for x in batches:
        x = x.detach().to(torch.float64)
        d = x.shape[-1]
        sq = x.pow(2).sum(-1)
        sum_sq += float(sq.sum())
        sum_norm += float(sq.sqrt().sum())
        n += x.shape[0]
    if n == 0 or d is None:
        raise ConfigError("cannot estimate the input scale: the data yielded no activations")
    if not math.isfinite(sum_sq):
        raise ConfigError("cannot estimate the input scale: the activations contain NaN or Inf")
    if sum_sq == 0.0:
        raise ConfigError("cannot estimate the input scale: every activation is zero")
    if scheme == "unit_mean_squared_norm":
        return 1.0 / math.sqrt(sum_sq / n)
    return math.sqrt(d) / (sum_norm / n)
