"""circuit-tracer's cross-layer transcoder folder: write a CLT so that circuit-tracer's
``load_clt`` (and its Hub and cache loaders, through ``config.yaml``) reads it, and read one back.

The layout, as circuit-tracer 0.5.0 reads and writes it (``load_clt`` and
``CrossLayerTranscoder.to_safetensors`` in ``circuit_tracer/transcoder/cross_layer_transcoder.py``;
``config.yaml`` in ``utils/hf_utils.py`` and ``utils/caching.py``), for L layers of n latents
over a width d::

    W_enc_{i}.safetensors   W_enc_{i} [n, d]   (our W_enc[i] transposed)
                            b_enc_{i} [n], b_dec_{i} [d], threshold_{i} [n]
    W_dec_{i}.safetensors   W_dec_{i} [n, L - i, d]   (our W_dec[i] as it is)
    config.yaml             model_kind: cross_layer_transcoder, model_name,
                            feature_input_hook, feature_output_hook, and gs_lightning's own keys

What circuit-tracer computes from it: layer i's latents read ``blocks.{i}.{feature_input_hook}``,
``f_i = JumpReLU(x_i @ W_enc_i.T + b_enc_i)`` with a strict ``>`` at ``threshold_i`` (no
``threshold_0``: plain ReLU), and ``blocks.{m}.{feature_output_hook}`` is reconstructed as
``b_dec_m + sum_{i <= m} f_i @ W_dec_i[:, m - i]``: ours exactly. It scales nothing, so the
weights must read and write raw activations (a saved gs_lightning SAE has its scales folded in).
``load_clt`` counts the layers by globbing ``W_enc_*.safetensors``, reads d from ``W_enc_0``
(one width for inputs and outputs) and casts to its ``dtype`` argument, bfloat16 by default;
its ``ReplacementModel`` puts layer i's latents at layer i of the model, so the CLT must span
the model's layers from 0. Nothing here unpickles or imports circuit_tracer.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from gs_lightning.errors import ConfigError, parse_file
from gs_lightning.formats.base import Format
from gs_lightning.formats.files import read_safetensors, write_folder
from gs_lightning.lm.sites import SITE_KINDS, layer_and_kind
from gs_lightning.saes import SAE, CrossLayerTranscoder

CONFIG = "config.yaml"
# circuit-tracer's defaults (load_clt's feature_input_hook and feature_output_hook), which are
# also the sites a CrossLayerTranscoder is trained on.
INPUT_HOOK, OUTPUT_HOOK = SITE_KINDS["resid_mid"].hook, SITE_KINDS["mlp_out"].hook
# Constructor arguments the tensors fix; the others (training settings) come from config.yaml.
SHAPE_ARGS = ("n_layers", "d_in", "d_sae", "d_out")
FIRST_ENCODER = "W_enc_0.safetensors"


def export_circuit_tracer(clt: SAE, out: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``clt`` as the folder circuit-tracer's ``load_clt`` reads (see the module
    docstring); return the folder. ``metadata`` uses gs_lightning's keys (``model``,
    ``input_sites``, ``target_sites``), as a saved SAE's config.json holds them."""
    return FORMAT.write(clt, Path(out), metadata=metadata)


def _config(clt: CrossLayerTranscoder, meta: dict[str, Any]) -> dict[str, Any]:
    """``config.yaml``: circuit-tracer's keys, and what rebuilds our class under ``gs_lightning``."""
    L = clt.n_layers
    sites = {key: meta.get(key) for key in ("input_sites", "target_sites")}
    config = {
        "model_kind": "cross_layer_transcoder",
        "model_name": meta.get("model"),
        "feature_input_hook": _hook(sites["input_sites"], L, "input_sites", INPUT_HOOK),
        "feature_output_hook": _hook(sites["target_sites"], L, "target_sites", OUTPUT_HOOK),
        # Not read by circuit-tracer: what rebuilds our class with its training settings.
        "gs_lightning": {"class_path": "gs_lightning.saes.CrossLayerTranscoder", "init_args": clt.init_args(),
                         **{k: v for k, v in sites.items() if v}},
    }
    return json.loads(json.dumps(config, default=str))  # plain types for YAML


def _layer_files(clt: CrossLayerTranscoder) -> dict[str, dict[str, Tensor]]:
    """``W_enc_{i}`` and ``W_dec_{i}.safetensors`` for every layer i (float32, on CPU)."""
    files = {}
    with torch.no_grad():
        for i in range(clt.n_layers):
            files[f"W_enc_{i}.safetensors"] = {
                f"W_enc_{i}": clt.W_enc[i].t(), f"b_enc_{i}": clt.b_enc[i],
                f"b_dec_{i}": clt.b_dec[i], f"threshold_{i}": clt.threshold[i]}
            files[f"W_dec_{i}.safetensors"] = {f"W_dec_{i}": clt.W_dec[i]}
    return {name: {k: v.detach().float().cpu().contiguous() for k, v in content.items()}
            for name, content in files.items()}


def _hook(sites: list[str] | None, n_layers: int, key: str, default: str) -> str:
    """The hook that ``blocks.{l}.<hook>`` names at every layer l = 0..L-1 (circuit-tracer's
    one hook name for all layers), or ``default`` when the metadata has no sites."""
    if not sites:
        return default
    layers, kinds = zip(*map(layer_and_kind, sites))
    if list(layers) != list(range(n_layers)) or len(set(kinds)) != 1 or kinds[0] is None:
        raise ConfigError(f"metadata {key}: circuit-tracer reads layer l at blocks.{{l}}.<one hook> for "
                          f"l = 0..{n_layers - 1}, but this CLT's sites are {sites}")
    return kinds[0].hook


def load_circuit_tracer(path: str | Path) -> CrossLayerTranscoder:
    """Read a circuit-tracer CLT folder (``W_enc_{i}``/``W_dec_{i}.safetensors``, as
    :func:`export_circuit_tracer` or circuit-tracer writes it) as a :class:`CrossLayerTranscoder`
    (float32, on CPU; a folder without thresholds is a ReLU CLT, threshold 0)."""
    path = Path(path)
    L = len(glob.glob(str(path / "W_enc_*.safetensors")))  # as load_clt counts layers
    first = _read(path / FIRST_ENCODER)
    n, d = _tensor(first, path / FIRST_ENCODER, "W_enc_0", None).shape
    relu = "threshold_0" not in first
    parts: dict[str, list[Tensor]] = {"W_enc": [], "b_enc": [], "b_dec": [], "threshold": []}
    W_dec = {}
    for i in range(L):
        file = path / f"W_enc_{i}.safetensors"
        enc = first if i == 0 else _read(file)
        parts["W_enc"].append(_tensor(enc, file, f"W_enc_{i}", (n, d)).t())
        parts["b_enc"].append(_tensor(enc, file, f"b_enc_{i}", (n,)))
        parts["b_dec"].append(_tensor(enc, file, f"b_dec_{i}", (d,)))
        parts["threshold"].append(torch.zeros(n) if relu else _tensor(enc, file, f"threshold_{i}", (n,)))
        file = path / f"W_dec_{i}.safetensors"
        W_dec[f"W_dec.{i}"] = _tensor(_read(file), file, f"W_dec_{i}", (n, L - i, d))
    args = {k: v for k, v in _read_config(path).get("gs_lightning", {}).get("init_args", {}).items()
            if k not in SHAPE_ARGS}
    try:
        clt = CrossLayerTranscoder(L, d, L * n, **args)
    except TypeError as err:
        raise ConfigError(f"{path / CONFIG}: gs_lightning.init_args do not fit CrossLayerTranscoder ({err})") from err
    clt.load_canonical_state_dict({k: torch.stack(v) for k, v in parts.items()} | W_dec)
    return clt.eval()


def _read(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise ConfigError(f"not a circuit-tracer CLT folder: {file} is missing")
    return read_safetensors(file)


def _tensor(tensors: dict[str, Tensor], file: Path, key: str, shape: tuple[int, ...] | None) -> Tensor:
    if key not in tensors:
        raise ConfigError(f"{file}: no tensor {key!r} (found {sorted(tensors)})")
    t = tensors[key]
    if (shape is None and t.dim() != 2) or (shape is not None and tuple(t.shape) != shape):
        expected = "2-D [n, d]" if shape is None else list(shape)
        raise ConfigError(f"{file}: {key} has shape {list(t.shape)}, expected {expected}")
    return t.float()


def _read_config(path: Path) -> dict[str, Any]:
    """``config.yaml`` if there is one (circuit-tracer's load_clt does not need it)."""
    file = path / CONFIG
    if not file.is_file():
        return {}
    config = parse_file(file, yaml.safe_load)
    return config if isinstance(config, dict) else {}


class CircuitTracer(Format):
    """circuit-tracer's cross-layer transcoder folder (``W_enc_0.safetensors``, ...)."""

    name = "circuit_tracer"
    description = ("a CrossLayerTranscoder as W_enc_{i}/W_dec_{i}.safetensors + config.yaml, the folder "
                   "circuit-tracer's load_clt reads")

    def claims(self, path: Path) -> bool:
        return (path / FIRST_ENCODER).is_file()

    def read(self, path: Path) -> SAE:
        return load_circuit_tracer(path)

    def check(self, sae: SAE) -> None:
        if not isinstance(sae, CrossLayerTranscoder):
            raise ConfigError(f"a {type(sae).__name__} cannot be written as {self.name}, which holds "
                              "cross-layer transcoders only")
        if sae.out_width != sae.d_in:
            raise ConfigError(f"circuit-tracer's CLT has one width for inputs and outputs; this one reads "
                              f"d_in={sae.d_in} and writes d_out={sae.out_width}")

    def write(self, sae: SAE, path: Path, **options: Any) -> Path:
        """Write the folder; option ``metadata`` (``model``, ``input_sites``, ``target_sites``)."""
        self.check(sae)
        assert isinstance(sae, CrossLayerTranscoder)  # for the type checker: check() refused the others
        files: dict[str, Any] = {CONFIG: _config(sae, options.get("metadata") or {}), **_layer_files(sae)}
        return write_folder(path, files)


FORMAT = CircuitTracer()
