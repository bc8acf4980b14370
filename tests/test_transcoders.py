"""Transcoders: any variant reads one site and reconstructs another (d_out), through the fused
and packed paths, the training module, the data, delta LM loss, saving and export."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from callbacks import SaveSAE
from gs_lightning.data.live import LiveActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.formats.export import (
    export_gemma_scope,
    export_saelens,
    load_gemma_scope,
    load_saelens,
)
from gs_lightning.formats.io import load_sae
from gs_lightning.kernels.fused import Workspace, fused_packed_jumprelu_loss
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.text import iter_contexts, iter_texts
from gs_lightning.saes import (
    BatchTopKSAE,
    GatedSAE,
    JumpReLU2025SAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    MatryoshkaJumpReLUSAE,
    ReLUSAE,
    TopKSAE,
)
from gs_lightning.train.module import SAETrainingModule, check_widths

D_IN, D_OUT, S = 12, 20, 96
VARIANTS = {
    "JumpReLU": lambda: JumpReLUSAE(D_IN, S, sparsity_coefficient=1e-3, bandwidth=0.05, threshold_init=0.05,
                                    threshold_parameterization="raw", d_out=D_OUT),
    "JumpReLU2025": lambda: JumpReLU2025SAE(D_IN, S, sparsity_coefficient=1e-3, bandwidth=0.2, threshold_init=0.05,
                                            d_out=D_OUT),
    "ReLU": lambda: ReLUSAE(D_IN, S, sparsity_coefficient=1e-3, d_out=D_OUT),
    "TopK": lambda: TopKSAE(D_IN, S, k=6, aux_k=8, d_out=D_OUT),
    "BatchTopK": lambda: BatchTopKSAE(D_IN, S, k=6, aux_k=8, d_out=D_OUT),
    "Matryoshka": lambda: MatryoshkaBatchTopKSAE(D_IN, S, k=6, prefixes=[16, 48], aux_k=8, d_out=D_OUT),
    "Gated": lambda: GatedSAE(D_IN, S, sparsity_coefficient=1e-3, d_out=D_OUT),
    "MatryoshkaJumpReLU": lambda: MatryoshkaJumpReLUSAE(D_IN, S, prefixes=[16, 48], sparsity_coefficient=1e-3,
                                                        bandwidth=0.05, threshold_init=0.05, d_out=D_OUT),
    "SkipJumpReLU": lambda: JumpReLUSAE(D_IN, S, sparsity_coefficient=1e-3, bandwidth=0.05, threshold_init=0.05,
                                        threshold_parameterization="raw", d_out=D_OUT, skip_connection=True),
    "SkipTopK": lambda: TopKSAE(D_IN, S, k=6, aux_k=8, d_out=D_OUT, skip_connection=True),
}


def _pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and target share 3-sparse codes over 40 features: the target is a linear map of them."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, 40)
    idx = torch.stack([torch.randperm(40, generator=g)[:3] for _ in range(n)])
    codes.scatter_(1, idx, torch.rand(n, 3, generator=g) + 0.5)
    return codes @ torch.randn(40, D_IN, generator=torch.Generator().manual_seed(1)), \
        codes @ torch.randn(40, D_OUT, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_is_a_transcoder(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    sae = VARIANTS[name]()
    assert sae.W_enc.shape == (D_IN, S) and sae.W_dec.shape == (S, D_OUT) and sae.b_dec.shape == (D_OUT,)
    assert sae.is_transcoder and sae.out_width == D_OUT
    x, y = _pairs(256)
    out = sae.training_output(x, 1.0, target=y)
    assert out.x_hat.shape == (256, D_OUT)
    assert all(torch.isfinite(v) for v in out.losses.values())
    torch.testing.assert_close(out.losses["mse"], (out.x_hat - y).pow(2).sum(-1).mean(), rtol=1e-5, atol=1e-6)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = sae.training_output(x, 1.0, target=y)
        loss = sum(out.losses.values())
        first = float(out.losses["mse"]) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    assert float(out.losses["mse"]) < 0.5 * first  # it learns the map from x to y
    # Save -> load keeps d_out; folding two scales maps raw x to raw y.
    from gs_lightning.formats.io import save_sae

    sae.eval()
    path = save_sae(sae, tmp_path / "tc", input_scale=2.0, target_scale=0.5)
    loaded = load_sae(path)
    assert loaded.d_out == D_OUT
    torch.testing.assert_close(loaded(x / 2.0), sae(x) / 0.5, rtol=1e-4, atol=1e-4)


def test_fused_transcoder_step_equals_autograd() -> None:
    torch.manual_seed(0)
    fused = VARIANTS["JumpReLU"]().train()
    plain = JumpReLUSAE(D_IN, S, sparsity_coefficient=1e-3, bandwidth=0.05, threshold_init=0.05,
                        threshold_parameterization="raw", d_out=D_OUT, fused=False).train()
    plain.load_state_dict(fused.state_dict())
    x, y = _pairs(128)
    for sae in (fused, plain):
        out = sae.training_output(x, 0.5, target=y)
        sum(out.losses.values()).backward()
    assert fused.uses_fused(x) and not plain.uses_fused(x)
    for (name, a), (_, b) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_fused_step_takes_the_target() -> None:
    torch.manual_seed(0)
    saes = [VARIANTS["JumpReLU"]() for _ in range(2)]
    x, y = _pairs(64)
    stack = [torch.stack([getattr(s, k) for s in saes]).detach().requires_grad_()
             for k in ("W_enc", "b_enc", "W_dec", "b_dec")]
    mse, _, _, x_hat = fused_packed_jumprelu_loss(x, *stack, torch.stack([s.threshold for s in saes]).detach(),
                                                  torch.tensor([0.05, 0.05]), Workspace(), None, y)
    mse.sum().backward()
    for k, sae in enumerate(saes):
        single = sae.training_output(x, 0.0, target=y)  # the single fused step (lambda warm-up 0)
        single.losses["mse"].backward()
        torch.testing.assert_close(x_hat[k], single.x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mse[k], single.losses["mse"], rtol=1e-5, atol=1e-5)
        for grad, name in zip((s.grad[k] for s in stack), ("W_enc", "b_enc", "W_dec", "b_dec")):
            torch.testing.assert_close(grad, getattr(sae, name).grad, rtol=1e-4, atol=1e-6, msg=name)


class _Widths:
    d_in, d_out, paired = D_IN, D_OUT, True


def test_widths_and_pairing_are_checked() -> None:
    check_widths(VARIANTS["ReLU"](), _Widths())
    with pytest.raises(ConfigError, match="d_out is not set; set d_out: 20"):
        check_widths(ReLUSAE(D_IN, S), _Widths())
    unpaired = type("U", (), {"d_in": D_IN, "paired": False})()
    with pytest.raises(ConfigError, match="makes a transcoder, but U has no target site"):
        check_widths(VARIANTS["ReLU"](), unpaired)
    with pytest.raises(ConfigError, match="d_out=30 but the target site has width 20"):
        check_widths(ReLUSAE(D_IN, S, d_out=30), _Widths())


def test_gemma_scope_layout_holds_a_transcoder(tmp_path) -> None:
    torch.manual_seed(0)
    sae = VARIANTS["JumpReLU"]().eval()
    path = export_gemma_scope(sae, tmp_path, layer=1, average_l0=7)
    back = load_gemma_scope(path)
    assert back.d_out == D_OUT
    x = _pairs(32)[0]
    torch.testing.assert_close(back(x), sae(x))
    # SAELens holds it too, as its jumprelu_transcoder (tests/test_skip_transcoders.py loads it there).
    again = load_saelens(export_saelens(sae, tmp_path / "saelens"))
    assert again.d_out == D_OUT
    torch.testing.assert_close(again(x), sae(x))


class _TrueMLP(nn.Module):
    """The layer's own MLP and post-norm: a perfect 'transcoder' from hook_mlp_in to hook_mlp_out."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        # A copy: the splice hooks later placed on the model's own modules must not fire here.
        self.layer = copy.deepcopy(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.post_feedforward_layernorm(self.layer.mlp(x))


def test_delta_lm_loss_splices_a_transcoders_output_at_its_target() -> None:
    model, tokenizer = load_language_model("gs-lightning/tiny-gemma2-kjv")
    contexts = list(iter_contexts(iter_texts("kjv", split="validation"), tokenizer, 32))[:4]
    exact = delta_lm_loss(model, tokenizer, _TrueMLP(model.model.layers[1]), "blocks.1.hook_mlp_out", contexts,
                          source_site="blocks.1.hook_mlp_in")
    assert abs(exact["delta_loss"]) < 1e-4 and exact["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    other = delta_lm_loss(model, tokenizer, _TrueMLP(model.model.layers[0]), "blocks.1.hook_mlp_out", contexts,
                          source_site="blocks.1.hook_mlp_in")
    assert other["delta_loss"] > 0.05  # the wrong MLP costs loss: the splice is really used


@pytest.mark.slow
def test_fit_a_transcoder_on_live_mlp_activations(tmp_path) -> None:
    pl.seed_everything(0)
    data = LiveActivationDataModule(site="blocks.1.hook_mlp_in", target_site="blocks.1.hook_mlp_out",
                                    context_size=64, batch_size=256, model_batch_size=8, buffer_tokens=4096,
                                    scale_estimate_tokens=4096, val_tokens=2048)
    sae = TopKSAE(128, 512, k=16, d_out=128)
    module = SAETrainingModule(sae, lr=2e-3, lr_warmup_steps=5, sparsity_warmup_steps=5)
    saver = SaveSAE()
    trainer = pl.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, val_check_interval=60,
                         check_val_every_n_epoch=None, callbacks=[saver], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    fvu = float(trainer.callback_metrics["val/fvu"])
    # k fixes L0, less the rare token whose 16th-largest pre-activation is negative (ReLU'd).
    assert 0 < fvu < 0.9 and float(trainer.callback_metrics["val/l0"]) == pytest.approx(16.0, rel=1e-3)
    assert module.target_scale != module.input_scale
    saved = load_sae(saver.saved_path)
    assert saved.d_out == 128
    from gs_lightning.evaluation.evaluate import reconstruction_metrics

    model, tokenizer = load_language_model("gs-lightning/tiny-gemma2-kjv")
    contexts = list(iter_contexts(iter_texts("kjv", split="validation"), tokenizer, 64))[:32]
    metrics = reconstruction_metrics(saved, model, tokenizer, "blocks.1.hook_mlp_in", contexts, 8,
                                     target_site="blocks.1.hook_mlp_out")
    assert metrics["fvu"] == pytest.approx(fvu, rel=0.1)  # the saved, folded transcoder scores as in training
