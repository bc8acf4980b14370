"""Errors that the command line reports as one clear line instead of a traceback, and the
reading of user files that turns a parse error into one."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration or input problem.

    The message must name the offending file, key or value; ``python -m gs_lightning``
    prints it as ``gs_lightning: error: <message>`` and exits with status 2.
    """


def check_at_least(obj: object, minimums: dict[str, float]) -> None:
    """Raise a ConfigError naming the first option of ``obj`` below its minimum; a key may be
    a dotted path into a nested option (``trainer.devices``), and an option set to None passes."""
    for key, low in minimums.items():
        value = obj
        for name in key.split("."):
            value = getattr(value, name)
        if value is not None and value < low:
            raise ConfigError(f"{key}={value} must be at least {low}")


def parse_file(path: Path, loads: Callable[[str], Any] = json.loads) -> Any:
    """``loads`` of the file's text (``json.loads`` or ``yaml.safe_load``); text it cannot
    parse is a ConfigError naming the file."""
    try:
        return loads(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        language = "YAML" if isinstance(err, yaml.YAMLError) else "JSON"
        raise ConfigError(f"{path}: not valid {language} ({err})") from err
