"""Crosscoder: forward and training step of both causal structures against hand-written dense
references with explicit masks, the acausal form against a JumpReLU SAE on the concatenated
sites, the weakly causal form against a CLT reconstructing its own inputs, saving with
per-site scales, a short fit on aligned shards, and bad inputs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from gs_lightning.data import AlignedShardsDataModule
from gs_lightning.formats.io import load_sae, save_sae
from gs_lightning.kernels.functional import rectangle
from gs_lightning.saes import Crosscoder, CrossLayerTranscoder, JumpReLUSAE
from gs_lightning.saes.crosscoder import crosscoder_parameters
from gs_lightning.train.module import SAETrainingModule
from tests.test_aligned import _sibling
from tests.test_shards import write_folder

S, D, N, B = 3, 4, 5, 16  # sites, width, latents per site, tokens
F = S * N
CAUSALITIES = ["acausal", "weakly_causal"]
DEAD = [2, 7, 11]  # latents of sites 0, 1 and 2 when weakly causal


def _cc(causality: str, target_l0: float | None = None, seed: int = 0) -> Crosscoder:
    torch.manual_seed(seed)
    cc = Crosscoder(S, D, F, causality, sparsity_coefficient=0.3, bandwidth=0.5, target_l0=target_l0)
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.3)
        cc.b_dec.normal_(0, 0.3)
        cc.raw_threshold.uniform_(0.1, 0.6)
    return cc


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))


def _dense(cc: Crosscoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense ``E [S, D, F]`` and ``W [F, S, D]`` laid out as the module docstring says, and the
    masks ``[S, F]`` (site s feeds latent i) and ``[F, S]`` (latent i writes site s)."""
    E, W = torch.zeros(S, D, F), torch.zeros(F, S, D)
    if cc.causality == "acausal":
        E.copy_(cc.W_enc[0].detach())
        W.copy_(cc.W_dec[0].detach())
        return E, W, torch.ones(S, F), torch.ones(F, S)
    home = torch.arange(F) // N  # latent l * N + i belongs to site l
    for l in range(S):
        E[l, :, l * N : (l + 1) * N] = cc.W_enc[l][0].detach()
        W[l * N : (l + 1) * N, l:] = cc.W_dec[l].detach()
    sites = torch.arange(S)
    return E, W, (sites[:, None] == home).float(), (sites[None, :] >= home[:, None]).float()


@pytest.mark.parametrize("causality", CAUSALITIES)
def test_forward_matches_a_masked_reference_loop(causality: str) -> None:
    cc = _cc(causality)
    x = _x()
    f, x_hat = cc.encode(x), cc(x)
    E, W, read, write = _dense(cc)
    with torch.no_grad():
        pre = cc.b_enc.expand(B, F).clone()
        for s in range(S):  # every site, masked: a latent only hears the sites it reads
            pre += (x[:, s] @ E[s]) * read[s]
        torch.testing.assert_close(f, pre * (pre > cc.threshold))
        for s in range(S):
            ref = cc.b_dec[s] + (f * write[:, s]) @ W[:, s]
            torch.testing.assert_close(x_hat[:, s], ref)


def test_weakly_causal_sites_do_not_reach_earlier_ones() -> None:
    cc = _cc("weakly_causal")
    x = _x()
    base = cc(x)
    for s in range(S):
        bumped = x.clone()
        bumped[:, s] += 3.0 * torch.randn(B, D)
        out = cc(bumped)
        assert torch.equal(out[:, :s], base[:, :s]), s  # earlier sites: bit-identical
        assert not torch.allclose(out[:, s:], base[:, s:])  # its own and later ones do move
        changed = (cc.encode(bumped) != cc.encode(x)).any(0).nonzero().squeeze(-1)
        assert ((changed // N) == s).all()  # only the latents of site s read it


def test_acausal_sites_all_reach_each_other() -> None:
    cc = _cc("acausal")
    x = _x()
    bumped = x.clone()
    bumped[:, -1] += 3.0
    assert not torch.allclose(cc(bumped)[:, 0], cc(x)[:, 0])


@pytest.mark.parametrize("target_l0", [None, 2.0])
@pytest.mark.parametrize("causality", CAUSALITIES)
def test_training_step_matches_hand_computed_gradients(causality: str, target_l0: float | None) -> None:
    cc = _cc(causality, target_l0)
    x = _x()
    warmup = 0.5
    out = cc.training_output(x, warmup)
    sum(out.losses.values()).backward()

    with torch.no_grad():  # the same numbers by hand, dense with masks, without autograd
        E, W, read, write = _dense(cc)
        t, eps, lam = cc.threshold, cc.bandwidth, warmup * cc.sparsity_coefficient
        pre = torch.einsum("bsd,sdf->bf", x, E * read[:, None]) + cc.b_enc
        on = (pre > t).float()
        f = pre * on
        x_hat = torch.einsum("bf,fsd->bsd", f, W * write[..., None]) + cc.b_dec
        mse = (x_hat - x).pow(2).sum((1, 2)).mean()
        n = F if causality == "acausal" else N  # latents sharing one L0 (and one target)
        block_l0 = on.unflatten(1, (F // n, n)).sum(-1)  # [B, blocks]
        if target_l0 is None:
            penalty, dpenalty = block_l0.sum(-1).mean(), torch.full_like(block_l0, 1.0 / B)
        else:
            penalty = ((2 / target_l0) * (block_l0 - target_l0) ** 2).sum(-1).mean()
            dpenalty = (4 / target_l0) * (block_l0 - target_l0) / B  # d penalty / d l0_bk
        g = 2 * (x_hat - x) / B  # d mse / d x_hat
        dW_dense = torch.einsum("bf,bsd->fsd", f, g)
        dW = dW_dense * write[..., None]
        df = torch.einsum("bsd,fsd->bf", g, W * write[..., None])
        dpre = df * on  # no gradient through the jump to pre
        dE_dense = torch.einsum("bsd,bf->sdf", x, dpre)
        dE = dE_dense * read[:, None]
        kernel = rectangle((pre - t) / eps)
        dt = (-(t / eps) * kernel * df).sum(0) \
            + lam * (-(1 / eps) * kernel * dpenalty.repeat_interleave(n, dim=1)).sum(0)

    assert out.losses["mse"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert out.losses["l0_penalty"].item() == pytest.approx((lam * penalty).item(), rel=1e-6)
    assert out.l0.item() == pytest.approx(on.sum(-1).mean().item())
    assert torch.equal(out.fire_counts, on.sum(0).long())
    torch.testing.assert_close(cc.b_dec.grad, g.sum(0))
    torch.testing.assert_close(cc.b_enc.grad, dpre.sum(0))
    torch.testing.assert_close(cc.raw_threshold.grad, dt)
    # The autograd gradients, placed in the dense layout, are the masked hand gradients:
    # the weights outside the structure do not exist, so nothing there can move.
    got_E = torch.zeros_like(E)
    got_W = torch.zeros_like(W)
    if causality == "acausal":
        got_E, got_W = cc.W_enc[0].grad, cc.W_dec[0].grad
    else:
        for l in range(S):
            got_E[l, :, l * N : (l + 1) * N] = cc.W_enc[l].grad[0]
            got_W[l * N : (l + 1) * N, l:] = cc.W_dec[l].grad
        # The check bites: a dense model would have moved the masked weights.
        assert (dE_dense * (1 - read[:, None])).abs().sum() > 0
        assert (dW_dense * (1 - write[..., None])).abs().sum() > 0
    torch.testing.assert_close(got_E, dE)
    torch.testing.assert_close(got_W, dW)
    assert dt.abs().sum() > 0  # some pre-activations fall in the kernel


def test_acausal_is_a_jumprelu_sae_on_the_concatenated_sites() -> None:
    cc = _cc("acausal")
    sae = JumpReLUSAE(S * D, F, sparsity_coefficient=0.3, bandwidth=0.5, fused=False, aux_k=4,
                      threshold_parameterization="raw", subtract_decoder_bias=False)  # cc encodes x itself
    cc.aux_k = 4
    for m in (cc, sae):  # the dead-latent remedies agree too
        m.tokens_since_fired[DEAD] = m.dead_tokens
    with torch.no_grad():
        sae.W_enc.copy_(cc.W_enc[0].flatten(0, 1))
        sae.W_dec.copy_(cc.W_dec[0].flatten(1))
        sae.b_enc.copy_(cc.b_enc)
        sae.b_dec.copy_(cc.b_dec.flatten())
        sae.raw_threshold.copy_(cc.raw_threshold)
    x = _x()
    a, b = cc.training_output(x), sae.training_output(x.flatten(1))
    assert a.losses.keys() == b.losses.keys() and b.losses["aux_k"] > 0
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k])
    sum(a.losses.values()).backward()
    sum(b.losses.values()).backward()
    torch.testing.assert_close(cc.W_enc[0].grad.flatten(0, 1), sae.W_enc.grad)
    torch.testing.assert_close(cc.W_dec[0].grad.flatten(1), sae.W_dec.grad)
    torch.testing.assert_close(cc.raw_threshold.grad, sae.raw_threshold.grad)


@pytest.mark.parametrize("target_l0", [None, 2.0])
def test_weakly_causal_is_a_clt_reconstructing_its_inputs(target_l0: float | None) -> None:
    cc = _cc("weakly_causal", target_l0)
    clt = CrossLayerTranscoder(S, D, F, sparsity_coefficient=0.3, bandwidth=0.5, target_l0=target_l0)
    for m in (cc, clt):  # the remedies too: the CLT's fused step gathers the dead pre-activations itself
        m.tokens_since_fired[DEAD] = m.dead_tokens
    with torch.no_grad():
        clt.W_enc.copy_(torch.cat(list(cc.W_enc)))
        for l in range(S):
            clt.W_dec[l].copy_(cc.W_dec[l])
        clt.b_enc.copy_(cc.b_enc.view(S, N))
        clt.b_dec.copy_(cc.b_dec)
        clt.raw_threshold.copy_(cc.raw_threshold.view(S, N))
    x = _x()
    a, b = cc.training_output(x), clt.training_output(x, 1.0, x)
    assert a.losses.keys() == b.losses.keys() and b.losses["aux_k"] > 0
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k])
    torch.testing.assert_close(a.x_hat, b.x_hat)


@pytest.mark.parametrize("causality", CAUSALITIES)
def test_decoder_stays_unit_norm_over_the_sites_it_writes(causality: str) -> None:
    cc = _cc(causality)
    sum(cc.training_output(_x()).losses.values()).backward()
    cc.before_optimizer_step()
    for W in cc.W_dec:  # no gradient along a latent's own (concatenated) decoder
        assert (W.grad * W).sum((1, 2)).abs().max() < 1e-5
    torch.optim.SGD(cc.parameters(), lr=5.0).step()
    cc.after_optimizer_step()
    for W in cc.W_dec:
        torch.testing.assert_close(W.flatten(1).norm(dim=1), torch.ones(W.shape[0]))
    assert cc.threshold.min() >= 0


@pytest.mark.parametrize("causality", CAUSALITIES)
def test_saved_crosscoder_takes_and_returns_raw_activations_per_site(causality: str, tmp_path) -> None:
    cc = _cc(causality)
    x = _x()
    s = torch.tensor([0.5, 2.0, 3.0])[:, None]
    expected = cc(x) / s  # trained on scaled inputs, reported raw
    loaded = load_sae(save_sae(cc, tmp_path / "cc", s.flatten().tolist(), {"model": "m"}))
    assert isinstance(loaded, Crosscoder) and loaded.causality == causality
    torch.testing.assert_close(loaded(x / s), expected, rtol=1e-5, atol=1e-5)
    assert crosscoder_parameters(S, D, F, causality) == sum(p.numel() for p in cc.parameters())


def test_a_short_fit_on_aligned_shards(tmp_path) -> None:
    first = write_folder(tmp_path / "site0", n_shards=3, rows=128)
    folders = [str(first)] + [str(_sibling(first, tmp_path / f"site{k}", k, f"blocks.{k}.hook_resid_mid"))
                              for k in range(1, 4)]
    pl.seed_everything(0)
    dm = AlignedShardsDataModule(folders, batch_size=32, window_tokens=128)
    module = SAETrainingModule(Crosscoder(4, 8, 32, "weakly_causal"), lr=1e-2, lr_warmup_steps=1,
                               sparsity_warmup_steps=2)
    before = [W.detach().clone() for W in module.sae.W_dec]
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, val_check_interval=4, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4
    # FVU per site and L0 per site's latents, beside the pooled figures.
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert sum(got[f"val/l0_site{j}"] for j in range(4)) == pytest.approx(got["val/l0"], rel=1e-5)
    fvus = [got[f"val/fvu_site{j}"] for j in range(4)]
    assert min(fvus) <= got["val/fvu"] <= max(fvus) and len(set(fvus)) == 4
    assert module.input_scale.shape == (4, 1) and not hasattr(module, "target_scale")
    assert module.input_scale[3, 0] == pytest.approx(dm.input_scale[3]) != module.input_scale[0, 0]
    assert all(not torch.equal(a, b) for a, b in zip(before, module.sae.W_dec))


def test_bad_inputs_name_the_value() -> None:
    with pytest.raises(ValueError, match="causality='strict'"):
        Crosscoder(S, D, F, "strict")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d_sae=16 must be a multiple of n_sites=3"):
        Crosscoder(S, D, 16, "weakly_causal")
    cc = Crosscoder(S, D, F)
    with pytest.raises(ValueError, match=r"n_sites=3.*got shape \[16, 2, 4\]"):
        cc(torch.randn(B, 2, D))
    with pytest.raises(ValueError, match=r"got shape \[16, 12\]"):
        cc(torch.randn(B, S * D))


def test_replacement_takes_the_weakly_causal_form_only() -> None:
    """Replacing every site in one forward pass needs site m's reconstruction to ignore later sites."""
    from gs_lightning.errors import ConfigError
    from gs_lightning.evaluation import ReplacementPart, check_causal

    sites = [f"blocks.{k}.hook_resid_mid" for k in range(S)]
    check_causal(ReplacementPart(_cc("weakly_causal"), sites, sites))
    with pytest.raises(ConfigError, match="acausal"):
        check_causal(ReplacementPart(_cc("acausal"), sites, sites))
