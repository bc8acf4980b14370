"""The on-disk activation store: one folder per site, safetensors shards and a manifest.

A site folder holds ``shard_{i:05d}.safetensors`` files and ``manifest.json``, which
lists only complete shards with their token counts, sizes, sha256 checksums and scale
statistics. Every file is written to a temporary name and renamed, so a reader never
sees a partial shard or a manifest that names one.

A shard holds, per row (one content token):

- ``acts [N, d]``: the activations, bfloat16 or float32;
- ``token_ids [N]`` and ``positions [N]`` (int32): the token and its position in its context;
- ``context_ids [N]`` (int64, format version 2 on): the index of the row's context in the
  harvest's context stream, ``iter_contexts(iter_texts(text, split), tokenizer,
  context_size)`` with the options recorded under ``harvest`` in the manifest. With
  ``positions`` it names where the row came from, so the rows of one context can be
  gathered back into its token window although a harvest shuffles rows within buckets.

``format_version`` in the manifest says which: version 1 (no ``context_ids``) still
trains and streams; only code that needs provenance calls :func:`require_provenance`.

A harvest of a synthetic world (:mod:`gs_lightning.harvest.world`; its manifest has a
``world`` key) has no tokens: its shards hold ``acts`` and, instead of the token fields,
the rows' true feature activations in CSR form (:data:`FEATURE_KEYS`): ``feature_indptr
[N + 1]`` (int64), ``feature_indices [nnz]`` (int32) and ``feature_values [nnz]``
(float32), row i's features being ``indices[indptr[i]:indptr[i + 1]]``. Readers of
``acts`` (training) read both kinds alike; :mod:`gs_lightning.data.ground_truth` reads
the rest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shlex
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from gs_lightning.data import files
from gs_lightning.data.scaling import ScalingScheme
from gs_lightning.errors import ConfigError

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
PROVENANCE_VERSION = 2  # the first version whose shards hold context_ids
STORAGE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_HEADER_DTYPES = {"float32": "F32", "bfloat16": "BF16"}  # safetensors' dtype codes
FEATURE_KEYS = ("feature_indptr", "feature_indices", "feature_values")
"""A world shard's true feature activations (CSR): row pointers, feature indices, values."""


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: a NaN or Inf makes the sum non-finite, and summing
    is several times faster than ``isfinite``; an overflowing sum is checked exactly."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


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


def encode_shard(acts: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                 context_ids: torch.Tensor | None = None) -> bytes:
    """Serialise one shard; the bytes are a pure function of the tensors (resume relies on it).

    Without ``context_ids`` the shard has the version-1 layout (no provenance).
    """
    tensors = {
        "acts": acts.contiguous(),
        "token_ids": token_ids.to(torch.int32).contiguous(),
        "positions": positions.to(torch.int32).contiguous(),
    }
    if context_ids is not None:
        tensors["context_ids"] = context_ids.to(torch.int64).contiguous()
    return save_bytes(tensors)


def encode_world_shard(acts: torch.Tensor, feature_indptr: torch.Tensor, feature_indices: torch.Tensor,
                       feature_values: torch.Tensor) -> bytes:
    """Serialise one shard of a world harvest: the rows and their true feature activations (CSR).

    The bytes are a pure function of the tensors, as for :func:`encode_shard`.
    """
    return save_bytes({
        "acts": acts.contiguous(),
        "feature_indptr": feature_indptr.to(torch.int64).contiguous(),
        "feature_indices": feature_indices.to(torch.int32).contiguous(),
        "feature_values": feature_values.to(torch.float32).contiguous(),
    })


def shard_entry(name: str, data: bytes, acts: torch.Tensor, bucket: int) -> dict[str, Any]:
    """The manifest record of one shard, with its scale statistics (float64 sums)."""
    # vector_norm accumulates in float64 without materialising a float64 copy (3x faster).
    norms = torch.linalg.vector_norm(acts, dim=-1, dtype=torch.float64)
    return {
        "file": name,
        "tokens": int(acts.shape[0]),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "bucket": bucket,
        "sum_sq_norm": float(norms.pow(2).sum()),
        "sum_norm": float(norms.sum()),
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


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Load and sanity-check a site folder's manifest (local or URL); every problem names the file."""
    path = files.join(str(folder), MANIFEST)
    if files.file_size(path) is None:
        raise ConfigError(f"{path}: no manifest; is {folder} a harvested site folder?")
    try:
        manifest = json.loads(files.read_bytes(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable manifest ({err})") from err
    missing = {"model", "site", "d", "dtype", "shards"} - set(manifest)
    if missing or manifest["dtype"] not in STORAGE_DTYPES:
        raise ConfigError(f"{path}: not a shard manifest (missing {sorted(missing)} or bad dtype)")
    return manifest


def require_provenance(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Raise a ConfigError naming ``folder`` unless its shards record each row's context."""
    if "world" in manifest:
        raise ConfigError(f"{files.join(str(folder), MANIFEST)}: a harvest of the synthetic world "
                          f"{manifest['world'].get('source')!r}: its rows come from no text (no tokens or contexts)")
    version = manifest.get("format_version", 1)
    if version >= PROVENANCE_VERSION:
        return
    raise ConfigError(
        f"{files.join(str(folder), MANIFEST)}: shard format version {version} does not record which "
        f"context each row came from (needs version {PROVENANCE_VERSION}); re-harvest into a new output "
        f"folder: {reharvest_command(manifest)}"
    )


def reharvest_command(manifest: dict[str, Any]) -> str:
    """The command line that harvests ``manifest``'s site again with its recorded options."""
    options = {"model": manifest["model"], **manifest.get("harvest", {}), "sites": f"[{manifest['site']}]"}
    args = " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in options.items() if v is not None)
    return f"python -m gs_lightning harvest --output NEW_FOLDER {args}"


def load_shard(
    folder: str | Path, entry: dict[str, Any], manifest: dict[str, Any], verify: bool, check_finite: bool = True
) -> dict[str, torch.Tensor]:
    """Read one whole shard and check it against its manifest entry: size, checksum
    (``verify``), shape, dtype and finiteness (``check_finite``)."""
    path = files.join(str(folder), entry["file"])
    data = files.read_bytes(path)
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
    if check_finite and not all_finite(acts):
        raise ConfigError(f"{path}: activations contain NaN or Inf")
    return tensors


def _acts_location(handle: IO[bytes], path: str, entry: dict[str, Any], manifest: dict[str, Any]) -> int:
    """Parse a shard's safetensors header; check ``acts`` against the manifest; return its file offset."""
    head = handle.read(8)
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < size <= entry["bytes"] - 8:
        raise ConfigError(f"{path}: corrupted shard, not readable as safetensors (bad header length)")
    try:
        spec = json.loads(handle.read(size))["acts"]
        begin, end = (int(v) for v in spec["data_offsets"])
        shape, dtype = tuple(spec["shape"]), spec["dtype"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: corrupted shard, not readable as safetensors (header: {err!r})") from err
    expected_shape, expected_dtype = (entry["tokens"], manifest["d"]), _HEADER_DTYPES[manifest["dtype"]]
    nbytes = entry["tokens"] * manifest["d"] * STORAGE_DTYPES[manifest["dtype"]].itemsize
    if shape != expected_shape or dtype != expected_dtype:
        raise ConfigError(
            f"{path}: acts {shape} {dtype} disagree with {MANIFEST} ({expected_shape} {manifest['dtype']})"
        )
    if end - begin != nbytes or 8 + size + end > entry["bytes"]:
        raise ConfigError(f"{path}: corrupted shard, not readable as safetensors (acts offsets {begin}..{end})")
    return 8 + size + begin


def check_header(path: str | Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Size and header of a shard (local or URL) against the manifest, without reading its data."""
    path = str(path)
    size = files.file_size(path)
    if size is None:
        raise ConfigError(f"{path}: shard listed in {MANIFEST} is missing")
    if size != entry["bytes"]:
        raise ConfigError(f"{path}: truncated or corrupted ({size} bytes, manifest says {entry['bytes']})")
    with files.open_binary(path) as handle:
        _acts_location(handle, path, entry, manifest)


def read_acts_into(folder: str, entry: dict[str, Any], manifest: dict[str, Any], out: torch.Tensor) -> None:
    """Read a shard's ``acts`` straight into ``out`` (``[tokens, d]``, contiguous, storage dtype).

    The fast path for shards already checked once (checksum, finiteness): one read into
    the destination, no intermediate copy. Size and header are still checked every time.
    """
    path = files.join(folder, entry["file"])
    size = files.file_size(path)
    if size != entry["bytes"]:
        raise ConfigError(f"{path}: truncated or corrupted ({size} bytes, manifest says {entry['bytes']})")
    with files.open_binary(path) as handle:
        offset = _acts_location(handle, path, entry, manifest)
        handle.seek(offset)
        # A byte view of the destination tensor: readinto fills it in place.
        files.read_exactly_into(handle, memoryview(out.view(torch.uint8).numpy()).cast("B"), path)


def scale_from_statistics(stats: dict[str, float], d: int, scheme: ScalingScheme) -> float:
    """The input scale of :func:`gs_lightning.data.scaling.estimate_input_scale` from summed statistics."""
    if scheme == "none":
        return 1.0
    n, sum_sq = stats["count"], stats["sum_sq_norm"]
    if n == 0 or not math.isfinite(sum_sq) or sum_sq == 0.0:
        raise ConfigError(f"cannot estimate the input scale from statistics {stats}")
    if scheme == "unit_mean_squared_norm":
        return 1.0 / math.sqrt(sum_sq / n)
    return math.sqrt(d) / (stats["sum_norm"] / n)
