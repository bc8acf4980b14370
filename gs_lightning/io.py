"""Reading and writing SAE weights: gs_lightning's own format, and reading the others'.

gs_lightning's own format is ``sae.safetensors`` + ``config.json`` in one folder.

``config.json`` holds the variant's ``class_path`` and ``init_args`` (enough to rebuild
it), whether the input scale is folded into the weights, and free-form metadata (model,
site, training step, final metrics). Folders are written atomically: into a temporary
sibling, then renamed, so a crash never leaves a half-written SAE under the final name.

:func:`load_sae` also reads a Gemma Scope ``params.npz``, a Gemma Scope 2 folder
(``params.safetensors`` + ``config.json``) and an SAELens folder (their writers are in
:mod:`gs_lightning.export`), and circuit-tracer's CLT folder
(:mod:`gs_lightning.release.circuit_tracer`). Nothing here unpickles.
"""

from __future__ import annotations

import copy
import glob
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from gs_lightning.errors import ConfigError
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
GEMMA_SCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# Gemma Scope 2 (as SAELens' gemma_3 loader reads it): lower-case weight names, and the skip
# path of an "affine" transcoder as ``affine_skip_connection [d_in, d_out]`` (our W_skip).
GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
GEMMA_SCOPE_2_NAMES = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec",
                       "threshold": "threshold", "W_skip": "affine_skip_connection"}
# SAELens architectures we read: (our class, whether it has a skip path).
SAELENS_ARCHITECTURES = {
    "jumprelu": (JumpReLUSAE, False), "standard": (ReLUSAE, False),
    "jumprelu_transcoder": (JumpReLUSAE, False), "jumprelu_skip_transcoder": (JumpReLUSAE, True),
    "transcoder": (ReLUSAE, False), "skip_transcoder": (ReLUSAE, True),
}


def plain_scale(scale: float | Tensor | list[float]) -> float | list[float]:
    """A scale as JSON holds it: a float, or a list with one per stacked site (a CLT's layers)."""
    values = torch.as_tensor(scale, dtype=torch.float64).flatten().tolist()
    return values[0] if len(values) == 1 and not isinstance(scale, list) else values


def save_sae(sae: SAE, path: str | Path, input_scale: float | list[float] = 1.0,
             metadata: dict[str, Any] | None = None, target_scale: float | list[float] | None = None) -> Path:
    """Save ``sae`` so that it takes raw activations (``input_scale`` folded in) and, for a
    transcoder, reconstructs raw target activations (``target_scale`` folded in); a list
    holds one scale per stacked site.

    ``sae`` itself is left untouched; a folded copy is written.
    """
    path = Path(path)
    folded = copy.deepcopy(sae).cpu().float()
    input_scale = plain_scale(input_scale)
    target_scale = None if target_scale is None else plain_scale(target_scale)
    folded.fold_input_scale(input_scale, target_scale)
    config = {
        "format_version": FORMAT_VERSION,
        "class_path": f"{type(sae).__module__}.{type(sae).__qualname__}",
        "init_args": folded.init_args(),
        "input_scale_folded": input_scale,
        **({} if target_scale is None else {"target_scale_folded": target_scale}),
        "metadata": metadata or {},
    }
    return write_folder(path, {WEIGHTS_FILE: folded.canonical_state_dict(), CONFIG_FILE: config})


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


def load_sae(path: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE from any format the project writes, without pickle.

    ``path`` is a folder saved by :func:`save_sae` (safetensors + JSON), a Gemma Scope
    ``params.npz`` (or the folder holding one), a Gemma Scope 2 ``params.safetensors`` (or
    its folder), an SAELens folder (``cfg.json``) or circuit-tracer's cross-layer transcoder
    folder (``W_enc_0.safetensors``, ...).
    """
    path = Path(path)
    if path.name == GEMMA_SCOPE_2_WEIGHTS or (path / GEMMA_SCOPE_2_WEIGHTS).is_file():
        # Checked first: a Gemma Scope 2 folder has a config.json of its own.
        return load_gemma_scope_2(path).to(device)
    if not (path / CONFIG_FILE).is_file():
        if path.name == "params.npz" or (path / "params.npz").is_file():
            return load_gemma_scope(path if path.name == "params.npz" else path / "params.npz").to(device)
        if (path / SAELENS_CFG).is_file():
            return load_saelens(path).to(device)
        if (path / "W_enc_0.safetensors").is_file():  # circuit-tracer's CLT folder
            # Imported here: that module imports this one.
            from gs_lightning.release.circuit_tracer import load_circuit_tracer

            return load_circuit_tracer(path).to(device)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for p in (config_path, weights_path):
        if not p.is_file():
            raise ConfigError(f"not a saved SAE: {p} is missing")
    try:
        config = json.loads(config_path.read_text())
        class_path, init_args = config["class_path"], config["init_args"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ConfigError(f"{config_path}: not a gs_lightning SAE config ({err})") from err
    cls = _import_sae_class(class_path, config_path)
    sae = cls(**init_args)
    tensors = load_file(str(weights_path), device="cpu")
    try:
        sae.load_canonical_state_dict(tensors)
    except (RuntimeError, KeyError) as err:
        raise ConfigError(f"{weights_path}: weights do not match {class_path}({init_args}): {err}") from err
    return sae.to(device).eval()


def sae_paths(saes: str | list[str], key: str = "saes") -> list[str]:
    """Saved-SAE paths as a command line gives them: one path, a list of paths, or glob
    patterns (``runs/*/sae``, quoted on the shell), patterns expanded in sorted order; a
    pattern that matches nothing, or no path at all, is a ConfigError naming ``key``."""
    paths: list[str] = []
    for item in [saes] if isinstance(saes, str) else list(saes):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
            if not matches:
                raise ConfigError(f"{key}: the pattern {item!r} matches no path")
            paths += matches
        else:
            paths.append(item)
    if not paths:
        raise ConfigError(f"{key}: give at least one SAE folder")
    return paths


def load_sae_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a saved SAE."""
    return json.loads((Path(path) / CONFIG_FILE).read_text())


def _import_sae_class(class_path: str, source: Path) -> type[SAE]:
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{source}: cannot import class_path {class_path!r} ({err})") from err
    if not (isinstance(cls, type) and issubclass(cls, SAE)):
        raise ConfigError(f"{source}: class_path {class_path!r} is not an SAE subclass")
    return cls


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def load_gemma_scope(path: str | Path) -> JumpReLUSAE:
    """Load a Gemma Scope ``params.npz`` as a :class:`JumpReLUSAE` (raw threshold)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such file") from err
    except ValueError as err:  # object arrays need pickle, which is refused
        raise ConfigError(f"{path}: refused, it holds pickled/object arrays ({err})") from err
    except (OSError, EOFError) as err:
        raise ConfigError(f"{path}: not a readable .npz file ({err})") from err
    missing = [k for k in GEMMA_SCOPE_KEYS if k not in arrays]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing} (found {sorted(arrays)})")
    tensors = {k: torch.from_numpy(np.asarray(arrays[k], dtype=np.float32)) for k in GEMMA_SCOPE_KEYS}
    return _build_jumprelu(tensors, path)


def load_gemma_scope_2(path: str | Path) -> JumpReLUSAE:
    """Load a Gemma Scope 2 ``params.safetensors`` (or its folder) as a :class:`JumpReLUSAE`:
    an SAE, a transcoder, or with ``affine_skip_connection`` a skip-transcoder."""
    path = Path(path)
    path = path if path.name == GEMMA_SCOPE_2_WEIGHTS else path / GEMMA_SCOPE_2_WEIGHTS
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path}: not a readable safetensors file ({err})") from err
    missing = [name for key, name in GEMMA_SCOPE_2_NAMES.items() if key != "W_skip" and name not in raw]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing} (found {sorted(raw)})")
    tensors = {key: raw[name].float() for key, name in GEMMA_SCOPE_2_NAMES.items() if name in raw}
    return _build_jumprelu(tensors, path)


def _build_jumprelu(tensors: dict[str, Tensor], source: Path, transcoder: bool = False) -> JumpReLUSAE:
    _check_shapes(tensors, source)
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]  # a transcoder (e.g. Gemma Scope's MLP transcoders) may differ
    sae = JumpReLUSAE(d_in, d_sae, threshold_parameterization="raw", fused=False,
                      d_out=d_out if transcoder or d_out != d_in or "W_skip" in tensors else None,
                      skip_connection="W_skip" in tensors, subtract_decoder_bias=False)
    sae.load_canonical_state_dict(tensors)
    return sae.eval()


def _check_shapes(tensors: dict[str, Tensor], source: Path) -> None:
    if tensors["W_enc"].dim() != 2:
        raise ConfigError(f"{source}: W_enc must be 2-D [d_in, d_sae], got {list(tensors['W_enc'].shape)}")
    d_in, d_sae = tensors["W_enc"].shape
    # b_dec sets the output width: d_in for an SAE, the target site's for a transcoder.
    d_out = tensors["b_dec"].shape[0] if tensors["b_dec"].dim() == 1 else d_in
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                "threshold": (d_sae,), "W_skip": (d_in, d_out)}
    for key, shape in expected.items():
        if key in tensors and tuple(tensors[key].shape) != shape:
            raise ConfigError(f"{source}: {key} has shape {list(tensors[key].shape)}, expected {list(shape)}")


def load_saelens(path: str | Path) -> SAE:
    """Load an SAELens folder (float32, on CPU): a ``jumprelu`` or ``standard`` SAE, or a
    ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``, ``transcoder`` or ``skip_transcoder``."""
    path = Path(path)
    cfg = _read_saelens_cfg(path)
    try:
        tensors = {k: v.float() for k, v in load_file(str(path / SAELENS_WEIGHTS)).items()}
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{path / SAELENS_WEIGHTS}: not a readable safetensors file ({err})") from err
    cls, skip = SAELENS_ARCHITECTURES[cfg["architecture"]]
    needed = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if cls is JumpReLUSAE else []) + \
        (["W_skip"] if skip else [])
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ConfigError(f"{path / SAELENS_WEIGHTS}: missing {missing} for a {cfg['architecture']} SAE")
    tensors = {k: tensors[k] for k in needed}
    if skip:  # SAELens keeps W_skip as [d_out, d_in] and computes x @ W_skip.T
        tensors["W_skip"] = tensors["W_skip"].t().contiguous()
    _check_shapes(tensors, path / SAELENS_WEIGHTS)
    if tuple(tensors["W_enc"].shape) != (cfg["d_in"], cfg["d_sae"]):
        raise ConfigError(f"{path}: cfg.json says d_in={cfg['d_in']}, d_sae={cfg['d_sae']} but W_enc is "
                          f"{list(tensors['W_enc'].shape)}")
    transcoder = "transcoder" in cfg["architecture"]
    if cfg.get("apply_b_dec_to_input", not transcoder):  # SAELens refuses it for transcoders
        # (x - b_dec) W_enc + b_enc == x W_enc + (b_enc - b_dec W_enc): fold into b_enc.
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    if cls is JumpReLUSAE:
        return _build_jumprelu(tensors, path, transcoder)
    d_out = tensors["W_dec"].shape[1]
    sae = ReLUSAE(cfg["d_in"], cfg["d_sae"], d_out=d_out if transcoder else None, skip_connection=skip)
    sae.load_canonical_state_dict(tensors)
    return sae.eval()


def _read_saelens_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / SAELENS_CFG
    if not cfg_path.is_file():
        raise ConfigError(f"not an SAELens SAE: {cfg_path} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{cfg_path}: not valid JSON ({err})") from err
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise ConfigError(f"{cfg_path}: missing key {key!r}")
    if cfg["architecture"] not in SAELENS_ARCHITECTURES:
        raise ConfigError(f"{cfg_path}: architecture {cfg['architecture']!r} is not supported "
                          f"(gs_lightning imports {', '.join(map(repr, SAELENS_ARCHITECTURES))})")
    if cfg.get("normalize_activations", "none") != "none":
        raise ConfigError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} needs a "
                          "scaling factor that is not in the folder; fold it into the weights first")
    return cfg
