"""The TopK family with the recipe options JumpReLU has (gs_lightning.saes.recipe): the encoder
reading ``x - b_dec``, bias learning rates and the normalised gradient."""

from __future__ import annotations

import pytest
import torch

from gs_lightning.formats.io import load_sae, save_sae
from gs_lightning.saes import BatchTopKSAE, MatryoshkaBatchTopKSAE, TopKSAE
from gs_lightning.train.module import param_groups

FAMILY = {
    "topk": lambda **kw: TopKSAE(16, 64, k=4, **kw),
    "batchtopk": lambda **kw: BatchTopKSAE(16, 64, k=4, **kw),
    "matryoshka": lambda **kw: MatryoshkaBatchTopKSAE(16, 64, k=4, prefixes=[8, 32], **kw),
}


def _trained(make, **kwargs):
    """An SAE of ``make`` after a few Adam steps on shifted data, so b_dec and b_enc are not zero."""
    torch.manual_seed(0)
    sae = make(**kwargs)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(256, 16) + 2.0
    for _ in range(5):
        opt.zero_grad()
        sum(sae.training_output(x).losses.values()).backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return sae.eval(), x


@pytest.mark.parametrize("free", [False, True], ids=["unit_decoder", "free_decoder"])
@pytest.mark.parametrize("family", list(FAMILY))
def test_subtracted_decoder_bias_saves_folded_and_loads_back(family: str, free: bool, tmp_path) -> None:
    make = FAMILY[family]
    options = {"normalize_decoder": not free}
    sae, x = _trained(make, subtract_decoder_bias=True, **options)
    assert float(sae.b_dec.detach().abs().sum()) > 0
    norms = sae.W_dec.norm(dim=1) if free else 1.0
    torch.testing.assert_close(sae.pre_activation(x), ((x - sae.b_dec) @ sae.W_enc + sae.b_enc) * norms)
    # Saved, b_dec @ W_enc is folded into b_enc: a plain SAE of the family encodes alike.
    folded = sae.canonical_state_dict()
    assert "b_dec_subtracted" not in folded
    torch.testing.assert_close(folded["b_enc"], (sae.b_enc - sae.b_dec @ sae.W_enc) * norms)
    torch.testing.assert_close(folded["W_dec"].norm(dim=1), torch.ones(64))  # the normalised form
    assert not free or not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    plain = make().eval()
    plain.load_canonical_state_dict(folded)
    torch.testing.assert_close(plain.encode(x), sae.encode(x))
    # Our loader rebuilds the option and unfolds b_enc, the input scale folded in as well.
    loaded = load_sae(save_sae(sae, tmp_path / "sae", input_scale=0.5)).eval()
    assert loaded.subtract_decoder_bias
    torch.testing.assert_close(loaded.b_enc, sae.b_enc * norms, rtol=1e-5, atol=1e-6)  # saved normalised
    torch.testing.assert_close(loaded.encode(x / 0.5), sae.encode(x), rtol=1e-5, atol=1e-5)
    # A checkpoint in the other form is converted on load.
    other = make(subtract_decoder_bias=False, **options).eval()
    other.load_state_dict(sae.state_dict())
    torch.testing.assert_close(other.pre_activation(x), sae.pre_activation(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILY))
def test_bias_lr_and_normalised_gradient(family: str) -> None:
    make = FAMILY[family]
    sae = make(bias_lr_scale=None, normalize_gradient=True)
    assert sae.lr_scales() == {"b_enc": 0.25, "b_dec": 0.25}  # 1 / sqrt(16)
    groups = param_groups(sae, 1e-3)
    assert sorted(g["lr"] for g in groups) == pytest.approx([2.5e-4, 1e-3])
    x = torch.randn(64, 16) + 1.0
    sum(sae.training_output(x).losses.values()).backward()
    sae.before_optimizer_step()
    scales = sae.lr_scales()
    norm = sum((scales.get(n, 1.0) * p.grad.norm()) ** 2 for n, p in sae.named_parameters() if p.grad is not None)
    assert float(norm) == pytest.approx(1.0, rel=1e-5)


def test_transcoder_cannot_subtract_decoder_bias() -> None:
    with pytest.raises(ValueError, match="transcoder"):
        TopKSAE(16, 64, k=4, d_out=8, subtract_decoder_bias=True)
    assert not TopKSAE(16, 64, k=4, d_out=8, subtract_decoder_bias=None).subtract_decoder_bias


@pytest.mark.parametrize("family", list(FAMILY))
def test_free_decoder_is_read_as_normalised(family: str) -> None:
    """SAELens' rescale_acts_by_decoder_norm: rows start at decoder_init_norm (the encoder at
    their transpose), move freely, and decode along their directions with ``pre * ||d||``."""
    sae = FAMILY[family](normalize_decoder=False, decoder_init_norm=0.1, subtract_decoder_bias=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((64,), 0.1))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    trained, x = _trained(FAMILY[family], normalize_decoder=False, subtract_decoder_bias=True)
    trained.train()
    norms = trained.W_dec.detach().norm(dim=1)
    assert float((norms - 0.1).abs().max()) > 1e-3  # free: Adam moved the rows' norms
    out = trained.training_output(x)
    f = trained.activation(trained.pre_activation(x))
    torch.testing.assert_close(out.x_hat, f @ (trained.W_dec / norms[:, None]) + trained.b_dec)
    torch.testing.assert_close(trained.pre_activation(x), (x - trained.b_dec) @ trained.W_enc * norms
                               + trained.b_enc * norms)
