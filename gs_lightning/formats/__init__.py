"""SAE file formats, one module each, and the registry that ``load_sae``, ``export``, the
suite's release and the browser all go through.

A format answers four questions (:class:`Format`): is this path mine, read it, write it,
can I hold this SAE. Adding one is a module defining a :class:`Format` and one line in
:data:`BUILT_IN` below (or a :func:`register` call from outside the package).
"""

from gs_lightning.formats import circuit_tracer, gemma_scope, gemma_scope_2, native, saelens
from gs_lightning.formats.base import Format, ReleaseFormat
from gs_lightning.formats.registry import export_names, format_for, get, holding, names, register, unregister

# Sniffing order, as load_sae has always sniffed: Gemma Scope 2 first (its folder has a
# config.json), then gs_lightning's own config.json folder, then the formats without one.
# A path none claims is read as gs_lightning's own folder, whose reader names the missing file.
BUILT_IN: tuple[Format, ...] = (
    gemma_scope_2.FORMAT,
    native.FORMAT,
    gemma_scope.FORMAT,
    saelens.FORMAT,
    circuit_tracer.FORMAT,
)
for _fmt in BUILT_IN:
    register(_fmt, fallback=_fmt is native.FORMAT)

__all__ = ["BUILT_IN", "Format", "ReleaseFormat", "export_names", "format_for", "get", "holding", "names",
           "register", "unregister"]
