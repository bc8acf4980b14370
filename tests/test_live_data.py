"""The live data path end to end: model loading, content-only batches, scale, seeding."""

from __future__ import annotations

import random
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

from gs_lightning.data.live import LiveActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.sites import ActivationExtractor
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts

EMBEDDED_NAME = "gs-lightning/tiny-gemma2-kjv"
EMBEDDED = Path(__file__).parents[1] / "gs_lightning" / "embedded" / "tiny-gemma2-kjv"
SMALL = dict(
    context_size=32,
    batch_size=64,
    model_batch_size=4,
    buffer_tokens=512,
    scale_estimate_tokens=2048,
    val_tokens=2048,
)


def _random_gemma(root: Path) -> tuple[str, str]:
    """A tiny random Gemma 2, a word tokenizer with Gemma's special ids, and a text."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(200)]
    paragraphs = [" ".join(rng.choices(words, k=rng.randint(5, 60))) for _ in range(1500)]
    (root / "text.txt").write_text("\n\n".join(paragraphs))
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(root / "model")
    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
    )
    Gemma2ForCausalLM(config).save_pretrained(root / "model")
    return str(root / "model"), str(root / "text.txt")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    OpenMP's spinning workers make these tests ~10x slower when another job runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[str, str]:
    """(model, text): the embedded model on the KJV once it ships, else a random tiny Gemma."""
    if EMBEDDED.exists():
        return EMBEDDED_NAME, "kjv"
    return _random_gemma(tmp_path_factory.mktemp("live"))


@pytest.fixture(scope="module")
def dm(source) -> LiveActivationDataModule:
    model, text = source
    module = LiveActivationDataModule(
        model=model, text=text, site="blocks.1.hook_resid_post", **SMALL
    )
    module.setup("fit")
    return module


def _first_batches(dm: LiveActivationDataModule, n: int) -> list[torch.Tensor]:
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_load_language_model(source):
    model, tok = load_language_model(source[0])
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "eager"  # Gemma 2's soft-capping needs it
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)


def test_missing_model_path_names_it(tmp_path):
    missing = str(tmp_path / "no-model-here")
    with pytest.raises(ConfigError, match="no-model-here"):
        LiveActivationDataModule(model=missing)
    with pytest.raises(ConfigError, match="'./nope/gemma'"):
        load_language_model("./nope/gemma")


def test_unreachable_hub_name_names_it(monkeypatch):
    # Offline mode fails at once instead of retrying the network for half a minute.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="'no-such-org/no-such-model'.*hub"):
        LiveActivationDataModule(model="no-such-org/no-such-model")


@pytest.mark.parametrize("site", ["blocks.9.hook_resid_post", "blocks.1.resid", "layers.1"])
def test_bad_site_names_it(source, site):
    with pytest.raises(ConfigError, match=f"site='{site}'"):
        LiveActivationDataModule(model=source[0], site=site)


def test_bad_numbers_name_the_key(source):
    with pytest.raises(ConfigError, match="buffer_tokens=100"):
        LiveActivationDataModule(model=source[0], batch_size=64, buffer_tokens=100)
    with pytest.raises(ConfigError, match="model_dtype='float8'"):
        LiveActivationDataModule(model=source[0], model_dtype="float8")
    with pytest.raises(ConfigError, match="val_tokens=0 must be at least 1"):
        LiveActivationDataModule(model=source[0], val_tokens=0)


def test_batches_hold_only_content_tokens(dm, source):
    batches = _first_batches(dm, 4)
    assert all(b.shape == (64, dm.d_in) and b.dtype == torch.float32 for b in batches)
    emitted = torch.cat(batches)
    # Recompute the first contexts' activations by hand, split by token kind.
    model, tok = dm._lm, dm._tokenizer
    contexts = iter_contexts(iter_texts(source[1], split="train"), tok, 32)
    ids = torch.stack([next(contexts) for _ in range(40)])
    with ActivationExtractor(model, [dm.site]) as extract:
        acts = extract(ids, torch.ones_like(ids))[dm.site]
    mask = content_mask(ids, tok)
    assert (~mask).sum() > 40  # BOS of every context, and some EOS
    exact = "donot_use_mm_for_euclid_dist"  # the matmul form loses ~1e-2 at these norms
    to_content = torch.cdist(emitted, acts[mask], compute_mode=exact).min(dim=1).values
    to_special = torch.cdist(emitted, acts[~mask], compute_mode=exact).min(dim=1).values
    assert to_content.max() < 1e-4  # every row is a content token's activation ...
    assert to_special.min() > 1e-2  # ... and none is a BOS/EOS/PAD one


def test_d_in(dm, source):
    assert dm.d_in == dm._lm.config.hidden_size == next(iter(dm.val_dataloader())).shape[1]
    hook_z = LiveActivationDataModule(model=source[0], site="blocks.0.attn.hook_z")
    cfg = dm._lm.config
    assert hook_z.d_in == cfg.num_attention_heads * cfg.head_dim
    probe = LiveActivationDataModule(model=source[0], site="model.layers.0.mlp.up_proj:output")
    assert probe.d_in == cfg.intermediate_size


def test_input_scale_normalises_held_out_activations(dm):
    sq_norms = torch.cat([(dm.input_scale * b).pow(2).sum(-1) for b in dm.val_dataloader()])
    assert len(sq_norms) == SMALL["val_tokens"]
    assert abs(sq_norms.mean().item() - 1.0) < 0.1


def test_val_set_is_fixed_and_in_order(dm):
    sizes = [len(b) for b in dm.val_dataloader()]
    assert sizes == [64] * (2048 // 64)
    first = [b.clone() for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, dm.val_dataloader(), strict=True))


def test_same_seed_same_batches(dm, source):
    model, text = source
    twin = LiveActivationDataModule(model=model, text=text, site=dm.site, **SMALL)
    twin.setup("fit")
    other = LiveActivationDataModule(model=model, text=text, site=dm.site, seed=1, **SMALL)
    other.setup("fit")
    ours, theirs, shuffled = (_first_batches(m, 3) for m in (dm, twin, other))
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert not torch.equal(ours[0], shuffled[0])
    assert twin.input_scale == dm.input_scale


def test_target_site_streams_aligned_pairs(dm, source):
    model, text = source
    pairs = LiveActivationDataModule(model=model, text=text, site=dm.site,
                                     target_site="blocks.1.hook_mlp_out", **SMALL)
    pairs.setup("fit")
    batches = _first_batches(pairs, 3)
    assert all(isinstance(b, tuple) and b[1].shape == (64, pairs.d_out) for b in batches)
    # The input half is exactly the single-site stream: one buffer shuffles the pairs together.
    assert all(torch.equal(x, single) for (x, _), single in zip(batches, _first_batches(dm, 3), strict=True))
    assert pairs.input_scale == dm.input_scale and pairs.target_scale != dm.input_scale
    val_x, val_y = next(iter(pairs.val_dataloader()))
    assert torch.equal(val_x, next(iter(dm.val_dataloader())))
    assert pairs.metadata["target_site"] == "blocks.1.hook_mlp_out"
    # Each target row is its input row's token: the same site as target returns the input.
    same = LiveActivationDataModule(model=model, text=text, site=dm.site, target_site=dm.site, **SMALL)
    same.setup("fit")
    x, y = _first_batches(same, 1)[0]
    assert torch.equal(x, y)


def test_metadata_and_state(dm, source):
    meta = dm.metadata
    assert meta["model"] == source[0] and meta["site"] == "blocks.1.hook_resid_post"
    assert meta["input_scale"] == dm.input_scale and meta["d_in"] == dm.d_in
    _first_batches(dm, 2)
    state = dm.state_dict()
    assert state["seed"] == 0 and state["batches_yielded"] >= 2 and state["tokens_read"] >= 512
    model, text = source
    resumed = LiveActivationDataModule(model=model, text=text, site=dm.site, **SMALL)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    # Resume is approximate: the new stream starts after the tokens already read.
    resumed.setup("fit")
    first = _first_batches(resumed, 1)[0]
    contexts = iter_contexts(iter_texts(text, split="train"), dm._tokenizer, 32)
    read_contexts, n = [], 0
    while n < state["tokens_read"]:  # exactly the contexts the first stream consumed
        read_contexts.append(next(contexts))
        n += int(content_mask(read_contexts[-1], dm._tokenizer).sum())
    ids = torch.stack(read_contexts)
    with ActivationExtractor(dm._lm, [dm.site]) as extract:
        read = extract(ids, torch.ones_like(ids))[dm.site][content_mask(ids, dm._tokenizer)]
    exact = "donot_use_mm_for_euclid_dist"
    seen = torch.cdist(first, read, compute_mode=exact).min(dim=1).values < 1e-4
    # Without the skip every row would be a repeat; real text repeats a few short
    # prefixes (a context's first word after BOS), so allow a handful.
    assert seen.float().mean() < 0.2
    assert resumed.state_dict()["batches_yielded"] == state["batches_yielded"] + 1


class _LinearAE(pl.LightningModule):
    """A stand-in for the SAE module: enough to drive the data module through fit."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = torch.nn.Linear(d, d)

    def training_step(self, x: torch.Tensor, _: int) -> torch.Tensor:
        return (self.net(x) - x).pow(2).mean()

    def validation_step(self, x: torch.Tensor, _: int) -> None:
        self.log("val/mse", (self.net(x) - x).pow(2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_fit_with_a_trainer(source, tmp_path):
    model, text = source
    dm = LiveActivationDataModule(model=model, text=text, **SMALL)
    trainer = pl.Trainer(
        max_steps=3,
        val_check_interval=3,
        limit_val_batches=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(_LinearAE(dm.d_in), datamodule=dm)
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert ckpt["LiveActivationDataModule"]["batches_yielded"] >= 3


def test_live_data_and_delta_lm_loss_share_one_model(tmp_path, monkeypatch):
    """A live run with DeltaLMLoss loads the language model's weights once, not twice."""
    from callbacks import DeltaLMLoss
    from gs_lightning.lm import load as lm
    from gs_lightning.saes import JumpReLUSAE
    from gs_lightning.train.module import SAETrainingModule

    loads = []
    real = lm._load_weights
    monkeypatch.setattr(lm, "_load_weights", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    lm.shared_language_model.cache_clear()
    dm = LiveActivationDataModule(model=EMBEDDED_NAME, **SMALL)
    delta = DeltaLMLoss(n_contexts=2, batch_size=2)
    trainer = pl.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, accelerator="cpu", logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[delta], default_root_dir=tmp_path)
    trainer.fit(SAETrainingModule(JumpReLUSAE(dm.d_in, 64), lr_warmup_steps=1, sparsity_warmup_steps=1),
                datamodule=dm)
    assert len(loads) == 1
    assert delta._lm[0] is dm._lm  # one object: the stream's model is the one spliced into
    assert "val/delta_loss" in trainer.callback_metrics
