"""Local paths and fsspec URLs behind one small set of calls.

A site folder may be a local directory or any URL fsspec understands (``s3://``,
``gs://``, ``hf://``, ``file://``, ...). Local paths use the built-in ``open`` (the
fastest path, and no fsspec import); URLs go through ``fsspec.core.url_to_fs``, so
remote stores need only their fsspec backend (``s3fs``, ``gcsfs``) installed.
"""

from __future__ import annotations

import os
from typing import IO, Any

from gs_lightning.errors import ConfigError


def is_url(path: str) -> bool:
    """Whether ``path`` names a location through a protocol (``scheme://...``)."""
    return "://" in path


def join(folder: str, name: str) -> str:
    """``folder/name`` for a local folder or a URL."""
    if is_url(folder):
        return folder.rstrip("/") + "/" + name
    return os.path.join(folder, name)


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as err:  # pragma: no cover - fsspec comes with `datasets`
        raise ConfigError(f"{url}: reading URLs needs fsspec (pip install fsspec)") from err
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{url}: no fsspec filesystem for this URL ({err}); install its backend") from err


def open_binary(path: str) -> IO[bytes]:
    """Open a file for reading bytes; a missing or unreadable file is a ConfigError naming it."""
    try:
        if is_url(path):
            fs, inner = _filesystem(path)
            return fs.open(inner, "rb")
        return open(path, "rb")
    except (OSError, FileNotFoundError) as err:
        raise ConfigError(f"{path}: cannot open ({err})") from err


def file_size(path: str) -> int | None:
    """Size in bytes, or None when there is no such file."""
    try:
        if is_url(path):
            fs, inner = _filesystem(path)
            return int(fs.size(inner)) if fs.isfile(inner) else None
        return os.path.getsize(path) if os.path.isfile(path) else None
    except OSError:
        return None


def read_bytes(path: str) -> bytes:
    """The whole file; errors name the file."""
    with open_binary(path) as handle:
        try:
            return handle.read()
        except OSError as err:
            raise ConfigError(f"{path}: read failed ({err})") from err


def read_exactly_into(handle: IO[bytes], view: memoryview, path: str) -> None:
    """Fill ``view`` from ``handle`` (remote files may return short reads); a short file is named."""
    done = 0
    while done < len(view):
        n = handle.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            raise ConfigError(f"{path}: truncated or corrupted (ended {len(view) - done} bytes early)")
        done += n
