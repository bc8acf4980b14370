"""Suites: every site x width x sparsity level of one YAML, trained, evaluated and released.

``python -m gs_lightning suite --config configs/suite_quickstart.yaml``; see
:mod:`gs_lightning.suite.config` for the YAML and :mod:`gs_lightning.suite.layout` for
what it keeps on disk.
"""

from gs_lightning.suite.config import SuiteConfig, WidthSpec
from gs_lightning.suite.groups import Group, SuiteSite, expand_groups

__all__ = ["Group", "SuiteConfig", "SuiteSite", "WidthSpec", "expand_groups"]
