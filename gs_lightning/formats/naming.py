"""How releases name an SAE: Gemma Scope's width labels and the layer of a TransformerLens site
(:func:`gs_lightning.lm.sites.site_layer`, importable from here too)."""

from __future__ import annotations

from gs_lightning.lm.sites import site_layer

__all__ = ["site_layer", "width_label"]


def width_label(d_sae: int) -> str:
    """Gemma Scope's width folder name, in floored thousands: 16384 -> '16k', 65536 -> '65k',
    1048576 -> '1m' (widths under 1,000 keep their number)."""
    if d_sae >= 1_000_000:
        return f"{d_sae // 1_000_000}m"
    return f"{d_sae // 1000}k" if d_sae >= 1000 else str(d_sae)
