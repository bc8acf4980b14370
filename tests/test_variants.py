"""One contract for every SAE variant: shapes, loss terms, where gradients go, save/load and
scale folding, and that a few Adam steps learn; plus each variant's own invariants."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import Tensor

from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.formats.io import load_sae, save_sae
from gs_lightning.saes import (
    SAE,
    BatchTopKSAE,
    GatedSAE,
    JumpReLU2025SAE,
    JumpReLUSAE,
    MatryoshkaBatchTopKSAE,
    MatryoshkaJumpReLUSAE,
    ReLUSAE,
    TopKSAE,
)
from gs_lightning.saes.topk import topk_init_scale
from gs_lightning.train.packed import build_packed

D_IN, D_SAE = 16, 64


@dataclass
class Case:
    make: Callable[[], SAE]
    silent: dict[str, list[str]] = field(default_factory=dict)
    """Loss term -> parameters (or ``W_dec[a:]`` row ranges) that term alone must not move."""
    frozen: list[str] = field(default_factory=list)
    """Parameters that no term moves."""


def _kill_half(sae: TopKSAE) -> TopKSAE:
    # Mark latents [32, 64) dead so that AuxK has something to do.
    sae.tokens_since_fired[D_SAE // 2 :] = float("inf")  # never fired: dead under any window
    return sae


CASES = {
    "JumpReLU": Case(
        lambda: JumpReLUSAE(D_IN, D_SAE, sparsity_coefficient=0.1, bandwidth=0.05, threshold_init=0.05),
        silent={"l0_penalty": ["W_enc", "b_enc", "W_dec", "b_dec"], "mse": []},
    ),
    "JumpReLU2025": Case(
        lambda: JumpReLU2025SAE(D_IN, D_SAE, sparsity_coefficient=0.1, pre_act_coefficient=0.01,
                                bandwidth=0.2, threshold_init=0.05),
        # Straight through: unlike JumpReLU's L0 term, the tanh penalty reaches the encoder.
        silent={"tanh_penalty": ["b_dec"], "pre_act": ["b_dec"]},
    ),
    "ReLU": Case(lambda: ReLUSAE(D_IN, D_SAE, sparsity_coefficient=0.1), silent={"l1_penalty": ["b_dec"]}),
    "TopK": Case(
        lambda: _kill_half(TopKSAE(D_IN, D_SAE, k=4, aux_k=8, dead_steps_threshold=5)),
        # The residual is a fixed target and AuxK decodes from dead latents only (it reaches
        # b_dec only through the encoder, which reads x - b_dec).
        silent={"aux_k": [f"W_dec[:{D_SAE // 2}]"]},
    ),
    "BatchTopK": Case(
        lambda: _kill_half(BatchTopKSAE(D_IN, D_SAE, k=4, aux_k=8, dead_steps_threshold=5)),
        silent={"aux_k": [f"W_dec[:{D_SAE // 2}]"]},
    ),
    "Gated": Case(
        lambda: GatedSAE(D_IN, D_SAE, sparsity_coefficient=0.1),
        # The auxiliary reconstruction goes through a frozen decoder and the gate path only.
        silent={"aux": ["W_dec", "b_dec", "r_mag", "b_mag"], "l1_penalty": ["r_mag", "b_mag", "b_dec"]},
    ),
    "Matryoshka": Case(
        lambda: _kill_half(MatryoshkaBatchTopKSAE(D_IN, D_SAE, k=4, prefixes=[8, 24], aux_k=8,
                                                  dead_steps_threshold=5)),
        silent={"mse_prefix_8": ["W_dec[8:]"], "mse_prefix_24": ["W_dec[24:]"]},
    ),
    "MatryoshkaJumpReLU": Case(
        lambda: MatryoshkaJumpReLUSAE(D_IN, D_SAE, prefixes=[8, 24], sparsity_coefficient=0.1, bandwidth=0.05,
                                      threshold_init=0.05),
        silent={"mse_prefix_8": ["W_dec[8:]"], "mse_prefix_24": ["W_dec[24:]"],
                "l0_penalty": ["W_enc", "b_enc", "W_dec", "b_dec"]},
    ),
}


def _make(name: str) -> SAE:
    torch.manual_seed(0)
    sae = CASES[name].make()
    with torch.no_grad():  # move away from the symmetric init so every term is exercised
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.uniform_(-0.1, 0.1)
    return sae


def _selected_grad(sae: SAE, spec: str) -> Tensor | None:
    name, _, rows = spec.partition("[")
    grad = getattr(sae, name).grad
    if grad is None or not rows:
        return grad
    start, _, stop = rows.rstrip("]").partition(":")
    return grad[int(start) if start else None : int(stop) if stop else None]


def _data(n_tokens: int = 4096) -> Tensor:
    module = SyntheticActivationDataModule(d_in=D_IN, n_features=32, active_features=3, n_tokens=n_tokens)
    return module.load()


@pytest.mark.parametrize("name", CASES)
def test_shapes_and_loss_terms(name: str) -> None:
    sae = _make(name)
    x = torch.randn(2, 24, D_IN)  # leading dims beyond the batch are allowed
    assert sae.encode(x).shape == (2, 24, D_SAE)
    assert sae.decode(sae.encode(x)).shape == sae(x).shape == x.shape
    out = sae.training_output(x.reshape(-1, D_IN))
    assert out.x_hat.shape == (48, D_IN) and out.fire_counts.shape == (D_SAE,)
    assert "mse" in out.losses and set(CASES[name].silent) <= set(out.losses)
    for term, value in out.losses.items():
        assert value.shape == () and torch.isfinite(value), term
    assert out.l0.item() > 0 and not out.l0.requires_grad


@pytest.mark.parametrize("name", CASES)
def test_gradients_reach_what_should_learn_only(name: str) -> None:
    x = _data(256)
    sae = _make(name)
    sum(sae.training_output(x).losses.values()).backward()
    for p_name, p in sae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{p_name} gets no gradient"
    for term, specs in CASES[name].silent.items():
        sae = _make(name)
        loss = sae.training_output(x).losses[term]
        assert loss.item() > 0, term
        loss.backward()
        for spec in specs:
            grad = _selected_grad(sae, spec)
            assert grad is None or torch.all(grad == 0), f"{term} moves {spec}"
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in sae.parameters()), term


@pytest.mark.parametrize("name", CASES)
def test_save_load_and_fold(name: str, tmp_path) -> None:
    x = _data(1024)
    sae = _make(name)
    # One training batch: statistics such as BatchTopK's threshold. Other rows below, so
    # that no activation sits exactly on that threshold where rounding could flip it.
    sae.training_output(x[512:])
    x = x[:512]
    sae.eval()
    loaded = load_sae(save_sae(sae, tmp_path / "plain"))
    assert type(loaded) is type(sae)
    if isinstance(sae, TopKSAE) and not sae.normalize_decoder:
        # Saved in the normalised form: the free rows' norms moved into the encoder, in float32.
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(loaded.encode(x), sae.encode(x)) and torch.equal(loaded(x), sae(x))
    scale = 0.37
    x_raw = x / scale
    f_trained = sae.encode(scale * x_raw)
    assert (f_trained != 0).any()
    folded = load_sae(save_sae(sae, tmp_path / "folded", input_scale=scale))
    torch.testing.assert_close(folded.encode(x_raw), f_trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x_raw), sae.decode(f_trained) / scale, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_a_few_adam_steps_lower_the_loss(name: str) -> None:
    x = _data(2048)
    x = x / x.pow(2).sum(-1).mean().sqrt()  # E||x||^2 = 1, the scale the coefficients assume
    sae = _make(name)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3, betas=(0.0, 0.999))

    def loss_on(batch: Tensor) -> Tensor:
        return sum(sae.training_output(batch).losses.values())

    with torch.no_grad():
        before = loss_on(x[:512]).item()
    for i in range(40):
        optimizer.zero_grad()
        loss_on(x[(i % 4) * 512 : (i % 4 + 1) * 512]).backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    with torch.no_grad():
        after = loss_on(x[:512]).item()
    assert math.isfinite(after) and after < 0.8 * before, (before, after)


# -- each variant's own invariants -------------------------------------------------------------


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_topk_keeps_k_per_token_and_batchtopk_k_on_average(cls: type) -> None:
    torch.manual_seed(0)
    sae = cls(D_IN, D_SAE, k=5)
    f = sae.encode(torch.randn(100, D_IN))
    per_token = (f != 0).sum(-1)
    if cls is TopKSAE:
        assert torch.all(per_token == 5)
    else:
        assert per_token.sum().item() == 500 and per_token.min() != per_token.max()


def test_aux_k_is_zero_without_dead_latents_and_revives_dead_ones() -> None:
    torch.manual_seed(0)
    sae = TopKSAE(D_IN, D_SAE, k=4, aux_k=8, dead_steps_threshold=3)
    x = torch.randn(32, D_IN)
    assert sae.training_output(x).losses["aux_k"].item() == 0.0
    for _ in range(3):
        sae.training_output(x)
    # With a fixed batch, latents outside its top-4s never fire and die after 3 steps.
    dead = sae.dead
    assert dead.any() and not dead.all()
    out = sae.training_output(x)
    out.losses["aux_k"].backward()
    assert sae.W_dec.grad[dead].abs().sum() > 0 and torch.all(sae.W_dec.grad[~dead] == 0)


@pytest.mark.parametrize("d_in,d_sae,k", [(128, 2048, 32), (64, 4096, 8), (256, 1024, 64)])
def test_topk_default_init_reconstructs_unit_inputs_at_about_half_their_norm(d_in: int, d_sae: int, k: int) -> None:
    torch.manual_seed(0)
    sae = TopKSAE(d_in, d_sae, k=k, normalize_decoder=True)  # the rule is for a unit decoder
    assert sae.encoder_init_scale is None  # stored as given, so a sweep over k re-derives it
    assert math.isclose(sae.W_enc.norm(dim=0).mean().item(), topk_init_scale(d_in, d_sae, k), rel_tol=1e-5)
    x = torch.nn.functional.normalize(torch.randn(512, d_in), dim=-1)
    ratio = sae(x).norm(dim=-1).mean().item()
    # The rule's order statistic and the decoded rows' partial alignment with x are
    # approximations: the ratio lands near 1/2, far from unit columns' several-fold overshoot.
    assert 0.35 < ratio < 0.75
    assert TopKSAE(d_in, d_sae, k=k, encoder_init_scale=1.0, normalize_decoder=True)(x).norm(dim=-1).mean().item() > 1.2


def test_a_packed_sweep_over_k_gives_each_topk_member_its_own_init_scale() -> None:
    packed, _ = build_packed(TopKSAE(32, 256, k=4, normalize_decoder=True), {"k": [2, 16]})
    norms = [sae.W_enc.norm(dim=0).mean().item() for _, sae in packed.named_members()]
    assert norms == pytest.approx([topk_init_scale(32, 256, 2), topk_init_scale(32, 256, 16)], rel=1e-5)
    assert norms[0] > 1.5 * norms[1]


def test_batchtopk_eval_is_a_jumprelu_with_the_estimated_threshold() -> None:
    torch.manual_seed(0)
    sae = BatchTopKSAE(D_IN, D_SAE, k=4, normalize_decoder=True)  # canonical weights are then its own
    x = torch.randn(256, D_IN)
    sae.training_output(x)  # first batch: the estimate is its smallest kept activation
    f_train = sae.encode(x)
    smallest = f_train[f_train > 0].min().item()
    assert sae.threshold.item() == smallest
    sae.training_output(2 * x)  # then a moving average: 0.99 * m + 0.01 * 2m
    assert sae.threshold.item() == pytest.approx(1.01 * smallest, rel=1e-5)
    sae.eval()
    jumprelu = JumpReLUSAE(D_IN, D_SAE, threshold_parameterization="raw")
    jumprelu.load_canonical_state_dict(sae.canonical_state_dict())
    assert torch.equal(jumprelu.encode(x), sae.encode(x))
    assert torch.equal(jumprelu.threshold, sae.threshold.expand(D_SAE))


def test_matryoshka_rejects_bad_prefixes_and_reports_every_prefix() -> None:
    for prefixes in ([], [8, 8], [24, 8], [0, 8], [8, D_SAE]):
        with pytest.raises(ValueError, match="prefixes"):
            MatryoshkaBatchTopKSAE(D_IN, D_SAE, k=4, prefixes=prefixes)
    sae = MatryoshkaBatchTopKSAE(D_IN, D_SAE, k=4, prefixes=[8, 24])
    x = torch.randn(64, D_IN)
    out = sae.training_output(x)
    f = sae.encode(x)
    for m in (8, 24):
        x_hat_m = f[:, :m] @ sae.decoder_rows()[:m] + sae.b_dec
        torch.testing.assert_close(out.losses[f"mse_prefix_{m}"], (x_hat_m - x).pow(2).sum(-1).mean())


def test_gated_exports_paper_names() -> None:
    names = set(GatedSAE(D_IN, D_SAE).canonical_state_dict())
    assert names == {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"}


# -- a variant from outside the package --------------------------------------------------------


def test_variant_defined_outside_the_package_trains_through_the_cli(tmp_path) -> None:
    from test_cli import (  # tests/ is on sys.path under pytest's default import mode
        _config,
        _write,
    )

    from gs_lightning.cli import main

    config = _config(tmp_path)
    config["model"]["sae"] = {
        "class_path": "tests.custom_variant.SoftplusL1SAE",
        "init_args": {"d_in": 32, "d_sae": 128, "sparsity_coefficient": 1e-3},
    }
    cli = main(["fit", "--config", _write(tmp_path, config)])
    assert type(cli.model.sae).__name__ == "SoftplusL1SAE"
    assert float(cli.trainer.callback_metrics["val/fvu"]) < 0.5
    saved = next((tmp_path / "run").rglob("sae/config.json")).parent
    loaded = load_sae(saved)
    assert type(loaded).__name__ == "SoftplusL1SAE" and loaded.sparsity_coefficient == 1e-3
