"""Gemma Scope 2's release layout, as SAELens' ``gemma_3`` loader reads it.

``{kind}/layer_{L}_width_{W}_l0_{N}[_affine]/params.safetensors`` with float32 ``w_enc``,
``w_dec``, ``b_enc``, ``b_dec``, ``threshold`` and, for a skip-transcoder ("affine"),
``affine_skip_connection [d_in, d_out]`` (our ``W_skip``), next to a ``config.json``
(``architecture: jump_relu``, ``model_name``, ``hf_hook_point_in``/``_out``,
``affine_connection``). Gemma Scope 2 names its L0s small/medium/big; we write the rounded number.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gs_lightning.errors import ConfigError
from gs_lightning.formats.base import ReleaseFormat
from gs_lightning.formats.files import read_safetensors, write_folder
from gs_lightning.formats.jumprelu import (
    build_jumprelu,
    check_jumprelu,
    jumprelu_tensors,
)
from gs_lightning.formats.naming import site_layer, width_label
from gs_lightning.lm.sites import SITE_KINDS, TRANSCODER, layer_and_kind
from gs_lightning.saes import SAE, JumpReLUSAE

GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
GEMMA_SCOPE_2_CONFIG = "config.json"
# Lower-case weight names, and the skip path of an "affine" transcoder as affine_skip_connection.
GEMMA_SCOPE_2_NAMES = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec",
                       "threshold": "threshold", "W_skip": "affine_skip_connection"}
# Gemma Scope 2's folder prefix for each kind of site (a transcoder's is "transcoder"), and
# the Hugging Face module outputs/inputs it names for our TransformerLens sites (Gemma 3), by
# hook; both are columns of the site-kind table.
GEMMA_SCOPE_2_KINDS = {k.hook: k.gemma_scope_2 for k in SITE_KINDS.values() if k.gemma_scope_2}
HF_HOOK_POINTS = {k.hook: k.hf_hook_point for k in SITE_KINDS.values() if k.hf_hook_point}


def gemma_scope_2_folder(sae: SAE, layer: int, average_l0: float, site: str | None = None) -> str:
    """``{kind}/layer_{L}_width_{W}_l0_{N}[_affine]``: where Gemma Scope 2 puts one dictionary
    (``kind`` is ``transcoder`` for a transcoder, else from the site: ``resid_post``,
    ``mlp_out``, ``attn_out``)."""
    _, site_kind = layer_and_kind(site or "")
    kind = TRANSCODER if sae.is_transcoder else (site_kind.gemma_scope_2 if site_kind else None)
    if kind is None:
        kinds = ", ".join(GEMMA_SCOPE_2_KINDS.values())
        raise ConfigError(f"site {site!r} has no Gemma Scope 2 folder kind ({kinds}); give folder_name")
    affine = "_affine" if sae.W_skip is not None else ""
    return f"{kind}/layer_{layer}_width_{width_label(sae.d_sae)}_l0_{round(average_l0)}{affine}"


def load_gemma_scope_2(path: str | Path) -> JumpReLUSAE:
    """Load a Gemma Scope 2 ``params.safetensors`` (or its folder) as a :class:`JumpReLUSAE`:
    an SAE, a transcoder, or with ``affine_skip_connection`` a skip-transcoder."""
    path = Path(path)
    path = path if path.name == GEMMA_SCOPE_2_WEIGHTS else path / GEMMA_SCOPE_2_WEIGHTS
    raw = read_safetensors(path)
    missing = [name for key, name in GEMMA_SCOPE_2_NAMES.items() if key != "W_skip" and name not in raw]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing} (found {sorted(raw)})")
    tensors = {key: raw[name].float() for key, name in GEMMA_SCOPE_2_NAMES.items() if name in raw}
    return build_jumprelu(tensors, path)


def export_gemma_scope_2(
    sae: SAE, root: str | Path, layer: int, average_l0: float, metadata: dict[str, Any] | None = None,
    folder_name: str | None = None,
) -> Path:
    """Write ``root/{kind}/layer_{L}_width_{W}_l0_{N}[_affine]/params.safetensors`` and its
    ``config.json`` (or into ``root/folder_name``); return the weights file's path.
    ``metadata`` uses gs_lightning's keys (model, site, target_site)."""
    meta = metadata or {}
    folder = Path(root) / (folder_name or gemma_scope_2_folder(sae, layer, average_l0, meta.get("site")))
    return FORMAT.write(sae, folder, metadata=meta, layer=layer, average_l0=average_l0)


def _config(sae: SAE, meta: dict[str, Any], layer: int | None, average_l0: float | None) -> dict[str, Any]:
    """The ``config.json`` beside the weights, as SAELens' gemma_3 loader reads it."""
    return {
        "architecture": "jump_relu",
        "model_name": meta.get("model") or "",  # SAELens' loader reads it as a string
        "hf_hook_point_in": _hf_hook_point(meta.get("site"), layer),
        **({"hf_hook_point_out": _hf_hook_point(meta.get("target_site"), layer)} if sae.is_transcoder else {}),
        **({"affine_connection": sae.W_skip is not None} if sae.is_transcoder else {}),
        "width": sae.d_sae,
        "l0": average_l0,
        "trained_with": "gs_lightning",
    }


def _hf_hook_point(site: str | None, layer: int | None) -> str | None:
    """Gemma Scope 2's name for a site: a Hugging Face module path with ``.output``/``.input``."""
    if site is None:
        return None
    if ":" in site:  # already a module path: "<path>:output"
        return site.replace(":", ".")
    _, kind = layer_and_kind(site)
    point = kind.hf_hook_point if kind else None
    return point.format(L=layer) if point and layer is not None else site


class GemmaScope2(ReleaseFormat):
    """Gemma Scope 2's ``params.safetensors`` (or its folder); checked before gs_lightning's
    own folder, since it has a ``config.json`` too."""

    name = "gemma_scope_2"
    description = "params.safetensors release layout; the one that holds skip-transcoders"

    def claims(self, path: Path) -> bool:
        return path.name == GEMMA_SCOPE_2_WEIGHTS or (path / GEMMA_SCOPE_2_WEIGHTS).is_file()

    def read(self, path: Path) -> SAE:
        return load_gemma_scope_2(path)

    def check(self, sae: SAE) -> None:
        check_jumprelu(sae, self.name)

    def write(self, sae: SAE, path: Path, **options: Any) -> Path:
        """Write ``path/params.safetensors`` and ``path/config.json``; return the weights file's
        path. ``layer`` defaults to the metadata site's."""
        self.check(sae)
        meta = options.get("metadata") or {}
        layer = options.get("layer")
        layer = site_layer(meta.get("site")) if layer is None else layer
        tensors = {GEMMA_SCOPE_2_NAMES[k]: v for k, v in jumprelu_tensors(sae).items()}
        config = _config(sae, meta, layer, options.get("average_l0"))
        write_folder(path, {GEMMA_SCOPE_2_WEIGHTS: tensors, GEMMA_SCOPE_2_CONFIG: config})
        return Path(path) / GEMMA_SCOPE_2_WEIGHTS

    def release_folder(self, sae: SAE, layer: int, average_l0: float, site: str | None) -> str:
        return gemma_scope_2_folder(sae, layer, average_l0, site)


FORMAT = GemmaScope2()
