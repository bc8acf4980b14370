"""Gemma Scope and SAELens export/import: exact round trips, a hand-written release file,
and clear refusals for pickles, missing keys, wrong shapes and other architectures."""

import json

import numpy as np
import pytest
import torch

from gs_lightning.errors import ConfigError
from gs_lightning.formats.export import (
    export_gemma_scope,
    export_saelens,
    load_gemma_scope,
    load_saelens,
    width_label,
)
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE


def _trained_like_jumprelu(d_in: int = 16, d_sae: int = 64) -> JumpReLUSAE:
    torch.manual_seed(0)
    sae = JumpReLUSAE(d_in, d_sae, threshold_parameterization="log")
    with torch.no_grad():
        sae.b_enc.uniform_(-0.2, 0.2)
        sae.b_dec.uniform_(-0.5, 0.5)
        sae.log_threshold.copy_(torch.empty(d_sae).uniform_(-3, -1))
    return sae.eval()


def _numpy_jumprelu(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference Gemma Scope JumpReLU in numpy: (features, reconstruction)."""
    pre = x @ params["W_enc"] + params["b_enc"]
    f = pre * (pre > params["threshold"])
    return f, f @ params["W_dec"] + params["b_dec"]


def test_width_labels_follow_the_release() -> None:
    assert [width_label(w) for w in (16384, 65536, 131072, 262144, 524288, 1 << 20)] == \
        ["16k", "65k", "131k", "262k", "524k", "1m"]


def test_gemma_scope_round_trip_is_exact(tmp_path) -> None:
    sae = _trained_like_jumprelu()
    path = export_gemma_scope(sae, tmp_path, layer=12, average_l0=54.24)
    assert path.relative_to(tmp_path).as_posix() == "layer_12/width_64/average_l0_54/params.npz"
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        assert all(npz[k].dtype == np.float32 for k in npz.files)
        assert npz["W_enc"].shape == (16, 64) and npz["W_dec"].shape == (64, 16)
    loaded = load_gemma_scope(path)
    for key, value in sae.canonical_state_dict().items():
        assert torch.equal(loaded.canonical_state_dict()[key], value), key
    x = torch.randn(10, 16)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_release_path_for_a_16k_sae(tmp_path) -> None:
    sae = JumpReLUSAE(8, 16384)
    path = export_gemma_scope(sae, tmp_path, layer=3, average_l0=71.6)
    assert path.relative_to(tmp_path).as_posix() == "layer_3/width_16k/average_l0_72/params.npz"


def test_hand_written_release_file_encodes_like_numpy_reference(tmp_path) -> None:
    rng = np.random.default_rng(0)
    d, d_sae = 12, 40
    params = {
        "W_enc": rng.normal(size=(d, d_sae)).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
        "b_dec": rng.normal(size=d).astype(np.float32),
        "threshold": rng.uniform(0.5, 1.5, size=d_sae).astype(np.float32),
    }
    np.savez(tmp_path / "params.npz", **params)
    sae = load_gemma_scope(tmp_path / "params.npz")
    x = rng.normal(size=(30, d)).astype(np.float32) * 2
    f_ref, x_hat_ref = _numpy_jumprelu(params, x)
    assert (f_ref != 0).any() and (f_ref == 0).any()
    np.testing.assert_allclose(sae.encode(torch.from_numpy(x)).detach().numpy(), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(torch.from_numpy(x)).detach().numpy(), x_hat_ref, rtol=1e-5, atol=1e-4)


def test_relu_sae_exports_as_zero_threshold_jumprelu(tmp_path) -> None:
    torch.manual_seed(0)
    sae = ReLUSAE(16, 48).eval()
    loaded = load_gemma_scope(export_gemma_scope(sae, tmp_path, layer=0, average_l0=10))
    x = torch.randn(20, 16)
    torch.testing.assert_close(loaded(x), sae(x))
    assert torch.all(loaded.threshold == 0)


def test_variant_that_is_not_a_jumprelu_is_refused(tmp_path) -> None:
    class TopOne(SAE):
        def activation(self, pre):
            return pre * (pre == pre.max(-1, keepdim=True).values)

    with pytest.raises(ConfigError, match="cannot be written as a JumpReLU"):
        export_gemma_scope(TopOne(4, 8), tmp_path, layer=0, average_l0=1)
    with pytest.raises(ConfigError, match="cannot be written as a JumpReLU"):
        export_saelens(TopOne(4, 8), tmp_path / "x")


def test_pickled_object_arrays_are_refused(tmp_path) -> None:
    arrays = {k: np.zeros((2, 2), dtype=np.float32) for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    arrays["threshold"] = np.array([{"evil": 1}, None], dtype=object)
    np.savez(tmp_path / "params.npz", **arrays)
    with pytest.raises(ConfigError, match="pickled"):
        load_gemma_scope(tmp_path / "params.npz")


def test_missing_keys_and_wrong_shapes_are_named(tmp_path) -> None:
    good = {"W_enc": np.zeros((4, 8), np.float32), "W_dec": np.zeros((8, 4), np.float32),
            "b_enc": np.zeros(8, np.float32), "b_dec": np.zeros(4, np.float32),
            "threshold": np.zeros(8, np.float32)}
    np.savez(tmp_path / "a.npz", **{k: v for k, v in good.items() if k != "threshold"})
    with pytest.raises(ConfigError, match=r"missing keys \['threshold'\]"):
        load_gemma_scope(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", **{**good, "W_dec": np.zeros((4, 8), np.float32)})
    with pytest.raises(ConfigError, match=r"W_dec has shape \[4, 8\], expected \[8, 4\]"):
        load_gemma_scope(tmp_path / "b.npz")
    with pytest.raises(ConfigError, match="no such file"):
        load_gemma_scope(tmp_path / "nope.npz")


@pytest.mark.parametrize("make", [_trained_like_jumprelu, lambda: ReLUSAE(16, 64).eval()])
def test_saelens_round_trip_is_exact(tmp_path, make) -> None:
    sae = make()
    meta = {"model": "gs-lightning/tiny-gemma2-kjv", "site": "blocks.1.hook_resid_post", "context_size": 128,
            "text": "kjv"}
    density = torch.rand(sae.d_sae)
    path = export_saelens(sae, tmp_path / "sae", meta, feature_density=density)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == ("standard" if isinstance(sae, ReLUSAE) else "jumprelu")
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["metadata"]["hook_layer"] == 1
    assert cfg["apply_b_dec_to_input"] is False and cfg["normalize_activations"] == "none"
    assert (path / "sparsity.safetensors").is_file()
    loaded = load_saelens(path)
    assert type(loaded) is type(sae)
    x = torch.randn(10, 16)
    assert torch.equal(loaded(x), sae(x))


def test_saelens_b_dec_subtraction_is_folded_into_b_enc(tmp_path) -> None:
    sae = _trained_like_jumprelu()
    path = export_saelens(sae, tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["apply_b_dec_to_input"] = True  # as SAELens' own standard SAEs are saved
    (path / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_saelens(path)
    x = torch.randn(10, 16)
    b_enc = sae.canonical_state_dict()["b_enc"]  # what the file holds
    pre = (x - sae.b_dec) @ sae.W_enc + b_enc  # what SAELens computes
    torch.testing.assert_close(loaded.pre_activation(x), pre, rtol=1e-5, atol=1e-5)


def test_saelens_bad_configs_are_named(tmp_path) -> None:
    path = export_saelens(_trained_like_jumprelu(), tmp_path / "sae")
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ConfigError, match="architecture 'gated' is not supported"):
        load_saelens(path)
    (path / "cfg.json").write_text(json.dumps({**cfg, "d_in": 99}))
    with pytest.raises(ConfigError, match="d_in=99"):
        load_saelens(path)
    (path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "expected_average_only_in"}))
    with pytest.raises(ConfigError, match="normalize_activations"):
        load_saelens(path)
    with pytest.raises(ConfigError, match="cfg.json is missing"):
        load_saelens(tmp_path)


def test_export_saved_sae_uses_its_metadata(tmp_path) -> None:
    from gs_lightning.formats.export import export
    from gs_lightning.formats.io import save_sae

    sae = _trained_like_jumprelu()
    meta = {"model": "m", "site": "blocks.7.hook_mlp_out", "context_size": 128, "text": "kjv",
            "final_metrics": {"val/l0": 41.6, "train/l0": 40.0}}
    saved = save_sae(sae, tmp_path / "run" / "sae", input_scale=0.5, metadata=meta)
    [path] = export(str(saved), "gemma_scope", str(tmp_path / "release"))
    assert path.relative_to(tmp_path / "release").as_posix() == "layer_7/width_64/average_l0_42/params.npz"
    x = torch.randn(5, 16)
    # Scale folded: the release reads raw activations exactly as the trained SAE read scaled ones.
    torch.testing.assert_close(load_gemma_scope(path).encode(x), sae.encode(0.5 * x), rtol=1e-5, atol=1e-6)
    [lens] = export(str(saved), "saelens", str(tmp_path / "lens"))
    assert json.loads((lens / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.7.hook_mlp_out"
    bare = save_sae(sae, tmp_path / "bare")
    with pytest.raises(ConfigError, match="--layer and --average_l0"):
        export(str(bare), "gemma_scope", str(tmp_path / "r2"))
