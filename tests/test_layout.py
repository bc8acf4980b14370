"""The package's layout by stage (docs/guide/layout.md): imports only run down the stages,
the top level stays small, and every module's old import path still works."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from gs_lightning._moved import MOVED

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from layout import FACE, PACKAGE, RANK, STAGES, imports, modules, stage_of  # noqa: E402


def test_every_folder_and_top_level_module_has_one_stage() -> None:
    named = [name for names in STAGES for name in names]
    assert len(named) == len(set(named))
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert tops - set(FACE) == set(named)


def test_imports_only_run_down_the_stages() -> None:
    upward = [f"{module} -> {target}" for module, path in modules().items() if stage_of(module) not in FACE
              for target in imports(path)
              if stage_of(target) not in FACE and RANK[stage_of(target)] > RANK[stage_of(module)]]
    assert upward == []


def test_top_level_holds_few_modules() -> None:
    assert len(list(PACKAGE.glob("*.py"))) <= 8


def test_no_module_of_the_package_imports_an_old_path() -> None:
    # The old paths are for users' code; the package itself names the new homes.
    stale = [f"{module} imports {target}" for module, path in modules().items()
             for target in imports(path) if target in MOVED]
    assert stale == []


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_import_path_is_the_same_module(old: str) -> None:
    assert importlib.import_module(old) is importlib.import_module(MOVED[old])


def test_packages_that_took_a_module_name_re_export_its_names() -> None:
    from gs_lightning.module import SAETrainingModule

    from gs_lightning.harvest import HarvestConfig
    from gs_lightning.harvest.model import HarvestConfig as moved_config
    from gs_lightning.lm import load_language_model
    from gs_lightning.lm.load import load_language_model as moved_loader
    from gs_lightning.train.module import SAETrainingModule as moved_module

    assert HarvestConfig is moved_config
    assert load_language_model is moved_loader
    assert SAETrainingModule is moved_module
