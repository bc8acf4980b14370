"""File helpers every format shares: atomic folder and file writes, and safetensors reads
that fail with a ConfigError naming the file.

A writer puts everything into a temporary sibling and renames it into place, so a crash
never leaves a half-written SAE under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from gs_lightning.errors import ConfigError


def write_folder(path: str | Path, files: dict[str, Any]) -> Path:
    """Write a folder atomically: ``*.json`` and ``*.yaml`` entries are dicts, the others tensor dicts
    saved as safetensors; all go into a temporary sibling that is then renamed to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, content in files.items():
            if name.endswith(".json"):
                (tmp / name).write_text(json.dumps(content, indent=2, default=_jsonable) + "\n")
            elif name.endswith(".yaml"):
                (tmp / name).write_text(yaml.safe_dump(content, sort_keys=False))
            else:
                save_file({k: v.detach().contiguous() for k, v in content.items()}, str(tmp / name))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_file(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write one file atomically: ``write`` fills a temporary sibling, renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(file: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file (on CPU), or a ConfigError naming the file."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{file}: not a readable safetensors file ({err})") from err


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
