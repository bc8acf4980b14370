"""Skip-transcoders (``x_hat = f @ W_dec + x @ W_skip + b_dec``): the training step against an
autograd reference and the hand-derived skip gradient, scale folding, and exact round trips
through gs_lightning's own format, Gemma Scope 2's layout and SAELens (its own loaders too,
where sae_lens is installed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gs_lightning.errors import ConfigError
from gs_lightning.formats.export import (
    export_gemma_scope,
    export_gemma_scope_2,
    export_saelens,
)
from gs_lightning.formats.io import load_sae, save_sae
from gs_lightning.kernels.functional import jumprelu, step
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE, TopKSAE
from gs_lightning.train.packed import PackedSAE
from gs_lightning.train.parallel import check_supported

D_IN, D_OUT, S, B = 12, 20, 96, 128
LAM, EPS = 1e-2, 0.05


def _skip(fused: bool = True, **kwargs) -> JumpReLUSAE:
    return JumpReLUSAE(D_IN, S, sparsity_coefficient=LAM, bandwidth=EPS, threshold_init=0.05,
                       d_out=D_OUT, skip_connection=True, fused=fused, **kwargs)


def _perturbed(sae: SAE, seed: int = 0) -> SAE:
    """Move every weight off its init (W_skip is zero at first) so that each term is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_skip.copy_(0.3 * torch.randn(sae.W_skip.shape, generator=g))
        sae.b_enc.uniform_(-0.1, 0.1, generator=g)
        sae.b_dec.uniform_(-0.1, 0.1, generator=g)
    return sae


def _pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    # The target: a linear map of x plus a sparse non-linear part (what the latents are for).
    y = x @ torch.randn(D_IN, D_OUT, generator=g) + torch.relu(x @ torch.randn(D_IN, D_OUT, generator=g) - 1.5)
    return x, y


def test_skip_path_starts_at_zero_and_needs_a_transcoder() -> None:
    sae = _skip()
    assert sae.W_skip.shape == (D_IN, D_OUT) and torch.all(sae.W_skip == 0)
    assert "W_skip" in sae.canonical_state_dict() and sae.init_args()["skip_connection"] is True
    assert JumpReLUSAE(D_IN, S, d_out=D_OUT).W_skip is None
    with pytest.raises(ValueError, match="skip_connection needs d_out"):
        JumpReLUSAE(D_IN, S, skip_connection=True)
    x = torch.randn(4, D_IN)
    with pytest.raises(ValueError, match=r"decode\(f, x\)"):
        sae.decode(sae.encode(x))  # a caller that forgets the input fails loudly, not silently wrong


@pytest.mark.parametrize("fused", [True, False])
def test_training_step_matches_an_autograd_reference(fused: bool) -> None:
    torch.manual_seed(0)
    sae = _perturbed(_skip(fused=fused, aux_coefficient=0.0, dead_coefficient=0.0)).train()
    x, y = _pairs(B)
    out = sae.training_output(x, 0.5, target=y)
    assert sae.uses_fused(x) is fused
    sum(out.losses.values()).backward()

    # The reference: the loss written out with the functional pseudo-derivatives.
    ref = {k: v.detach().clone().requires_grad_() for k, v in sae.canonical_state_dict().items()}
    pre = x @ ref["W_enc"] + ref["b_enc"]
    x_hat = jumprelu(pre, ref["threshold"], EPS) @ ref["W_dec"] + x @ ref["W_skip"] + ref["b_dec"]
    mse = (x_hat - y).pow(2).sum(-1).mean()
    l0 = step(pre, ref["threshold"], EPS).sum(-1).mean()
    (mse + 0.5 * LAM * l0).backward()

    torch.testing.assert_close(out.x_hat, x_hat.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.losses["mse"], mse.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["l0_penalty"], 0.5 * LAM * l0.detach(), rtol=1e-5, atol=1e-7)
    grads = {n: p.grad for n, p in sae.named_parameters()}
    grads["threshold"] = grads.pop("raw_threshold")
    for name, p in ref.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # By hand: d mse / d W_skip = x^T 2 (x_hat - y) / B.
    torch.testing.assert_close(grads["W_skip"], x.t() @ (2 * (x_hat.detach() - y) / B), rtol=1e-4, atol=1e-6)


def test_skip_transcoder_learns_a_linear_map_through_the_skip_path() -> None:
    torch.manual_seed(0)
    sae = _skip()
    x, y = _pairs(512)
    y = x @ torch.randn(D_IN, D_OUT, generator=torch.Generator().manual_seed(3))  # purely linear
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        out = sae.training_output(x, 1.0, target=y)
        first = out.losses["mse"].item() if first is None else first
        optimizer.zero_grad()
        sum(out.losses.values()).backward()
        sae.before_optimizer_step()
        optimizer.step()
        sae.after_optimizer_step()
    assert float(out.losses["mse"]) < 0.02 * first
    assert sae.W_skip.norm() > 1.0  # the skip path carries the map


def test_packed_skip_transcoders_take_their_own_fused_steps() -> None:
    torch.manual_seed(0)
    members = [_perturbed(_skip(), seed=k).train() for k in range(2)]
    singles = [_perturbed(_skip(), seed=k).train() for k in range(2)]
    for m, s in zip(members, singles):
        s.load_state_dict(m.state_dict())
    x, y = _pairs(64)
    packed = PackedSAE(members, ["a", "b"])
    for out, single in zip(packed.training_outputs(x, 1.0, y), singles):
        torch.testing.assert_close(out.x_hat, single.training_output(x, 1.0, target=y).x_hat)


def test_latent_parallel_refuses_the_skip_path() -> None:
    sae = _skip(aux_coefficient=0.0, dead_coefficient=0.0)
    with pytest.raises(ConfigError, match="skip path"):
        check_supported(sae)


def test_save_folds_both_scales_into_w_skip(tmp_path: Path) -> None:
    sae = _perturbed(_skip()).eval()
    x = _pairs(32)[0]
    loaded = load_sae(save_sae(sae, tmp_path / "tc", input_scale=2.0, target_scale=0.5))
    assert loaded.W_skip is not None and loaded.d_out == D_OUT
    # Trained on 2 x to reconstruct 0.5 y: the saved one maps raw x to raw y.
    torch.testing.assert_close(loaded(x), sae(2.0 * x) / 0.5, rtol=1e-5, atol=1e-5)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("make", [lambda: _skip(), lambda: ReLUSAE(D_IN, S, d_out=D_OUT, skip_connection=True),
                                  lambda: JumpReLUSAE(D_IN, S, threshold_init=0.05, d_out=D_OUT)],
                         ids=["jumprelu_skip", "relu_skip", "jumprelu_transcoder"])
def test_round_trips_through_every_layout(make, tmp_path: Path) -> None:
    torch.manual_seed(0)
    sae = make()
    if sae.W_skip is not None:
        _perturbed(sae)
    sae.eval()
    x = torch.randn(64, D_IN)
    meta = {"model": "gs-lightning/tiny-gemma2-kjv", "site": "blocks.1.hook_mlp_in",
            "target_site": "blocks.1.hook_mlp_out"}
    paths = [save_sae(sae, tmp_path / "ours", metadata=meta), export_saelens(sae, tmp_path / "saelens", meta)]
    if not isinstance(sae, ReLUSAE):  # Gemma Scope 2 is JumpReLU (a ReLU would be threshold 0)
        paths.append(export_gemma_scope_2(sae, tmp_path / "gs2", layer=1, average_l0=7, metadata=meta))
    for path in paths:
        back = load_sae(path)
        assert (back.W_skip is None) == (sae.W_skip is None) and back.d_out == D_OUT, path
        assert _max_diff(back(x), sae(x)) < 1e-6, path


def test_gemma_scope_2_layout_names(tmp_path: Path) -> None:
    sae = _perturbed(_skip()).eval()
    meta = {"model": "gs-lightning/tiny-gemma2-kjv", "site": "blocks.1.hook_mlp_in",
            "target_site": "blocks.1.hook_mlp_out"}
    path = export_gemma_scope_2(sae, tmp_path, layer=1, average_l0=7.4, metadata=meta)
    assert path.relative_to(tmp_path).as_posix() == "transcoder/layer_1_width_96_l0_7_affine/params.safetensors"
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {"w_enc": (D_IN, S), "w_dec": (S, D_OUT), "b_enc": (S,), "b_dec": (D_OUT,), "threshold": (S,),
                      "affine_skip_connection": (D_IN, D_OUT)}
    config = json.loads((path.parent / "config.json").read_text())
    assert config["architecture"] == "jump_relu" and config["affine_connection"] is True
    assert config["hf_hook_point_in"] == "model.layers.1.pre_feedforward_layernorm.output"
    assert config["hf_hook_point_out"] == "model.layers.1.post_feedforward_layernorm.output"
    with pytest.raises(ConfigError, match="gemma_scope_2"):  # Gemma 2's params.npz has no skip path
        export_gemma_scope(sae, tmp_path, layer=1, average_l0=7)


# -- SAELens' own loaders --------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("skip", [True, False])
def test_saelens_loads_our_folder_as_its_jumprelu_transcoder(skip: bool, tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    sae = (_perturbed(_skip()) if skip else JumpReLUSAE(D_IN, S, threshold_init=0.05, d_out=D_OUT)).eval()
    meta = {"model": "tiny", "site": "blocks.1.hook_mlp_in", "target_site": "blocks.1.hook_mlp_out"}
    theirs = sae_lens.SAE.load_from_disk(str(export_saelens(sae, tmp_path / "saelens", meta)), device="cpu")
    expected = sae_lens.JumpReLUSkipTranscoder if skip else sae_lens.JumpReLUTranscoder
    assert type(theirs) is expected
    x = torch.randn(64, D_IN)
    assert _max_diff(theirs(x), sae(x)) < 1e-5
    assert torch.equal(theirs.encode(x) != 0, sae.encode(x) != 0)


@pytest.mark.peer
def test_saelens_loads_a_relu_skip_transcoder(tmp_path: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    sae = _perturbed(ReLUSAE(D_IN, S, d_out=D_OUT, skip_connection=True)).eval()
    theirs = sae_lens.SAE.load_from_disk(str(export_saelens(sae, tmp_path / "saelens")), device="cpu")
    assert type(theirs) is sae_lens.SkipTranscoder
    x = torch.randn(64, D_IN)
    assert _max_diff(theirs(x), sae(x)) < 1e-5


@pytest.mark.peer
def test_saelens_gemma_scope_2_loader_reads_our_release(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("sae_lens")
    from sae_lens import SAE as SAELensSAE
    from sae_lens.loading import pretrained_sae_loaders as loaders

    sae = _perturbed(_skip()).eval()
    meta = {"model": "gemma-3-270m", "site": "blocks.1.hook_mlp_in", "target_site": "blocks.1.hook_mlp_out"}
    path = export_gemma_scope_2(sae, tmp_path, layer=1, average_l0=7, metadata=meta)
    folder = path.parent.relative_to(tmp_path).as_posix()

    # The hub, served from tmp_path: SAELens' own gemma_3 loader then reads our files.
    def download(repo_id: str, filename: str, subfolder: str | None = None, **_: object) -> str:
        return str(tmp_path / subfolder / filename if subfolder else tmp_path / filename)

    def shapes(repo_id: str, filename: str) -> dict[str, list[int]]:
        with safe_open(str(tmp_path / filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    monkeypatch.setattr(loaders, "hf_hub_download", download)
    monkeypatch.setattr(loaders, "get_safetensors_tensor_shapes", shapes)

    def converter(_path: str, device: str, cfg_overrides: dict | None = None):
        cfg, state, _ = loaders.gemma_3_sae_huggingface_loader("google/gemma-scope-2-270m-pt", folder, device)
        return cfg, state

    theirs = SAELensSAE.load_from_disk(str(path.parent), device="cpu", converter=converter)
    assert type(theirs).__name__ == "JumpReLUSkipTranscoder" and theirs.cfg.d_out == D_OUT
    x = torch.randn(64, D_IN)
    assert _max_diff(theirs(x), sae(x)) < 1e-5


def test_other_variants_take_the_skip_path_too() -> None:
    sae = TopKSAE(D_IN, S, k=6, d_out=D_OUT, skip_connection=True)
    x, y = _pairs(32)
    out = sae.training_output(x, 1.0, target=y)
    sum(out.losses.values()).backward()
    assert sae.W_skip.grad is not None and sae.W_skip.grad.abs().sum() > 0


def test_export_command_writes_the_gemma_scope_2_layout(tmp_path: Path) -> None:
    from gs_lightning.formats.export import export

    sae = _perturbed(_skip()).eval()
    meta = {"model": "tiny", "site": "blocks.1.hook_mlp_in", "target_site": "blocks.1.hook_mlp_out",
            "final_metrics": {"val/l0": 11.6}}
    saved = save_sae(sae, tmp_path / "run" / "sae", metadata=meta)
    [written] = export(str(saved), "gemma_scope_2", str(tmp_path / "release"))
    assert written == tmp_path / "release/transcoder/layer_1_width_96_l0_12_affine/params.safetensors"
    x = torch.randn(16, D_IN)
    assert _max_diff(load_sae(written.parent)(x), sae(x)) < 1e-6
