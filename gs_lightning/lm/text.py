"""Text sources and their cutting into fixed-length token contexts.

A text is ``"kjv"`` (the built-in King James Bible), a local ``.txt`` file or a
directory of them (one document per blank-line-separated paragraph), or a Hugging
Face ``datasets`` name read in streaming mode.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from gs_lightning.errors import ConfigError

BUILTIN_TEXTS = ("kjv",)
LOCAL_SPLITS = ("train", "validation")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_LOCAL_PREFIXES = ("/", "./", "../", "~")
# Single data files that ``datasets`` reads with a builder named after their format.
_DATA_FILES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Tokenizing documents in groups lets a fast tokenizer batch its work.
_TOKENIZE_GROUP = 64


def iter_texts(text: str, *, split: str, column: str = "text") -> Iterator[str]:
    """Yield the documents of one split of ``text``.

    Local texts have no splits of their own; like the KJV, every 20th paragraph is
    ``"validation"`` and the rest ``"train"``.
    """
    if text == "kjv":
        from gs_lightning.embedded.kjv import kjv_split

        _check_local_split(text, split)
        yield from kjv_split(split)
        return
    path = Path(text).expanduser()
    if path.suffix == ".txt" and path.is_file() or path.is_dir() and any(path.rglob("*.txt")):
        _check_local_split(text, split)
        yield from _held_out(_local_paragraphs(path), split)
        return
    if path.exists():  # a data file or a dataset directory: ``datasets`` reads it
        yield from _hub_texts(text, split, column)
        return
    if text.startswith(_LOCAL_PREFIXES) or path.suffix in (".txt", *_DATA_FILES):
        raise ConfigError(f"text={text!r}: no such file or directory")
    yield from _hub_texts(text, split, column)


def _check_local_split(text: str, split: str) -> None:
    if split not in LOCAL_SPLITS:
        raise ConfigError(f"text={text!r} has splits {list(LOCAL_SPLITS)}, not {split!r}")


def _held_out(paragraphs: Iterable[str], split: str) -> Iterator[str]:
    held_out = split == "validation"
    for i, p in enumerate(paragraphs):
        if (i % 20 == 19) == held_out:
            yield p


def _local_paragraphs(path: Path) -> Iterator[str]:
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    for file in files:
        for paragraph in _PARAGRAPH_BREAK.split(file.read_text(encoding="utf-8")):
            paragraph = paragraph.strip()
            if paragraph:
                yield paragraph


def _hub_texts(name: str, split: str, column: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(
            f"text={name!r} needs the 'datasets' package: pip install datasets"
        ) from err
    try:
        builder = _DATA_FILES.get(Path(name).suffix) if Path(name).is_file() else None
        if builder is not None:
            ds = datasets.load_dataset(builder, data_files=name, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
    except (OSError, ValueError, ConnectionError) as err:  # FileNotFoundError, DatasetNotFoundError
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"text={name!r} (split {split!r}): not 'kjv', not a local file or directory, "
            f"and the datasets hub could not load it: {first}"
        ) from err
    for row in ds:
        if column not in row:
            raise ConfigError(
                f"text={name!r} has no column text_column={column!r}; columns: {list(row)}"
            )
        yield row[column]


def _bos_eos(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """The tokens that open a context and close a document: BOS/EOS, or an encoder's CLS/SEP."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(tokenizer, "cls_token_id", None)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else getattr(tokenizer, "sep_token_id", None)
    return bos, eos


def iter_contexts(
    texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, context_size: int
) -> Iterator[torch.Tensor]:
    """Cut a stream of documents into ``[context_size]`` token contexts.

    Documents are tokenized without special tokens and joined with EOS; each context
    is BOS followed by the next ``context_size - 1`` tokens of that stream (models
    without a BOS token get plain ``context_size``-token cuts). A final partial
    context is dropped.
    """
    bos, eos = _bos_eos(tokenizer)
    body = context_size - 1 if bos is not None else context_size
    if body < 1:
        raise ConfigError(f"context_size={context_size} leaves no room for tokens after BOS")
    stream: list[int] = []
    start = 0
    texts = iter(texts)
    while group := list(islice(texts, _TOKENIZE_GROUP)):
        # verbose=False: long documents are expected here (we cut them), so HF's
        # "longer than the maximum sequence length" warning would only mislead.
        for ids in tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]:
            stream.extend(ids)
            if eos is not None:
                stream.append(eos)
        while len(stream) - start >= body:
            chunk = stream[start : start + body]
            yield torch.tensor(chunk if bos is None else [bos, *chunk], dtype=torch.long)
            start += body
        # Compact once per group, not per context: slicing the list is O(len).
        stream, start = stream[start:], 0


def content_mask(input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """True where the token is content; BOS, EOS and PAD (CLS and SEP for encoders) are excluded (as in Gemma Scope)."""
    special = [t for t in (*_bos_eos(tokenizer), tokenizer.pad_token_id) if t is not None]
    if not special:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return ~torch.isin(input_ids, torch.tensor(special, device=input_ids.device))
