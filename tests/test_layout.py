"""The package's layout by stage (docs/guide/layout.md): imports only run down the stages,
the top level stays small, and every module's old import path still works."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from gs_lightning._moved import MOVED

PACKAGE = Path(__file__).resolve().parents[1] / "gs_lightning"

# Lowest first. A module may import its own stage and any stage below it, never one above.
STAGES: list[set[str]] = [
    {"errors", "console", "embedded", "kernels"},
    {"saes", "lm"},
    {"formats", "data"},
    {"evaluation", "harvest"},
    {"train"},
    {"browse"},
    {"cli"},
    {"sweep", "suite"},
]
RANK = {name: rank for rank, names in enumerate(STAGES) for name in names}
FACE = {"__init__", "__main__", "_moved"}  # the package's face and its entry point


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every gs_lightning module a file imports, at module level or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gs_lightning"):
            if node.module == "gs_lightning":
                found.update(f"gs_lightning.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("gs_lightning"))
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__")] = path
    return out


def test_every_stage_is_named_once_and_every_folder_has_a_stage() -> None:
    named = [name for names in STAGES for name in names]
    assert len(named) == len(set(named))
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert tops - FACE == set(named)


def test_imports_only_run_down_the_stages() -> None:
    upward = []
    for module, path in _modules().items():
        here = _stage(module)
        if here in FACE:
            continue
        for target in _imports(path):
            there = _stage(MOVED.get(target, target))
            if there not in FACE and RANK[there] > RANK[here]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_top_level_holds_few_modules() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= 8, modules


def test_no_module_imports_an_old_path() -> None:
    # The aliases are for users' code; the package itself names the new homes.
    stale = [f"{module} imports {target}" for module, path in _modules().items()
             for target in _imports(path) if target in MOVED]
    assert stale == []


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_path_is_the_same_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_old_names_of_the_packages_that_took_a_module_name_still_import() -> None:
    from gs_lightning.harvest import HarvestConfig, harvest
    from gs_lightning.harvest.model import HarvestConfig as moved_config
    from gs_lightning.lm import load_language_model
    from gs_lightning.lm.load import load_language_model as moved_loader

    assert HarvestConfig is moved_config and callable(harvest)
    assert load_language_model is moved_loader
    from gs_lightning.module import SAETrainingModule
    from gs_lightning.train.module import SAETrainingModule as moved_module

    assert SAETrainingModule is moved_module
