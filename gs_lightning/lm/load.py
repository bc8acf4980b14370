"""Load the language model whose activations the SAEs learn.

A model string is, in order of precedence: an embedded model name shipped with the
package (``gs-lightning/tiny-gemma2-kjv``), a local directory, or a Hugging Face hub
name. Every failure becomes a :class:`ConfigError` that names the string and says what
was tried, because "OSError: ... is not a valid model identifier" does not tell a
researcher which YAML key to fix.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from gs_lightning.errors import ConfigError

ModelDtype = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# Gemma 2's attention soft-capping is only implemented by the eager kernel; SDPA
# silently drops it and changes the activations.
_EAGER_MODEL_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text"})
_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def resolve_model_path(name_or_path: str) -> str:
    """Map an embedded model name to its directory; check that a local-looking path exists.

    Hub names are returned unchanged: only ``from_pretrained`` can tell whether they exist.
    """
    from gs_lightning.embedded import resolve_embedded  # lazy: avoids an import cycle

    embedded = resolve_embedded(name_or_path)
    if embedded is not None:
        if not (Path(embedded) / "config.json").exists():
            raise ConfigError(
                f"model {name_or_path!r}: the embedded model's files are missing from {embedded} "
                f"(rebuild them with `python scripts/build_embedded.py`)"
            )
        return embedded
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if _looks_local(name_or_path):
        raise ConfigError(
            f"model {name_or_path!r}: no such local directory "
            f"(it is not an embedded model name, and it looks like a path, not a hub name)"
        )
    return name_or_path


def _looks_local(name: str) -> bool:
    """A path prefix, or a first component that exists here (``checkpoints/run1``)."""
    if name.startswith(_LOCAL_PREFIXES):
        return True
    first = name.replace("\\", "/").split("/")[0]
    return "/" in name.replace("\\", "/") and bool(first) and os.path.isdir(first)


def _not_loadable(name: str, revision: str | None, what: str, err: Exception) -> ConfigError:
    rev = f" at revision {revision!r}" if revision else ""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ConfigError(
        f"model {name!r}{rev}: could not load its {what}. Tried the embedded models, a local "
        f"directory and the Hugging Face hub (not on disk, and the hub is unreachable or "
        f"does not have it): {first_line}"
    )


def load_model_config(
    name_or_path: str, revision: str | None = None, *, trust_remote_code: bool = False
) -> PretrainedConfig:
    """Load only the model's config (a small JSON file): cheap early validation."""
    path = resolve_model_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as err:
        raise _not_loadable(name_or_path, revision, "config", err) from err


def parse_dtype(dtype: str) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` -> the torch dtype; anything else is a ConfigError."""
    if dtype not in DTYPES:
        raise ConfigError(f"model_dtype={dtype!r} is not one of {list(DTYPES)}")
    return DTYPES[dtype]


def _wants_causal_head(config: PretrainedConfig) -> bool:
    """Load a causal-LM head when the checkpoint says it has one (or says nothing).

    BERT's config also maps to a causal-LM class (``BertLMHeadModel``), which would
    move every module under ``bert.``; an encoder checkpoint names its own class
    (``BertModel``, ``BertForMaskedLM``), so we trust ``architectures``.
    """
    archs = config.architectures or []
    if not archs:
        return True
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def check_context_size(config: PretrainedConfig, context_size: int, model: str) -> None:
    """A ConfigError when contexts are longer than the model's position embeddings reach."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and context_size > limit:
        raise ConfigError(
            f"context_size={context_size} is longer than model {model!r} accepts "
            f"(max_position_embeddings={limit}); set context_size <= {limit}"
        )


def load_language_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: ModelDtype = "float32",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model (eval mode, no gradients) and its tokenizer.

    Causal LMs load through ``AutoModelForCausalLM``; encoder-only models (BERT) fall
    back to ``AutoModel``, so module-path sites like ``encoder.layer.3:output`` work.
    """
    torch_dtype = parse_dtype(dtype)
    config = load_model_config(name_or_path, revision, trust_remote_code=trust_remote_code)
    path = resolve_model_path(name_or_path)
    kwargs: dict = dict(revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if config.model_type in _EAGER_MODEL_TYPES:
        kwargs["attn_implementation"] = "eager"
    try:
        model = _load_weights(path, config, kwargs)
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
    except OSError as err:
        raise _not_loadable(name_or_path, revision, "weights or tokenizer", err) from err
    model.eval().requires_grad_(False)
    return model, tokenizer


@functools.lru_cache(maxsize=4)
def shared_language_model(
    name_or_path: str, revision: str | None = None, dtype: ModelDtype = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """:func:`load_language_model`, once per process: every caller asking for the same model,
    revision and dtype gets the same objects.

    The live DataModule, ``callbacks.DeltaLMLoss``, ``evaluate``, ``harvest`` and the suite
    share one copy this way (Gemma 2 9B loaded twice would be twice its memory). Sharing is
    safe because the model is frozen and site hooks act only inside their own extractor's
    call; whoever needs it on a device moves it there (all users of one process train on
    one device). ``shared_language_model.cache_clear()`` lets it go.
    """
    return load_language_model(name_or_path, revision=revision, dtype=dtype)


def _load_weights(path: str, config: PretrainedConfig, kwargs: dict) -> PreTrainedModel:
    if _wants_causal_head(config):
        try:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except ValueError:
            pass  # "Unrecognized configuration class": no causal-LM class for this type
    return AutoModel.from_pretrained(path, **kwargs)
