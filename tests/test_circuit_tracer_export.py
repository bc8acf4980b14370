"""circuit-tracer's CLT folder: an exact round trip through gs_lightning, circuit-tracer's own
``load_clt`` computing what we compute (where circuit_tracer is installed), the ``export``
command, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gs_lightning.errors import ConfigError
from gs_lightning.formats.circuit_tracer import (
    export_circuit_tracer,
    load_circuit_tracer,
)
from gs_lightning.formats.export import export
from gs_lightning.formats.io import load_sae, save_sae
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.saes.clt import CrossLayerTranscoder

L, D, N, B = 3, 8, 5, 32
META = {"model": "gs-lightning/tiny-gemma2-kjv", "input_sites": [f"blocks.{l}.hook_resid_mid" for l in range(L)],
        "target_sites": [f"blocks.{l}.hook_mlp_out" for l in range(L)], "final_metrics": {"val/l0": 4.0}}


def _clt() -> CrossLayerTranscoder:
    """Thresholds of latents 0, 1, 2 of every layer at, just under and just over their
    pre-activation on a zero input (b_enc), so a ``>=`` or an off-by-one-ulp cast would show."""
    torch.manual_seed(0)
    clt = CrossLayerTranscoder(L, D, L * N, bandwidth=0.5, target_l0=2.0)
    with torch.no_grad():
        clt.b_enc.uniform_(0.2, 0.5)
        clt.b_dec.normal_(0, 0.3)
        clt.raw_threshold.uniform_(0.1, 0.6)
        b = clt.b_enc
        clt.raw_threshold[:, 0] = b[:, 0]
        clt.raw_threshold[:, 1] = torch.nextafter(b[:, 1], torch.tensor(-1.0))
        clt.raw_threshold[:, 2] = torch.nextafter(b[:, 2], torch.tensor(1.0))
    return clt.eval()


def _inputs() -> torch.Tensor:
    """Zero rows (pre-activation exactly b_enc), then random ones, the last large enough that
    some latent fires on it."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.zeros(2, L, D), torch.randn(B, L, D, generator=g)])
    x[-1] *= 4
    return x


def test_zero_inputs_sit_on_the_thresholds() -> None:
    clt = _clt()
    f = clt.encode(torch.zeros(1, L, D)).unflatten(-1, (L, N))[0]
    assert torch.all(f[:, 0] == 0) and torch.equal(f[:, 1], clt.b_enc[:, 1]) and torch.all(f[:, 2] == 0)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    clt, x = _clt(), _inputs()
    folder = export_circuit_tracer(clt, tmp_path / "clt", META)
    assert sorted(p.name for p in folder.iterdir()) == [
        f"W_{k}_{i}.safetensors" for k in ("dec", "enc") for i in range(L)] + ["config.yaml"]
    with safe_open(str(folder / "W_enc_1.safetensors"), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == {  # noqa: SIM118 (not a dict)
            "W_enc_1": (N, D), "b_enc_1": (N,), "b_dec_1": (D,), "threshold_1": (N,)}
        assert torch.equal(f.get_tensor("W_enc_1"), clt.W_enc[1].t())  # circuit-tracer's [n, d]
    assert load_file(str(folder / "W_dec_1.safetensors"))["W_dec_1"].shape == (N, L - 1, D)
    for back in (load_circuit_tracer(folder), load_sae(folder)):
        assert isinstance(back, CrossLayerTranscoder) and back.init_args() == clt.init_args()
        theirs = back.canonical_state_dict()
        assert set(theirs) == set(clt.canonical_state_dict())
        for key, value in clt.canonical_state_dict().items():
            assert torch.equal(theirs[key], value), key
        f = back.encode(x)
        assert torch.equal(f, clt.encode(x)) and torch.equal(back.decode(f), clt.decode(f))


def test_config_names_the_model_and_the_hooks(tmp_path: Path) -> None:
    config = yaml.safe_load((export_circuit_tracer(_clt(), tmp_path / "clt", META) / "config.yaml").read_text())
    assert {k: config[k] for k in ("model_kind", "model_name", "feature_input_hook", "feature_output_hook")} == {
        "model_kind": "cross_layer_transcoder", "model_name": META["model"],
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}
    assert config["gs_lightning"]["input_sites"] == META["input_sites"]


@pytest.mark.peer
def test_circuit_tracer_computes_what_we_compute(tmp_path: Path) -> None:
    pytest.importorskip("circuit_tracer", reason="circuit-tracer is not installed (pip install circuit-tracer)")
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    clt, x = _clt(), _inputs()
    folder = export_circuit_tracer(clt, tmp_path / "clt", META)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder"  # what its cache and Hub loaders check
    # As its cache loader calls it, in float32 (its default is bfloat16) and lazy decoders.
    theirs = load_clt(str(folder), feature_input_hook=config["feature_input_hook"],
                      feature_output_hook=config["feature_output_hook"], device=torch.device("cpu"),
                      dtype=torch.float32)
    assert (theirs.n_layers, theirs.d_transcoder, theirs.d_model) == (L, N, D)
    with torch.no_grad():
        f = clt.encode(x).unflatten(-1, (L, N)).transpose(0, 1)  # circuit-tracer's [L, batch, n]
        y = clt.decode(clt.encode(x)).transpose(0, 1)
        xs = x.transpose(0, 1)
        assert (f[:, -1] != 0).any()  # its decode sizes the output by the last position with a latent
        f_theirs = theirs.encode(xs)
        parts = theirs.compute_attribution_components(xs, zero_positions=slice(0, 0))  # attribution's path
        for name, a in [("encode", f_theirs), ("encode_sparse", parts["activation_matrix"].to_dense())]:
            assert torch.equal(a != 0, f != 0), name  # the same latents fire, thresholds included
            torch.testing.assert_close(a, f, rtol=0, atol=1e-5, msg=name)
        for name, a in [("decode", theirs.decode(f_theirs)), ("reconstruction", parts["reconstruction"])]:
            torch.testing.assert_close(a, y, rtol=0, atol=1e-5, msg=name)


def test_export_command_writes_the_folder(tmp_path: Path) -> None:
    from gs_lightning.cli import main

    clt = _clt()
    saved = save_sae(clt, tmp_path / "run" / "sae", [0.5, 2.0, 3.0], META, [4.0, 0.25, 1.5])
    [written] = main(["export", "--sae", str(saved), "--format", "circuit_tracer", "--out", str(tmp_path / "ct")])
    assert written == tmp_path / "ct" and (written / "W_dec_2.safetensors").is_file()
    raw = load_sae(saved)  # the scales folded in: raw activations in and out
    back = load_sae(written)
    for key, value in raw.canonical_state_dict().items():
        assert torch.equal(back.canonical_state_dict()[key], value), key


def test_formats_refuse_the_other_kind(tmp_path: Path) -> None:
    clt_path = save_sae(_clt(), tmp_path / "clt", metadata=META)
    sae_path = save_sae(JumpReLUSAE(D, 16), tmp_path / "sae", metadata={"site": "blocks.1.hook_resid_post"})
    with pytest.raises(ConfigError, match=rf"{sae_path}: a JumpReLUSAE cannot be written as circuit_tracer"):
        export(str(sae_path), "circuit_tracer", str(tmp_path / "out"))
    for fmt in ("saelens", "gemma_scope", "gemma_scope_2"):
        with pytest.raises(ConfigError, match=rf"{clt_path}: a CrossLayerTranscoder .* use --format circuit_tracer"):
            export(str(clt_path), fmt, str(tmp_path / "out"), layer=0, average_l0=4)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="one width"):
        export_circuit_tracer(CrossLayerTranscoder(L, D, L * N, d_out=4), tmp_path / "x")
    shifted = {**META, "input_sites": [f"blocks.{l + 1}.hook_resid_mid" for l in range(L)]}
    with pytest.raises(ConfigError, match=r"input_sites: circuit-tracer reads layer l at blocks"):
        export_circuit_tracer(_clt(), tmp_path / "x", shifted)


def test_broken_folders_are_named(tmp_path: Path) -> None:
    folder = export_circuit_tracer(_clt(), tmp_path / "clt", META)
    enc = load_file(str(folder / "W_enc_1.safetensors"))
    save_file({k: v for k, v in enc.items() if k != "b_enc_1"}, str(folder / "W_enc_1.safetensors"))
    with pytest.raises(ConfigError, match=r"W_enc_1.safetensors: no tensor 'b_enc_1'"):
        load_sae(folder)
    save_file(enc, str(folder / "W_enc_1.safetensors"))
    save_file({"W_dec_2": torch.zeros(N, 2, D)}, str(folder / "W_dec_2.safetensors"))
    with pytest.raises(ConfigError, match=r"W_dec_2.safetensors: W_dec_2 has shape \[5, 2, 8\], expected \[5, 1, 8\]"):
        load_circuit_tracer(folder)
    (folder / "W_dec_2.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"W_dec_2.safetensors is missing"):
        load_circuit_tracer(folder)
    with pytest.raises(ConfigError, match=r"W_enc_0.safetensors is missing"):
        load_circuit_tracer(tmp_path)


def test_a_folder_without_thresholds_is_a_relu_clt(tmp_path: Path) -> None:
    clt = _clt()
    folder = export_circuit_tracer(clt, tmp_path / "clt")
    for i in range(L):  # as circuit-tracer writes a ReLU CLT
        file = str(folder / f"W_enc_{i}.safetensors")
        save_file({k: v for k, v in load_file(file).items() if not k.startswith("threshold")}, file)
    back = load_circuit_tracer(folder)
    x = _inputs()
    pre = torch.einsum("bld,ldn->bln", x, clt.W_enc) + clt.b_enc
    assert torch.equal(back.encode(x), torch.relu(pre).flatten(1))
