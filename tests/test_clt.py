"""CrossLayerTranscoder: forward and training step against hand-written references, the
fused step against autograd, the one-layer case against a JumpReLU transcoder, saving with
per-layer scales, memory, and a kill-and-resume fit on aligned shards."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gs_lightning.data import AlignedShardsDataModule
from gs_lightning.formats.io import load_sae, save_sae
from gs_lightning.kernels.functional import rectangle
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.saes.clt import CrossLayerTranscoder, clt_memory
from gs_lightning.train.module import SAETrainingModule
from tests.test_aligned import _sibling
from tests.test_shards import write_folder

L, D, N, B = 3, 4, 5, 16


def _clt(target_l0: float | None = None, seed: int = 0, fused: bool = True) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(L, D, L * N, sparsity_coefficient=0.3, bandwidth=0.5, target_l0=target_l0,
                               fused=fused)
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3)
        clt.b_dec.normal_(0, 0.3)
        clt.raw_threshold.uniform_(0.1, 0.6)
    return clt


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, D, generator=g), torch.randn(B, L, D, generator=g)


def test_forward_is_the_sum_over_source_layers() -> None:
    clt = _clt()
    x, _ = _data()
    f = clt.encode(x)
    assert f.shape == (B, L * N)
    y = clt.decode(f)
    for l in range(L):
        pre = x[:, l] @ clt.W_enc[l] + clt.b_enc[l]
        torch.testing.assert_close(f[:, l * N : (l + 1) * N], pre * (pre > clt.threshold[l]))
    for m in range(L):
        ref = clt.b_dec[m] + sum(f[:, l * N : (l + 1) * N] @ clt.W_dec[l][:, m - l] for l in range(m + 1))
        torch.testing.assert_close(y[:, m], ref)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("target_l0", [None, 2.0])
def test_training_step_matches_hand_computed_gradients(target_l0: float | None, fused: bool) -> None:
    clt = _clt(target_l0, fused=fused)
    x, y = _data()
    warmup = 0.5
    assert clt.uses_fused(x) == fused
    out = clt.training_output(x, warmup, y)
    sum(out.losses.values()).backward()

    with torch.no_grad():  # the same numbers by hand, without autograd
        W_enc, b_enc, t, b_dec = clt.W_enc, clt.b_enc, clt.threshold, clt.b_dec
        eps, lam = clt.bandwidth, warmup * clt.sparsity_coefficient
        pre = torch.stack([x[:, l] @ W_enc[l] + b_enc[l] for l in range(L)], 1)  # [B, L, N]
        on = (pre > t).float()
        f = pre * on
        y_hat = torch.stack([b_dec[m] + sum(f[:, l] @ clt.W_dec[l][:, m - l] for l in range(m + 1))
                             for m in range(L)], 1)
        mse = (y_hat - y).pow(2).sum((1, 2)).mean()
        layer_l0 = on.sum(-1)
        if target_l0 is None:
            penalty, dpenalty = layer_l0.sum(-1).mean(), torch.full_like(layer_l0, 1.0 / B)
        else:
            penalty = ((2 / target_l0) * (layer_l0 - target_l0) ** 2).sum(-1).mean()
            dpenalty = (4 / target_l0) * (layer_l0 - target_l0) / B  # d penalty / d l0_bl
        g = 2 * (y_hat - y) / B  # d mse / d y_hat
        dW_dec = [torch.einsum("bn,bkd->nkd", f[:, l], g[:, l:]) for l in range(L)]
        df = torch.stack([torch.einsum("bkd,nkd->bn", g[:, l:], clt.W_dec[l]) for l in range(L)], 1)
        kernel = rectangle((pre - t) / eps)
        dpre = df * on  # no gradient through the jump to pre
        dt = (-(t / eps) * kernel * df).sum(0) + lam * (-(1 / eps) * kernel * dpenalty[..., None]).sum(0)
        dW_enc = torch.einsum("bld,bln->ldn", x, dpre)

    assert out.losses["mse"].item() == pytest.approx(mse.item(), rel=1e-6)
    assert out.losses["l0_penalty"].item() == pytest.approx((lam * penalty).item(), rel=1e-6)
    assert out.l0.item() == pytest.approx(layer_l0.sum(-1).mean().item())
    assert torch.equal(out.fire_counts, on.flatten(1).sum(0).long())
    torch.testing.assert_close(clt.b_dec.grad, g.sum(0))
    for l in range(L):
        torch.testing.assert_close(clt.W_dec[l].grad, dW_dec[l])
    torch.testing.assert_close(clt.W_enc.grad, dW_enc)
    torch.testing.assert_close(clt.b_enc.grad, dpre.sum(0))
    torch.testing.assert_close(clt.raw_threshold.grad, dt)
    assert dt.abs().sum() > 0  # some pre-activations fall in the kernel: the check bites


def _step(clt: CrossLayerTranscoder, x: torch.Tensor, y: torch.Tensor) -> tuple:
    out = clt.training_output(x, 0.7, y)
    sum(out.losses.values()).backward()
    return out, {k: p.grad for k, p in clt.named_parameters()}


DEAD = torch.tensor([1, 3, 2 * N, 2 * N + 4])  # latents of layers 0 and 2 held dead


def _kill(clt: CrossLayerTranscoder) -> None:
    clt.tokens_since_fired[DEAD] = clt.dead_tokens


@pytest.mark.parametrize("target_l0,dead", [(None, False), (2.0, False), (None, True)])
def test_fused_step_equals_autograd(target_l0: float | None, dead: bool) -> None:
    fused, plain = _clt(target_l0), _clt(target_l0, fused=False)
    if dead:  # the remedies: the fused path gathers the dead pre-activations itself
        _kill(fused), _kill(plain)
    x, y = _data()
    with torch.no_grad():  # every latent's threshold within the kernel of some token's pre-activation
        pre = fused.pre_activation(x)
        # Offsets 0.21 .. 0.01 from a pre-activation: inside eps/2 = 0.25, never a tie.
        near = pre[torch.arange(N) % B, :, torch.arange(N)].t() + (torch.arange(N) - 1.9) * 0.1
        for clt in (fused, plain):
            clt.raw_threshold.copy_(near.clamp(min=0.01))
    (a, ga), (b, gb) = _step(fused, x, y), _step(plain, x, y)
    assert fused.uses_fused(x) and not plain.uses_fused(x)
    assert a.losses.keys() == b.losses.keys() == {"mse", "l0_penalty", "dead_pre_act", "aux_k"}
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k])
    assert (a.losses["aux_k"] > 0) == dead
    torch.testing.assert_close(a.x_hat, b.x_hat.detach())
    assert not a.x_hat.requires_grad and a.x_hat.shape == (B, L, D)
    assert a.fire_counts.dtype == b.fire_counts.dtype and torch.equal(a.fire_counts, b.fire_counts)
    assert a.l0.item() == pytest.approx(b.l0.item())
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], msg=k)
    kernel = ((pre - fused.threshold).abs() < 0.25).sum(0)
    assert (kernel > 0).all() and ga["raw_threshold"].abs().min() > 0  # the pseudo-derivative bites everywhere


def test_dead_latent_remedies_against_brute_force() -> None:
    """Dead latents' pre-activation loss and AuxK by hand: each dead latent's decoder spans
    the layers it writes, zero before its own."""
    clt = _clt()
    clt.aux_k = 3
    _kill(clt)
    x, y = _data()
    out = clt.training_output(x, 1.0, y)
    with torch.no_grad():
        pre = torch.stack([x[:, l] @ clt.W_enc[l] + clt.b_enc[l] for l in range(L)], 1).flatten(1)[:, DEAD]
        gap = (clt.threshold.flatten()[DEAD] - pre).relu().sum(-1).mean()
        rows = []
        for i in DEAD.tolist():
            l, j = divmod(i, N)
            row = torch.zeros(L, D)
            row[l:] = clt.W_dec[l][j]
            rows.append(row.flatten())
        top = pre.topk(3, -1)
        f_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        residual = (y - out.x_hat).flatten(1)
        aux = (f_aux @ torch.stack(rows) - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["dead_pre_act"], clt.dead_coefficient * gap)
    torch.testing.assert_close(out.losses["aux_k"], clt.aux_coefficient * aux)
    assert gap > 0 and aux > 0
    out.losses["aux_k"].backward()  # AuxK trains the dead latents' encoders and decoders only
    assert clt.W_dec[0].grad[1].abs().sum() > 0 and clt.W_dec[0].grad[0].abs().sum() == 0
    assert clt.W_dec[1].grad is None or clt.W_dec[1].grad.abs().sum() == 0


def test_firing_resets_the_dead_counters() -> None:
    clt = _clt()
    x, y = _data()
    counts = clt.training_output(x, 1.0, y).fire_counts
    assert torch.equal(clt.tokens_since_fired == 0, counts > 0) and (clt.tokens_since_fired[counts == 0] == B).all()


def test_fused_step_under_bf16_autocast_keeps_fp32_threshold() -> None:
    clt = _clt()
    ref = copy.deepcopy(clt)
    x, y = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = clt.training_output(x, 1.0, y)
    sum(out.losses.values()).backward()
    exp = ref.training_output(x, 1.0, y)
    sum(exp.losses.values()).backward()
    assert clt.raw_threshold.grad.dtype == torch.float32 and clt.W_enc.grad.dtype == torch.float32
    assert out.x_hat.dtype == torch.float32 and torch.equal(out.fire_counts, exp.fire_counts)
    torch.testing.assert_close(out.losses["mse"], exp.losses["mse"], rtol=2e-2, atol=2e-2)
    for W, W_ref in zip(clt.W_dec, ref.W_dec):
        torch.testing.assert_close(W.grad, W_ref.grad, rtol=5e-2, atol=5e-2)


def test_fused_backward_refuses_overwritten_workspace() -> None:
    clt = _clt()
    x, y = _data()
    first = clt.training_output(x, 1.0, y)
    clt.training_output(x, 1.0, y)
    with pytest.raises(RuntimeError, match="reused the workspace"):
        sum(first.losses.values()).backward()


def test_fused_step_only_while_training_with_grad() -> None:
    clt = _clt()
    x, y = _data()
    assert not clt.uses_fused(x.requires_grad_())
    with torch.no_grad():
        assert not clt.uses_fused(x.detach())
    clt.training_output(x.detach(), 1.0, y)
    clt.eval()
    assert not clt.uses_fused(x.detach()) and not clt._workspace._buffers  # buffers given back


def test_saved_clt_without_fused_arg_loads(tmp_path) -> None:
    path = save_sae(_clt(), tmp_path / "clt", 1.0, {"model": "m"})
    config = json.loads((path / "config.json").read_text())
    assert config["init_args"].pop("fused") is True
    (path / "config.json").write_text(json.dumps(config))  # as saved before the fused step existed
    loaded = load_sae(path)
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.fused
    assert "_workspace" not in str(list(loaded.state_dict()))


def test_one_layer_is_a_jumprelu_transcoder() -> None:
    clt = CrossLayerTranscoder(1, D, N, sparsity_coefficient=0.3, bandwidth=0.5, d_out=3, aux_k=2)
    sae = JumpReLUSAE(D, N, sparsity_coefficient=0.3, bandwidth=0.5, d_out=3, fused=False, aux_k=2)
    for m in (clt, sae):  # the dead-latent remedies too
        m.tokens_since_fired[[1, 3]] = m.dead_tokens
    with torch.no_grad():
        sae.W_enc.copy_(clt.W_enc[0])
        sae.W_dec.copy_(clt.W_dec[0][:, 0])
        clt.raw_threshold.uniform_(0.0, 0.5)
        sae.raw_threshold.copy_(clt.raw_threshold[0])
    x, y = torch.randn(B, D), torch.randn(B, 3)
    a, b = clt.training_output(x[:, None], 1.0, y[:, None]), sae.training_output(x, 1.0, y)
    assert a.losses.keys() == b.losses.keys() and b.losses["aux_k"] > 0
    for k in a.losses:
        torch.testing.assert_close(a.losses[k], b.losses[k])
    sum(a.losses.values()).backward()
    sum(b.losses.values()).backward()
    torch.testing.assert_close(clt.W_enc.grad[0], sae.W_enc.grad)
    torch.testing.assert_close(clt.W_dec[0].grad[:, 0], sae.W_dec.grad)
    torch.testing.assert_close(clt.raw_threshold.grad[0], sae.raw_threshold.grad)


def test_decoder_stays_unit_norm_over_the_layers_it_writes() -> None:
    clt = _clt()
    x, y = _data()
    sum(clt.training_output(x, 1.0, y).losses.values()).backward()
    clt.before_optimizer_step()
    for W in clt.W_dec:  # no gradient along a latent's own (concatenated) decoder
        assert (W.grad * W).sum((1, 2)).abs().max() < 1e-5
    torch.optim.SGD(clt.parameters(), lr=5.0).step()
    clt.after_optimizer_step()
    for W in clt.W_dec:
        torch.testing.assert_close(W.flatten(1).norm(dim=1), torch.ones(N))
    assert clt.threshold.min() >= 0


def test_saved_clt_takes_raw_activations_per_layer(tmp_path) -> None:
    clt = _clt()
    x, _ = _data()
    s, t = [0.5, 2.0, 3.0], [4.0, 0.25, 1.5]
    raw_in = x / torch.tensor(s)[:, None]
    expected = clt(x) / torch.tensor(t)[:, None]  # trained on scaled inputs, reported raw
    loaded = load_sae(save_sae(clt, tmp_path / "clt", s, {"model": "m"}, t))
    assert isinstance(loaded, CrossLayerTranscoder)
    torch.testing.assert_close(loaded(raw_in), expected, rtol=1e-5, atol=1e-5)
    assert clt_memory(L, D, L * N).parameters == sum(p.numel() for p in clt.parameters())


def test_memory_grows_with_the_decoder_pairs() -> None:
    m = clt_memory(26, 2304, 26 * 16384)
    assert m.decoder_pairs == 351
    assert m.parameters == 26 * 2304 * 16384 + 351 * 16384 * 2304 + 26 * 16384 * 2 + 26 * 2304
    assert m.ratio_to_per_layer == pytest.approx((1 + 351 / 26) / 2, rel=1e-3)
    assert m.training_bytes == 16 * m.parameters  # fp32 weights, grads and two Adam moments


def _fit(folders: list[str], root: Path, steps: int, ckpt: str | None = None) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    dm = AlignedShardsDataModule(folders[:2], folders[2:], batch_size=64, window_tokens=256)
    module = SAETrainingModule(CrossLayerTranscoder(2, 8, 32), lr=1e-2, lr_warmup_steps=3, sparsity_warmup_steps=5)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, default_root_dir=root,
                         callbacks=[ModelCheckpoint(dirpath=root, every_n_train_steps=7, save_top_k=-1)],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    assert module.input_scale.shape == (2, 1)
    assert module.input_scale[1, 0] == pytest.approx(dm.input_scale[1]) and module.input_scale[1, 0] != module.input_scale[0, 0]
    return {k: v.clone() for k, v in module.sae.state_dict().items()}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kill_and_resume_fit_is_bit_exact(tmp_path) -> None:
    first = write_folder(tmp_path / "site0", n_shards=6, rows=128)
    folders = [str(first)] + [str(_sibling(first, tmp_path / f"site{k}", k, f"blocks.{k}.hook_mlp_out"))
                              for k in range(1, 4)]
    full = _fit(folders, tmp_path / "full", 17)
    _fit(folders, tmp_path / "killed", 7)
    resumed = _fit(folders, tmp_path / "resumed", 17, ckpt=str(tmp_path / "killed" / "epoch=0-step=7.ckpt"))
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_validation_reports_fvu_per_site_and_l0_per_layer(tmp_path) -> None:
    first = write_folder(tmp_path / "site0", n_shards=6, rows=128)
    folders = [str(first)] + [str(_sibling(first, tmp_path / f"site{k}", k, f"blocks.{k}.hook_mlp_out"))
                              for k in range(1, 4)]
    pl.seed_everything(0)
    dm = AlignedShardsDataModule(folders[:2], folders[2:], batch_size=64, window_tokens=256)
    module = SAETrainingModule(CrossLayerTranscoder(2, 8, 32, sparsity_coefficient=0.0), lr=1e-2,
                               lr_warmup_steps=1, sparsity_warmup_steps=1)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=6, check_val_every_n_epoch=None)
    trainer.fit(module, datamodule=dm)
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    with torch.no_grad():  # brute force over the whole validation set, in raw units
        pairs = [dm.finish_batch(b) for b in dm.val_dataloader()]
        x = torch.cat([b[0] for b in pairs]).float()
        y = torch.cat([b[1] for b in pairs]).float()
        f = module.sae.encode(x * module.input_scale.float())
        y_hat = module.sae.decode(f) / module.target_scale.float()
    for j in range(2):
        fvu = (y[:, j] - y_hat[:, j]).pow(2).sum() / (y[:, j] - y[:, j].mean(0)).pow(2).sum()
        assert got[f"val/fvu_site{j}"] == pytest.approx(float(fvu), rel=1e-4)
        l0 = (f[:, j * 16 : (j + 1) * 16] != 0).sum(-1).float().mean()
        assert got[f"val/l0_site{j}"] == pytest.approx(float(l0), rel=1e-5) and 0 < float(l0) < 16
    assert got["val/l0_site0"] + got["val/l0_site1"] == pytest.approx(got["val/l0"], rel=1e-5)
    assert got["val/fvu_site0"] != pytest.approx(got["val/fvu_site1"], rel=1e-3)


def test_a_packed_sweep_of_a_clt_is_refused_with_the_way_out() -> None:
    from gs_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="CrossLayerTranscoder stacks 3 sites.*gs_lightning sweep"):
        SAETrainingModule(_clt(), sweep={"sparsity_coefficient": [1e-3, 1e-2]})
