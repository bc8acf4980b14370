"""How releases name an SAE: Gemma Scope's width labels and the layer of a TransformerLens site."""

from __future__ import annotations


def width_label(d_sae: int) -> str:
    """Gemma Scope's width folder name, in floored thousands: 16384 -> '16k', 65536 -> '65k',
    1048576 -> '1m' (widths under 1,000 keep their number)."""
    if d_sae >= 1_000_000:
        return f"{d_sae // 1_000_000}m"
    return f"{d_sae // 1000}k" if d_sae >= 1000 else str(d_sae)


def site_layer(site: str | None) -> int | None:
    """The layer of a ``blocks.{L}.<hook>`` site; None for module paths and no site."""
    parts = (site or "").split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None
