"""The language model side: loading the model (:mod:`.load`), the sites its activations are
read at (:mod:`.sites`), and the text it reads (:mod:`.text`)."""

from gs_lightning.lm.load import (
    check_context_size,
    load_language_model,
    load_model_config,
    parse_dtype,
    resolve_model_path,
    shared_language_model,
)

__all__ = [
    "check_context_size",
    "load_language_model",
    "load_model_config",
    "parse_dtype",
    "resolve_model_path",
    "shared_language_model",
]
