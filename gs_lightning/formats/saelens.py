"""SAELens' folder: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``sparsity.safetensors``).

``cfg.json`` holds ``architecture``, ``d_in``, ``d_sae``, ``dtype``, ``apply_b_dec_to_input``,
``normalize_activations`` and ``metadata`` with TransformerLens hook names; the optional
sparsity file holds log10 feature densities. JumpReLU (and ReLU) SAEs, transcoders
(``jumprelu_transcoder``, ``transcoder``, with ``d_out``) and skip-transcoders
(``jumprelu_skip_transcoder``, ``skip_transcoder``, ``W_skip [d_out, d_in]``: SAELens
computes ``x @ W_skip.T``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from gs_lightning.errors import ConfigError, parse_file
from gs_lightning.formats.base import Format
from gs_lightning.formats.files import read_safetensors, write_folder
from gs_lightning.formats.jumprelu import (
    build_jumprelu,
    check_jumprelu,
    check_shapes,
    jumprelu_tensors,
)
from gs_lightning.formats.naming import site_layer
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE

SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_SPARSITY = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# SAELens architectures we read: (our class, whether it has a skip path).
SAELENS_ARCHITECTURES = {
    "jumprelu": (JumpReLUSAE, False), "standard": (ReLUSAE, False),
    "jumprelu_transcoder": (JumpReLUSAE, False), "jumprelu_skip_transcoder": (JumpReLUSAE, True),
    "transcoder": (ReLUSAE, False), "skip_transcoder": (ReLUSAE, True),
}


def load_saelens(path: str | Path) -> SAE:
    """Load an SAELens folder (float32, on CPU): a ``jumprelu`` or ``standard`` SAE, or a
    ``jumprelu_transcoder``, ``jumprelu_skip_transcoder``, ``transcoder`` or ``skip_transcoder``."""
    path = Path(path)
    cfg = _read_saelens_cfg(path)
    tensors = {k: v.float() for k, v in read_safetensors(path / SAELENS_WEIGHTS).items()}
    cls, skip = SAELENS_ARCHITECTURES[cfg["architecture"]]
    needed = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if cls is JumpReLUSAE else []) + \
        (["W_skip"] if skip else [])
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise ConfigError(f"{path / SAELENS_WEIGHTS}: missing {missing} for a {cfg['architecture']} SAE")
    tensors = {k: tensors[k] for k in needed}
    if skip:  # SAELens keeps W_skip as [d_out, d_in] and computes x @ W_skip.T
        tensors["W_skip"] = tensors["W_skip"].t().contiguous()
    check_shapes(tensors, path / SAELENS_WEIGHTS)
    if tuple(tensors["W_enc"].shape) != (cfg["d_in"], cfg["d_sae"]):
        raise ConfigError(f"{path}: cfg.json says d_in={cfg['d_in']}, d_sae={cfg['d_sae']} but W_enc is "
                          f"{list(tensors['W_enc'].shape)}")
    transcoder = "transcoder" in cfg["architecture"]
    if cfg.get("apply_b_dec_to_input", not transcoder):  # SAELens refuses it for transcoders
        # (x - b_dec) W_enc + b_enc == x W_enc + (b_enc - b_dec W_enc): fold into b_enc.
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    if cls is JumpReLUSAE:
        return build_jumprelu(tensors, path, transcoder)
    d_out = tensors["W_dec"].shape[1]
    sae = ReLUSAE(cfg["d_in"], cfg["d_sae"], d_out=d_out if transcoder else None, skip_connection=skip)
    sae.load_canonical_state_dict(tensors)
    return sae.eval()


def _read_saelens_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / SAELENS_CFG
    if not cfg_path.is_file():
        raise ConfigError(f"not an SAELens SAE: {cfg_path} is missing")
    cfg = parse_file(cfg_path)
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


def export_saelens(
    sae: SAE, path: str | Path, metadata: dict[str, Any] | None = None, feature_density: Tensor | None = None
) -> Path:
    """Write an SAELens folder; ``metadata`` uses gs_lightning's keys (model, site, ...).

    A transcoder is written as SAELens' ``jumprelu_transcoder`` (or ``transcoder`` for a
    ReLU one), a skip-transcoder as ``jumprelu_skip_transcoder`` (``skip_transcoder``).
    """
    return FORMAT.write(sae, Path(path), metadata=metadata, feature_density=feature_density)


def _architecture(sae: SAE) -> str:
    """SAELens' name for the SAE's architecture."""
    relu = isinstance(sae, ReLUSAE)
    if not sae.is_transcoder:
        return "standard" if relu else "jumprelu"
    return ("" if relu else "jumprelu_") + ("skip_" if sae.W_skip is not None else "") + "transcoder"


def _tensors(sae: SAE) -> dict[str, Tensor]:
    """``sae_weights.safetensors``: JumpReLU tensors, without a ReLU's threshold, W_skip as [d_out, d_in]."""
    tensors = jumprelu_tensors(sae)
    if isinstance(sae, ReLUSAE):
        tensors.pop("threshold")
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].t().contiguous()
    return tensors


def _cfg(sae: SAE, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "architecture": _architecture(sae),
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        **({"d_out": sae.d_out} if sae.is_transcoder else {}),
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # Gemma Scope's encoder does not subtract b_dec
        "normalize_activations": "none",  # the input scale is folded into the weights
        "reshape_activations": "none",
        "metadata": _saelens_metadata(meta),
    }


def _saelens_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    site = meta.get("site")
    return {
        "model_name": meta.get("model"),
        "hook_name": site,  # our sites are TransformerLens hook names already
        **({"hook_name_out": meta["target_site"]} if meta.get("target_site") else {}),
        "hook_layer": site_layer(site),
        "context_size": meta.get("context_size"),
        "prepend_bos": True,
        "exclude_special_tokens": True,  # BOS/EOS/pad were excluded in training
        "dataset_path": meta.get("text"),
        "trained_with": "gs_lightning",
    }


class SAELens(Format):
    """SAELens' folder (``cfg.json``)."""

    name = "saelens"
    description = "cfg.json folder"

    def claims(self, path: Path) -> bool:
        return (path / SAELENS_CFG).is_file()

    def read(self, path: Path) -> SAE:
        return load_saelens(path)

    def check(self, sae: SAE) -> None:
        check_jumprelu(sae, self.name)

    def write(self, sae: SAE, path: Path, **options: Any) -> Path:
        """Write the folder; options ``metadata`` and ``feature_density`` (a firing rate per latent)."""
        self.check(sae)
        files: dict[str, Any] = {SAELENS_CFG: _cfg(sae, options.get("metadata") or {}), SAELENS_WEIGHTS: _tensors(sae)}
        density = options.get("feature_density")
        if density is not None:
            files[SAELENS_SPARSITY] = {"sparsity": density.float().clamp(min=1e-10).log10()}
        return write_folder(path, files)


FORMAT = SAELens()
