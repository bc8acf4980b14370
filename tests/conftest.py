"""Tests marked ``gpu`` run only where CUDA is available (scripts/gpu_check.sh runs them)."""

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False); "
                                   "run scripts/gpu_check.sh on a GPU host")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
