"""What every SAE file format answers: is this path mine, read it, can I hold this SAE, write it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gs_lightning.saes import SAE


class Format:
    """One SAE file format. A subclass sets ``name`` and ``description`` and implements
    :meth:`claims`, :meth:`read` and :meth:`write` (and :meth:`check` when it cannot hold
    every SAE); :func:`gs_lightning.formats.register` makes ``load_sae`` and ``export`` use it.
    """

    name: str = ""
    """What ``--format`` and the registry call it."""
    description: str = ""
    """One line for ``--help``: what the format looks like on disk."""
    exported: bool = True
    """Whether the ``export`` command offers it (gs_lightning's own folder is written by training)."""

    def claims(self, path: Path) -> bool:
        """Whether ``path`` looks like this format (a cheap look at file names, nothing read)."""
        raise NotImplementedError

    def read(self, path: Path) -> SAE:
        """The SAE at ``path`` (float32, on CPU, in eval mode); a ConfigError if it is malformed."""
        raise NotImplementedError

    def check(self, sae: SAE) -> None:
        """Raise a ConfigError naming the format and why when it cannot hold ``sae``."""

    def write(self, sae: SAE, path: Path, **options: Any) -> Path:
        """Write ``sae`` (its scales already folded in) at ``path``; return what was written.

        Options every caller may pass, so that one call writes any format: ``metadata``
        (gs_lightning's keys: model, site, target_site, ...), ``layer`` and ``average_l0``
        (the release's names for the SAE). A format ignores those it has no use for.
        """
        raise NotImplementedError


class ReleaseFormat(Format):
    """A format whose files sit in a release tree, at a folder named after the SAE's layer,
    width and L0 (Gemma Scope's layouts); ``export`` writes its ``--out`` as the tree's root."""

    def release_folder(self, sae: SAE, layer: int, average_l0: float, site: str | None) -> str:
        """Where ``sae`` goes, relative to the release root."""
        raise NotImplementedError
