"""Packed sweeps: K SAEs per read train exactly as K separate runs would, each with its own
lr, clipping, metrics and saved folder; the batched fused JumpReLU step against the single one."""

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch import Tensor

from callbacks import FinalSummary
from gs_lightning.cli import main
from gs_lightning.data import SyntheticActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.formats.io import load_sae, load_sae_config
from gs_lightning.kernels.fused import (
    Workspace,
    fused_jumprelu_loss,
    fused_packed_jumprelu_loss,
)
from gs_lightning.saes import SAE, JumpReLUSAE, MatryoshkaJumpReLUSAE, ReLUSAE, TopKSAE
from gs_lightning.train.module import SAETrainingModule
from gs_lightning.train.packed import PackedSAE

D, S = 16, 64


def _data(n_tokens: int = 8192, batch_size: int = 256) -> SyntheticActivationDataModule:
    return SyntheticActivationDataModule(d_in=D, n_features=48, active_features=3, n_tokens=n_tokens,
                                         batch_size=batch_size, val_fraction=0.0)


def _fit(module: SAETrainingModule, steps: int, data=None, **trainer_args) -> pl.Trainer:
    args = dict(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer = pl.Trainer(**{**args, **trainer_args})
    trainer.fit(module, datamodule=data or _data())
    return trainer


def test_packed_fused_step_equals_single_fused_steps() -> None:
    torch.manual_seed(0)
    K, B = 3, 40
    x = torch.randn(B, D)
    saes = [JumpReLUSAE(D, S, sparsity_coefficient=0.1 * (k + 1), bandwidth=0.05 * (k + 1), threshold_init=0.2,
                        threshold_parameterization=("log", "raw", "log")[k], subtract_decoder_bias=k == 1)
            for k in range(K)]
    for sae in saes:
        with torch.no_grad():  # distinct, asymmetric weights so every term is exercised
            sae.b_enc.uniform_(-0.2, 0.2)
            sae.b_dec.uniform_(-0.1, 0.1)
            sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))
    reference = [copy.deepcopy(s) for s in saes]
    packed = PackedSAE(saes, ["a", "b", "c"]).train()
    outs = packed.training_outputs(x, warmup=0.6)
    sum(sum(o.losses.values()) for o in outs).backward()
    for sae, ref, out in zip(saes, reference, outs):
        expected = ref.train().training_output(x, warmup=0.6)
        sum(expected.losses.values()).backward()
        for key in ("mse", "l0_penalty"):
            torch.testing.assert_close(out.losses[key], expected.losses[key])
        torch.testing.assert_close(out.x_hat, expected.x_hat)
        assert torch.equal(out.fire_counts, expected.fire_counts) and out.l0 > 0
        for (name, p), q in zip(sae.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
        threshold = sae.log_threshold if sae.threshold_parameterization == "log" else sae.raw_threshold
        assert threshold.grad.abs().sum() > 0


def test_packed_fused_function_is_a_batch_of_single_calls() -> None:
    torch.manual_seed(1)
    K, B = 2, 32
    x = torch.randn(B, D)
    tensors = [torch.randn(K, D, S), torch.randn(K, S) * 0.1, torch.randn(K, S, D) / 4, torch.randn(K, D) * 0.1,
               torch.rand(K, S) * 0.5]
    bandwidth = torch.tensor([0.1, 0.3])
    packed = fused_packed_jumprelu_loss(x, *tensors, bandwidth, Workspace(), token_l0=True)
    for k in range(K):
        single = fused_jumprelu_loss(x, *(t[k] for t in tensors), float(bandwidth[k]), Workspace(), token_l0=True)
        for a, b in zip((out[k] for out in packed), single):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("K, member", [(1, 0), (3, 1)])
def test_single_fused_step_is_a_packed_member(K: int, member: int) -> None:
    """Values and gradients (weights, biases, threshold) of the single step on SAE k equal
    member k's of the packed step on the same inputs."""
    torch.manual_seed(3)
    B = 48
    x = torch.randn(B, D)
    stacked = [torch.randn(K, D, S), torch.randn(K, S) * 0.1, torch.randn(K, S, D) / 4, torch.randn(K, D) * 0.1,
               torch.rand(K, S) * 0.5]
    bandwidth = torch.tensor([0.1, 0.3, 0.2][:K])

    def loss(mse: Tensor, counts: Tensor, tokens: Tensor) -> Tensor:  # every output carries a gradient
        return mse.sum() + 1e-2 * counts.pow(2).sum() + 1e-2 * tokens.pow(2).sum()

    packed_params = [t.clone().requires_grad_() for t in stacked]
    packed = fused_packed_jumprelu_loss(x, *packed_params, bandwidth, Workspace(), token_l0=True)
    loss(*packed[:3]).backward()
    single_params = [t[member].clone().requires_grad_() for t in stacked]
    single = fused_jumprelu_loss(x, *single_params, float(bandwidth[member]), Workspace(), token_l0=True)
    loss(*single[:3]).backward()
    for name, a, b in zip(("mse", "fire_counts", "token_l0", "x_hat"), (out[member] for out in packed), single):
        torch.testing.assert_close(a, b, msg=name)
    for name, p, q in zip(("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), packed_params, single_params):
        assert q.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad[member], q.grad, msg=name)


def test_packed_fused_step_under_bf16_autocast_matches_the_single_step() -> None:
    torch.manual_seed(2)
    x = torch.randn(32, D)
    saes = [JumpReLUSAE(D, S, sparsity_coefficient=c, threshold_init=0.1, threshold_parameterization="raw")
            for c in (0.1, 0.3)]
    reference = [copy.deepcopy(s).train() for s in saes]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = PackedSAE(saes, ["a", "b"]).train().training_outputs(x)
        expected = [ref.training_output(x) for ref in reference]
    sum(sum(o.losses.values()) for o in outs + expected).backward()
    for sae, ref, out, exp in zip(saes, reference, outs, expected):
        torch.testing.assert_close(out.losses["mse"], exp.losses["mse"], rtol=1e-2, atol=1e-3)
        assert sae.raw_threshold.grad.dtype == torch.float32 and sae.W_enc.grad.dtype == torch.float32
        torch.testing.assert_close(sae.W_dec.grad, ref.W_dec.grad, rtol=2e-2, atol=2e-3)


def _members(module: SAETrainingModule) -> list[SAE]:
    return [sae for _, sae in module.named_saes()]


CASES = {
    # variant, template, sweep (differing lr in each), packed path
    "jumprelu": (JumpReLUSAE(D, S, threshold_parameterization="raw", threshold_init=0.05),
                 {"sparsity_coefficient": [1e-3, 1e-2, 3e-2], "lr": [2e-3, 5e-3, 1e-2]}),
    "topk": (TopKSAE(D, S, k=4, aux_k=8, dead_steps_threshold=5), {"k": [2, 6], "lr": [3e-3, 1e-2]}),
    "relu": (ReLUSAE(D, S), {"sparsity_coefficient": [0.1, 1.0], "seed": [1, 2], "lr": [1e-3, 4e-3]}),
    # Gemma Scope 2's dictionaries: no batched kernel, each member takes its own step on the shared read.
    "matryoshka_jumprelu": (MatryoshkaJumpReLUSAE(D, S, prefixes=[16, 32], threshold_init=0.05),
                            {"sparsity_coefficient": [1e-3, 1e-2], "lr": [2e-3, 5e-3]}),
}


class _Pairs(pl.LightningDataModule):
    """(input, target) batches of a synthetic transcoder: the target a fixed nonlinear map of the input."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4096, D, generator=g)
        self.pairs = list(zip(x.split(256), torch.relu(x @ torch.randn(D, D, generator=g)).split(256)))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.pairs, batch_size=None)


SKIP_CASE = (JumpReLUSAE(D, S, d_out=D, skip_connection=True, threshold_init=0.05),
             {"sparsity_coefficient": [1e-3, 1e-2], "lr": [2e-3, 5e-3]})


@pytest.mark.parametrize("case", [*CASES, "skip_transcoder"])
def test_packed_training_equals_separate_training(case: str) -> None:
    template, sweep = SKIP_CASE if case == "skip_transcoder" else CASES[case]
    data = _Pairs if case == "skip_transcoder" else _data
    hp = dict(lr_warmup_steps=5, sparsity_warmup_steps=10, gradient_clip_norm=0.5)
    pl.seed_everything(0)
    packed = SAETrainingModule(template, sweep=sweep, **hp)
    initial = [copy.deepcopy(sae) for sae in _members(packed)]
    _fit(packed, 30, data())
    for sae, start, lr in zip(_members(packed), initial, sweep["lr"]):
        alone = SAETrainingModule(copy.deepcopy(start), lr=lr, **hp)
        _fit(alone, 30, data())
        moved = sum((p - q).abs().sum() for p, q in zip(sae.parameters(), start.parameters()))
        assert moved > 0.1  # trained, not a copy of the start
        for (name, p), q in zip(sae.state_dict().items(), alone.sae.state_dict().values()):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=f"{case} {name}")


def test_packed_jumprelu_takes_the_batched_fused_path(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(JumpReLUSAE, "training_output", lambda *a, **k: calls.append(a))
    packed = PackedSAE([JumpReLUSAE(D, S), JumpReLUSAE(D, S)], ["a", "b"]).train()
    outs = packed.training_outputs(torch.randn(8, D))
    assert not calls and len(outs) == 2


class _GradNorms(pl.Callback):
    """Each SAE's gradient norm as the optimizer saw it (grads are zeroed only before the next step)."""

    def __init__(self) -> None:
        self.norms: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.norms.append([float(torch.cat([p.grad.flatten() for p in sae.parameters()]).norm())
                           for sae in _members(pl_module)])


def _grad_norms(clip: float | None, trainer_clip: float | None) -> list[float]:
    pl.seed_everything(0)
    # lambda 0 against lambda 30: the second SAE's gradient is far larger than the first's.
    module = SAETrainingModule(ReLUSAE(D, S), sparsity_warmup_steps=0, gradient_clip_norm=clip,
                               sweep={"sparsity_coefficient": [0.0, 30.0]})
    recorder = _GradNorms()
    _fit(module, 1, callbacks=[recorder], gradient_clip_val=trainer_clip)
    return recorder.norms[0]


def test_per_sae_clipping_differs_from_global_clipping() -> None:
    small, large = _grad_norms(None, None)
    assert large > 10 * small
    clip = (small * large) ** 0.5
    per_sae = _grad_norms(clip, None)
    torch.testing.assert_close(per_sae, [small, clip], rtol=1e-4, atol=0)  # only the large one is clipped
    global_ = _grad_norms(None, clip)
    # Clipping the concatenation scales both down, the small gradient included.
    assert global_[0] < 0.5 * small
    torch.testing.assert_close((global_[0] ** 2 + global_[1] ** 2) ** 0.5, clip, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_sweep_logs_per_sae_metrics_and_l0_falls_as_lambda_rises(capsys) -> None:
    pl.seed_everything(0)
    data = SyntheticActivationDataModule(d_in=32, n_features=128, active_features=4, n_tokens=16384,
                                         batch_size=512)
    sweep = {"sparsity_coefficient": [1e-4, 3e-3, 3e-2]}
    module = SAETrainingModule(JumpReLUSAE(32, 256, threshold_parameterization="raw"), lr=3e-3,
                               lr_warmup_steps=10, sparsity_warmup_steps=50, sweep=sweep)
    trainer = _fit(module, 100, data, limit_val_batches=None, callbacks=[FinalSummary()])
    names = [f"sparsity_coefficient={c}" for c in sweep["sparsity_coefficient"]]
    metrics = trainer.callback_metrics
    for name in names:
        for key in ("train/l0", "train/fvu", "train/mse", "train/loss", "train/lr", "train/lambda",
                    "train/dead_frac", "train/dense_frac", "val/l0", "val/fvu", "val/mse", "val/never_fire_frac",
                    "val/dense_frac"):
            assert f"{key}/{name}" in metrics, f"{key}/{name}"
    assert "val/l0" not in metrics and "train/l0" not in metrics
    l0s = [float(metrics[f"val/l0/{name}"]) for name in names]
    assert l0s[0] > l0s[1] > l0s[2], l0s
    assert l0s[2] < 0.5 * l0s[0], l0s
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final (step 100): val/l0")]
    assert [line.rsplit(" [", 1)[-1] for line in lines] == [f"{name}]" for name in names]
    # Never-firing and dense fractions are pooled over the whole validation set.
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]  # on the final weights
    x = torch.cat(list(data.val_dataloader())) * module.input_scale.float()
    for name, sae in module.named_saes():
        density = (sae.eval().encode(x) != 0).float().mean(0)
        assert float(metrics[f"val/never_fire_frac/{name}"]) == pytest.approx(float((density == 0).float().mean()))
        assert float(metrics[f"val/dense_frac/{name}"]) == pytest.approx(float((density > 0.1).float().mean()))
    assert float(metrics[f"val/never_fire_frac/{names[-1]}"]) > float(metrics[f"val/never_fire_frac/{names[0]}"])


def test_bad_sweeps_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="bandwith"):
        SAETrainingModule(JumpReLUSAE(D, S), sweep={"bandwith": [0.1, 0.2]})
    with pytest.raises(ConfigError, match="equal length"):
        SAETrainingModule(JumpReLUSAE(D, S), sweep={"sparsity_coefficient": [0.1, 0.2], "lr": [1e-3]})
    with pytest.raises(ConfigError, match="unique"):
        SAETrainingModule(JumpReLUSAE(D, S), sweep={"sparsity_coefficient": [0.1, 0.1]})
    with pytest.raises(ConfigError, match="k must be"):
        SAETrainingModule(TopKSAE(D, S, k=4), sweep={"k": [4, 1000]})


def test_members_share_an_init_unless_seeds_are_swept() -> None:
    torch.manual_seed(0)
    same = _members(SAETrainingModule(JumpReLUSAE(D, S), sweep={"sparsity_coefficient": [0.1, 0.2]}))
    assert torch.equal(same[0].W_dec, same[1].W_dec)
    seeded = _members(SAETrainingModule(JumpReLUSAE(D, S), sweep={"seed": [3, 4]}))
    assert not torch.equal(seeded[0].W_dec, seeded[1].W_dec)
    torch.manual_seed(3)
    torch.testing.assert_close(seeded[0].W_dec, JumpReLUSAE(D, S).W_dec, rtol=0, atol=0)


def test_cli_trains_a_packed_sweep_from_yaml(tmp_path: Path, capsys) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 40, "accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp_path / "run"),
                    "val_check_interval": 20, "check_val_every_n_epoch": None, "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "callbacks": [{"class_path": "callbacks.SaveSAE"}, {"class_path": "callbacks.FinalSummary"}]},
        "model": {"sae": {"class_path": "gs_lightning.saes.JumpReLUSAE",
                          "init_args": {"d_in": 32, "d_sae": 128, "threshold_parameterization": "raw"}},
                  "lr": 2e-3, "lr_warmup_steps": 10, "sparsity_warmup_steps": 20,
                  "sweep": {"sparsity_coefficient": [1e-4, 1e-3, 1e-2]}},
        "data": {"class_path": "gs_lightning.data.SyntheticActivationDataModule",
                 "init_args": {"d_in": 32, "n_features": 64, "active_features": 3, "n_tokens": 8192,
                               "batch_size": 256}},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    out = capsys.readouterr().out
    saved = sorted(p.parent for p in (tmp_path / "run").rglob("sae/sae.safetensors"))
    assert [p.parent.name for p in saved] == [f"sparsity_coefficient={c}" for c in (1e-4, 1e-3, 1e-2)]
    for folder, coefficient in zip(saved, (1e-4, 1e-3, 1e-2)):
        sae = load_sae(folder)
        assert isinstance(sae, JumpReLUSAE) and sae.sparsity_coefficient == coefficient
        meta = load_sae_config(folder)["metadata"]
        assert meta["sweep_member"] == folder.parent.name and meta["global_step"] == 40
        assert 0 < meta["final_metrics"]["val/fvu"] < 1 and meta["final_metrics"]["val/l0"] > 0
        assert f"saved SAE to {folder}" in out and f"[{folder.parent.name}]" in out


def test_sweep_checkpoint_restores_every_member(tmp_path: Path) -> None:
    pl.seed_everything(0)
    sweep = {"sparsity_coefficient": [1e-3, 1e-2], "lr": [1e-3, 3e-3]}
    module = SAETrainingModule(JumpReLUSAE(D, S), lr_warmup_steps=2, sweep=sweep)
    trainer = _fit(module, 5)
    trainer.save_checkpoint(tmp_path / "sweep.ckpt")
    restored = SAETrainingModule.load_from_checkpoint(tmp_path / "sweep.ckpt", sae=JumpReLUSAE(D, S))
    assert restored.hparams.sweep == sweep and restored.sae.names == module.sae.names
    for a, b in zip(_members(module), _members(restored)):
        for p, q in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(p, q)
    assert torch.equal(restored.tokens_since_fired, module.tokens_since_fired)
