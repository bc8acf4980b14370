"""Language models shipped inside the package, for machines that cannot reach a model hub.

``gs-lightning/tiny-gemma2-kjv`` is a ~1.5M-parameter ``Gemma2ForCausalLM`` trained on the King
James Bible (see its ``README.md``; rebuilt by ``python scripts/build_embedded.py``). Code
that takes a model name calls :func:`resolve_embedded` first and, when it returns a directory,
loads from there instead of asking the hub.
"""

from __future__ import annotations

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent

EMBEDDED_MODELS: dict[str, pathlib.Path] = {
    "gs-lightning/tiny-gemma2-kjv": _HERE / "tiny-gemma2-kjv",
}


def resolve_embedded(name_or_path: str) -> str | None:
    """The local directory of an embedded model's name, or ``None`` for any other name or path."""
    path = EMBEDDED_MODELS.get(name_or_path)
    return None if path is None else str(path)
