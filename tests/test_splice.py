"""Delta LM loss on the embedded Gemma 2: ~0 for an identity SAE, the zero-ablation cost for a zero SAE."""

import itertools

import pytest
import torch

from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.text import iter_contexts, iter_texts
from gs_lightning.saes import JumpReLUSAE

MODEL = "gs-lightning/tiny-gemma2-kjv"


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = load_language_model(MODEL)
    contexts = list(itertools.islice(iter_contexts(iter_texts("kjv", split="validation"), tokenizer, 64), 12))
    return model, tokenizer, contexts


def _identity_sae(d: int) -> JumpReLUSAE:
    sae = JumpReLUSAE(d, d, threshold_parameterization="raw")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.raw_threshold.fill_(-1e9)  # every pre-activation passes: f = x
    return sae


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.0.attn.hook_z"])
def test_identity_sae_costs_nothing(lm, site) -> None:
    model, tokenizer, contexts = lm
    d = 128  # hidden size, and heads * head_dim = 4 * 32 for hook_z
    result = delta_lm_loss(model, tokenizer, _identity_sae(d), site, contexts, batch_size=5, input_scale=0.3)
    assert abs(result["delta_loss"]) < 1e-4 and result["kl"] < 1e-5
    assert result["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    # The clean loss is the model's own: far below the unigram entropy (~6 nats).
    assert 2.5 < result["ce_clean"] < 5.5
    # Predictions count from content positions (not BOS 2, EOS 1, pad 0), last position excluded.
    assert result["tokens"] == sum(int((c[:-1] > 2).sum()) for c in contexts)


def test_zero_sae_costs_the_zero_ablation(lm) -> None:
    model, tokenizer, contexts = lm
    sae = _identity_sae(128)
    with torch.no_grad():
        sae.W_dec.zero_()
    result = delta_lm_loss(model, tokenizer, sae, "blocks.1.hook_resid_post", contexts)
    assert result["ce_spliced"] == pytest.approx(result["ce_zero_ablated"], abs=1e-5)
    assert result["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert result["delta_loss"] > 1.0 and result["kl"] > 1.0


def test_delta_loss_is_logged_during_fit(tmp_path) -> None:
    from gs_lightning.cli import main

    cli = main(["fit", "--config", "configs/quickstart.yaml", "--trainer.max_steps", "20",
                "--trainer.val_check_interval", "20", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.enable_progress_bar", "false", "--data.init_args.batch_size", "256",
                "--data.init_args.val_tokens", "2048", "--data.init_args.buffer_tokens", "2048",
                "--data.init_args.scale_estimate_tokens", "2048"])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    # 20 steps in, the SAE is poor but not useless: it recovers some loss and costs some.
    assert metrics["val/delta_loss"] > 0.0
    assert metrics["val/loss_recovered"] < 1.0
    assert 2.5 < metrics["val/ce_clean"] < 5.5
