"""Text sources and their cutting into BOS-led contexts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gs_lightning.errors import ConfigError
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts

EMBEDDED = Path(__file__).parents[1] / "gs_lightning" / "embedded" / "tiny-gemma2-kjv"
WORDS = "in the beginning god created heaven and earth was without form void".split()


def word_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Gemma's special ids: pad 0, eos 1, bos 2, unk 3."""
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    if bos:
        specials["bos_token"] = "<bos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def tokenizers() -> list:
    """The in-test tokenizer, and the embedded model's once it is shipped."""
    params = [pytest.param(word_tokenizer, id="word")]
    if EMBEDDED.exists():
        from transformers import AutoTokenizer

        params.append(pytest.param(lambda: AutoTokenizer.from_pretrained(EMBEDDED), id="embedded"))
    return params


DOCS = ["in the beginning god created", "the heaven and the earth", "and the earth was void"]


@pytest.mark.parametrize("make", tokenizers())
def test_contexts_start_with_bos_and_have_the_right_length(make):
    tok = make()
    contexts = list(iter_contexts(DOCS * 20, tok, context_size=9))
    assert len(contexts) > 5
    for ctx in contexts:
        assert ctx.dtype == torch.long and ctx.shape == (9,)
        assert ctx[0] == tok.bos_token_id
        assert tok.bos_token_id not in ctx[1:].tolist()
    # The bodies, concatenated, are the documents joined (and ended) by EOS.
    stream = []
    for doc in DOCS * 20:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    body = torch.cat([c[1:] for c in contexts]).tolist()
    assert body == stream[: len(body)] and len(stream) - len(body) < 8


def test_contexts_without_bos_are_plain_cuts():
    tok = word_tokenizer(bos=False)
    contexts = list(iter_contexts(DOCS, tok, context_size=4))
    stream = []
    for doc in DOCS:
        stream += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.cat(contexts).tolist() == stream[: 4 * len(contexts)]
    assert len(stream) - 4 * len(contexts) < 4


def test_context_size_one_is_refused():
    with pytest.raises(ConfigError, match="context_size=1"):
        list(iter_contexts(DOCS, word_tokenizer(), context_size=1))


def test_content_mask_excludes_bos_eos_pad():
    tok = word_tokenizer()
    ids = torch.tensor([[2, 5, 6, 1, 7, 0, 0], [2, 8, 3, 1, 1, 9, 10]])
    expected = torch.tensor([[0, 1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(content_mask(ids, tok), expected)


def test_kjv_splits_are_disjoint():
    train = iter_texts("kjv", split="train")
    first_train = [next(train) for _ in range(30)]
    first_val = [next(iter_texts("kjv", split="validation")) for _ in range(1)]
    assert first_train[0].startswith("In the beginning")
    assert first_val[0] not in first_train


def test_local_text_file_and_directory(tmp_path):
    paragraphs = [f"paragraph {i}\nsecond line" for i in range(40)]
    (tmp_path / "a.txt").write_text("\n\n".join(paragraphs[:25]) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("\n \n".join(paragraphs[25:]))
    train = list(iter_texts(str(tmp_path / "a.txt"), split="train"))
    assert train == [p for i, p in enumerate(paragraphs[:25]) if i % 20 != 19]
    # A directory reads every .txt below it in sorted order; every 20th is held out.
    assert list(iter_texts(str(tmp_path), split="validation")) == [paragraphs[19], paragraphs[39]]


def test_missing_file_and_bad_split_name_the_value(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(ConfigError, match="nope.txt"):
        next(iter_texts(missing, split="train"))
    with pytest.raises(ConfigError, match="'test'"):
        next(iter_texts("kjv", split="test"))


def test_datasets_directory_and_column(tmp_path):
    pytest.importorskip("datasets")
    rows = [{"body": f"document {i}", "id": i} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    texts = list(iter_texts(str(tmp_path), split="train", column="body"))
    assert texts == [r["body"] for r in rows]
    with pytest.raises(ConfigError, match="text_column='text'"):
        next(iter_texts(str(tmp_path), split="train"))
    # A single data file works too; it has only a "train" split.
    single = str(tmp_path / "train.jsonl")
    assert list(iter_texts(single, split="train", column="body")) == texts
    with pytest.raises(ConfigError, match="validation"):
        next(iter_texts(single, split="validation", column="body"))
