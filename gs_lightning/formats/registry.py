"""The registry of SAE file formats: the one list every reader and writer asks.

Order matters: :func:`format_for` asks the formats in the order they were registered and
takes the first that claims a path (Gemma Scope 2's folder has a ``config.json`` too, so it
is asked before gs_lightning's own).
"""

from __future__ import annotations

from pathlib import Path

from gs_lightning.errors import ConfigError
from gs_lightning.formats.base import Format
from gs_lightning.saes import SAE

# By name, in registration (sniffing) order.
_FORMATS: dict[str, Format] = {}
# The format that reads paths no format claims (see register).
_fallback: Format | None = None


def register(fmt: Format, fallback: bool = False) -> Format:
    """Add ``fmt`` after the formats registered before it; return it. With ``fallback``, it
    also reads the paths no format claims, so that its reader names what is missing."""
    global _fallback
    if not fmt.name or fmt.name in _FORMATS:
        raise ValueError(f"a format needs a name no other format has; got {fmt.name!r} ({', '.join(_FORMATS)})")
    _FORMATS[fmt.name] = fmt
    if fallback:
        _fallback = fmt
    return fmt


def unregister(name: str) -> None:
    """Remove the format called ``name``."""
    global _fallback
    if _FORMATS.pop(name) is _fallback:
        _fallback = None


def names() -> list[str]:
    """Every registered format's name, in sniffing order."""
    return list(_FORMATS)


def export_names() -> list[str]:
    """The formats the ``export`` command offers."""
    return [name for name, fmt in _FORMATS.items() if fmt.exported]


def get(name: str) -> Format:
    """The format called ``name``, or a ConfigError naming the registered ones."""
    if name not in _FORMATS:
        raise ConfigError(f"unknown format {name!r}; the registered formats are {', '.join(_FORMATS)}")
    return _FORMATS[name]


def format_for(path: str | Path) -> Format:
    """The first registered format that claims ``path``, else the fallback format; without
    one, a ConfigError saying what each format looks like."""
    path = Path(path)
    for fmt in _FORMATS.values():
        if fmt.claims(path):
            return fmt
    if _fallback is not None:
        return _fallback
    known = "; ".join(f"{fmt.name} ({fmt.description})" for fmt in _FORMATS.values())
    raise ConfigError(f"not a saved SAE: {path} is in none of the formats gs_lightning reads: {known}")


def holding(sae: SAE) -> list[str]:
    """The exported formats that can hold ``sae``."""
    held = []
    for name in export_names():
        try:
            _FORMATS[name].check(sae)
        except ConfigError:
            continue
        held.append(name)
    return held
