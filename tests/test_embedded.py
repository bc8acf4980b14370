"""The embedded tiny Gemma 2 loads offline, has the promised shape, and has learned its text."""

from __future__ import annotations

import math
import pathlib

import pytest
import torch

from gs_lightning.embedded import EMBEDDED_MODELS, resolve_embedded
from gs_lightning.embedded.kjv import kjv_split

NAME = "gs-lightning/tiny-gemma2-kjv"
BOS, EOS, PAD = 2, 1, 0


@pytest.fixture(scope="module")
def model_dir() -> pathlib.Path:
    path = resolve_embedded(NAME)
    assert path is not None
    return pathlib.Path(path)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # loading must never need the hub
        return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_resolve_embedded_knows_only_its_names(model_dir):
    assert model_dir == EMBEDDED_MODELS[NAME]
    assert (
        model_dir.is_dir()
        and model_dir.parent == pathlib.Path(__file__).parents[1] / "gs_lightning" / "embedded"
    )
    for other in ("google/gemma-2-2b", "tiny-gemma2-kjv", str(model_dir), ""):
        assert resolve_embedded(other) is None


def test_tokenizer_is_gemma_like(tokenizer):
    assert tokenizer.is_fast
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (
        PAD,
        EOS,
        BOS,
    )
    assert tokenizer.unk_token_id == 3 and len(tokenizer) == 4096
    text = "And God said, Let there be light: and there was light."
    ids = tokenizer(text).input_ids
    assert ids[0] == BOS and ids.count(BOS) == 1 and EOS not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-level: text far from the training data still round-trips, without <unk>.
    odd = "naïve café — 東京 🙂\n\ttabs"
    odd_ids = tokenizer(odd).input_ids
    assert 3 not in odd_ids and tokenizer.decode(odd_ids, skip_special_tokens=True) == odd


def test_architecture(model):
    from transformers import Gemma2ForCausalLM

    assert isinstance(model, Gemma2ForCausalLM)
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (128, 512, 4)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 32)
    assert (c.vocab_size, c.max_position_embeddings, c.sliding_window) == (4096, 1024, 64)
    assert c.query_pre_attn_scalar == c.head_dim
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)
    assert (c.pad_token_id, c.eos_token_id, c.bos_token_id) == (PAD, EOS, BOS)
    assert c._attn_implementation == "eager"  # the implementation that applies softcapping
    assert c.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_weight_files_are_small(model_dir):
    weights = list(model_dir.glob("*.safetensors"))
    assert weights
    assert sum(p.stat().st_size for p in weights) <= 15e6
    assert (model_dir / "README.md").is_file()


def test_hidden_states(model, tokenizer):
    ids = tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (1, ids.shape[1], 128) for h in out.hidden_states)
    assert all(torch.isfinite(h).all() for h in out.hidden_states)


def _unigram_entropy(tokenizer, texts: list[str]) -> float:
    """Entropy (nats) of the token frequencies of ``texts``: the best loss without context."""
    counts = torch.zeros(len(tokenizer), dtype=torch.float64)
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False).input_ids:
        counts += torch.bincount(torch.tensor(ids), minlength=len(counts)).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def test_validation_loss_beats_unigram(model, tokenizer):
    entropy = _unigram_entropy(tokenizer, kjv_split("train"))
    # Sanity of the baseline itself: English BPE text sits well inside (0, ln |V|).
    assert 4.5 < entropy < math.log(len(tokenizer)) - 1.0

    total, count = 0.0, 0
    with torch.no_grad():
        for text in kjv_split("validation")[::11][:20]:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=128).input_ids
            loss = model(input_ids=ids, labels=ids).loss  # mean over ids.shape[1] - 1 predictions
            total += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    val_loss = total / count
    assert val_loss < entropy - 1.5, f"validation loss {val_loss:.3f} vs unigram entropy {entropy:.3f}"
