"""Old import paths of modules that moved into subpackages, kept working.

The package was laid out by stage (``docs/guide/layout.md``). A module imported by its old
name is the very same module object as under its new name, so ``isinstance`` checks, class
paths in saved configs and monkeypatching keep working. ``gs_lightning.lm`` and
``gs_lightning.harvest`` became packages; they re-export their old public names themselves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED: dict[str, str] = {
    "gs_lightning.sites": "gs_lightning.lm.sites",
    "gs_lightning.text": "gs_lightning.lm.text",
    "gs_lightning.harvest_world": "gs_lightning.harvest.world",
    "gs_lightning.module": "gs_lightning.train.module",
    "gs_lightning.packed": "gs_lightning.train.packed",
    "gs_lightning.parallel": "gs_lightning.train.parallel",
    "gs_lightning.optim": "gs_lightning.train.optim",
    "gs_lightning.schedules": "gs_lightning.train.schedules",
    "gs_lightning.record": "gs_lightning.train.record",
    "gs_lightning.fused": "gs_lightning.kernels.fused",
    "gs_lightning.functional": "gs_lightning.kernels.functional",
    "gs_lightning.saes.clt_fused": "gs_lightning.kernels.clt_fused",
    "gs_lightning.scaling": "gs_lightning.data.scaling",
    "gs_lightning.evaluate": "gs_lightning.evaluation.evaluate",
    "gs_lightning.metrics": "gs_lightning.evaluation.metrics",
    "gs_lightning.frontier": "gs_lightning.evaluation.frontier",
    "gs_lightning.plots": "gs_lightning.evaluation.plots",
    "gs_lightning.splice": "gs_lightning.evaluation.splice",
    "gs_lightning.io": "gs_lightning.formats.io",
    "gs_lightning.export": "gs_lightning.formats.export",
    "gs_lightning.release": "gs_lightning.formats",
    "gs_lightning.release.circuit_tracer": "gs_lightning.formats.circuit_tracer",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module under its new name."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        # The import system keeps a module's own __name__ and __spec__ when they are set,
        # so the old name becomes a second key in sys.modules for one module object.
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module ran when it was imported under its new name."""


def install() -> None:
    """Put the alias finder first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
