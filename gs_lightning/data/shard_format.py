"""The on-disk activation store: one folder per site, safetensors shards and a manifest.

A site folder holds ``shard_{i:05d}.safetensors`` files (``acts [N, d]`` in bfloat16 or
float32, ``token_ids [N]`` and ``positions [N]`` as int32) and ``manifest.json``, which
lists only complete shards with their token counts, sizes, sha256 checksums and scale
statistics. Every file is written to a temporary name and renamed, so a reader never
sees a partial shard or a manifest that names one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from gs_lightning.errors import ConfigError
from gs_lightning.scaling import ScalingScheme

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard_{index:05d}.safetensors"


def derive_seed(*parts: int | str) -> int:
    """A 62-bit seed from a tuple, stable across processes (unlike ``hash`` of strings)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def generator(*parts: int | str) -> torch.Generator:
    """A CPU generator seeded by :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    A failed write (a full disk) removes the temporary file and raises a ConfigError
    naming ``path``; the final name then holds either the old content or nothing.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the rename must not overtake the data on a crash
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{path}: write failed ({err}); nothing was recorded for it") from err


def encode_shard(acts: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> bytes:
    """Serialise one shard; the bytes are a pure function of the tensors (resume relies on it)."""
    return save_bytes({
        "acts": acts.contiguous(),
        "token_ids": token_ids.to(torch.int32).contiguous(),
        "positions": positions.to(torch.int32).contiguous(),
    })


def shard_entry(name: str, data: bytes, acts: torch.Tensor, bucket: int) -> dict[str, Any]:
    """The manifest record of one shard, with its scale statistics (float64 sums)."""
    x = acts.to(torch.float64)
    sq = x.pow(2).sum(-1)
    return {
        "file": name,
        "tokens": int(acts.shape[0]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bucket": bucket,
        "sum_sq_norm": float(sq.sum()),
        "sum_norm": float(sq.sqrt().sum()),
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Rewrite ``manifest.json`` atomically, with totals recomputed from the shard list."""
    shards = manifest["shards"]
    manifest["tokens"] = sum(s["tokens"] for s in shards)
    manifest["scale_statistics"] = {
        "count": manifest["tokens"],
        "sum_sq_norm": math.fsum(s["sum_sq_norm"] for s in shards),
        "sum_norm": math.fsum(s["sum_norm"] for s in shards),
    }
    atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load and sanity-check a site folder's manifest; every problem names the file."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{path}: no manifest; is {folder} a harvested site folder?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable manifest ({err})") from err
    missing = {"model", "site", "d", "dtype", "shards"} - set(manifest)
    if missing or manifest["dtype"] not in STORAGE_DTYPES:
        raise ConfigError(f"{path}: not a shard manifest (missing {sorted(missing)} or bad dtype)")
    return manifest


def load_shard(
    folder: Path, entry: dict[str, Any], manifest: dict[str, Any], verify: bool, check_finite: bool = True
) -> dict[str, torch.Tensor]:
    """Read one shard and check it against its manifest entry: size, checksum (``verify``),
    shape, dtype and finiteness (``check_finite``)."""
    path = Path(folder) / entry["file"]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read shard ({err})") from err
    if len(data) != entry["bytes"]:
        raise ConfigError(f"{path}: truncated or corrupted ({len(data)} bytes, manifest says {entry['bytes']})")
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ConfigError(f"{path}: sha256 checksum mismatch with {MANIFEST}; the shard is corrupted")
    try:
        tensors = load_bytes(data)
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise ConfigError(f"{path}: corrupted shard, not readable as safetensors ({err})") from err
    acts = tensors.get("acts")
    expected = (entry["tokens"], manifest["d"])
    if acts is None or tuple(acts.shape) != expected or acts.dtype != STORAGE_DTYPES[manifest["dtype"]]:
        got = None if acts is None else (tuple(acts.shape), str(acts.dtype))
        raise ConfigError(
            f"{path}: acts {got} disagree with {MANIFEST} (shape {expected}, dtype {manifest['dtype']})"
        )
    if check_finite and not bool(torch.isfinite(acts).all()):
        raise ConfigError(f"{path}: activations contain NaN or Inf")
    return tensors


def check_header(path: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Size and header of a shard against the manifest, without reading its data."""
    if not path.is_file():
        raise ConfigError(f"{path}: shard listed in {MANIFEST} is missing")
    if path.stat().st_size != entry["bytes"]:
        raise ConfigError(f"{path}: truncated or corrupted ({path.stat().st_size} bytes, manifest says {entry['bytes']})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            acts = handle.get_slice("acts")
            shape, dtype = tuple(acts.get_shape()), acts.get_dtype()
    except Exception as err:  # safetensors' own error types for a bad header or missing key
        raise ConfigError(f"{path}: corrupted shard, not readable as safetensors ({err})") from err
    expected_dtype = {"float32": "F32", "bfloat16": "BF16"}[manifest["dtype"]]
    if shape != (entry["tokens"], manifest["d"]) or dtype != expected_dtype:
        raise ConfigError(
            f"{path}: acts {shape} {dtype} disagree with {MANIFEST} "
            f"({(entry['tokens'], manifest['d'])} {manifest['dtype']})"
        )


def scale_from_statistics(stats: dict[str, float], d: int, scheme: ScalingScheme) -> float:
    """The input scale of :func:`gs_lightning.scaling.estimate_input_scale` from summed statistics."""
    if scheme == "none":
        return 1.0
    n, sum_sq = stats["count"], stats["sum_sq_norm"]
    if n == 0 or not math.isfinite(sum_sq) or sum_sq == 0.0:
        raise ConfigError(f"cannot estimate the input scale from statistics {stats}")
    if scheme == "unit_mean_squared_norm":
        return 1.0 / math.sqrt(sum_sq / n)
    return math.sqrt(d) / (stats["sum_norm"] / n)
