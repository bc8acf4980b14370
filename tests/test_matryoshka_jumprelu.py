"""Matryoshka JumpReLU: the prefix losses against hand-computed values, how they combine with
the L0 and dead-latent terms, gradients against an autograd reference, and the skip path."""

from __future__ import annotations

import pytest
import torch

from gs_lightning.kernels.functional import jumprelu, step
from gs_lightning.saes import JumpReLUSAE, MatryoshkaJumpReLUSAE


def _tiny(**kwargs) -> MatryoshkaJumpReLUSAE:
    """d_in 2, three latents, thresholds 0.5: small enough to do by hand."""
    sae = MatryoshkaJumpReLUSAE(2, 3, prefixes=[1, 2], sparsity_coefficient=0.1, bandwidth=0.1, threshold_init=0.5,
                                subtract_decoder_bias=False, **kwargs)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    return sae.train()


X = torch.tensor([[1.0, 2.0], [0.2, 1.0]])


def test_prefix_losses_match_hand_computed_values() -> None:
    out = _tiny().training_output(X, warmup=1.0)
    # pre = [[1, 2, 3], [0.2, 1, 1.2]]; with thresholds 0.5, f = [[1, 2, 3], [0, 1, 1.2]].
    # Full:     x_hat = [[4.5, 4.5], [1.7, 1.7]]  -> errors^2 18.5, 2.74  -> mean 10.62
    # Prefix 1: x_hat = [[1.5, -.5], [0.5, -.5]]  -> errors^2 6.5, 2.34   -> mean 4.42
    # Prefix 2: x_hat = [[1.5, 1.5], [0.5, 0.5]]  -> errors^2 0.5, 0.34   -> mean 0.42
    # L0 per token 3 and 2: mean 2.5, times lambda 0.1, once (not per prefix).
    expected = {"mse": 10.62, "mse_prefix_1": 4.42, "mse_prefix_2": 0.42, "l0_penalty": 0.25,
                "dead_pre_act": 0.0, "aux_k": 0.0}
    assert set(out.losses) == set(expected)
    for name, value in expected.items():
        assert out.losses[name].item() == pytest.approx(value, abs=1e-5), name
    assert out.l0.item() == pytest.approx(2.5)


def test_l0_and_dead_terms_are_the_plain_jumprelus() -> None:
    """The sparsity and dead-latent terms are computed once, on the full dictionary: with the
    prefix terms removed, the loss is exactly JumpReLU's."""
    torch.manual_seed(0)
    mat = MatryoshkaJumpReLUSAE(8, 32, prefixes=[4, 16], threshold_init=0.05, bandwidth=0.05)
    plain = JumpReLUSAE(8, 32, threshold_init=0.05, bandwidth=0.05, fused=False)
    plain.load_state_dict(mat.state_dict())
    mat.tokens_since_fired[20:] = plain.tokens_since_fired[20:] = mat.dead_tokens  # some dead latents
    x = torch.randn(64, 8)
    a, b = mat.training_output(x, 0.7), plain.training_output(x, 0.7)
    assert set(a.losses) - set(b.losses) == {"mse_prefix_4", "mse_prefix_16"}
    assert b.losses["aux_k"] > 0 and b.losses["dead_pre_act"] > 0
    for name, value in b.losses.items():
        torch.testing.assert_close(a.losses[name], value, msg=name)


def test_gradients_match_an_autograd_reference() -> None:
    torch.manual_seed(0)
    sae = MatryoshkaJumpReLUSAE(8, 32, prefixes=[4, 16], threshold_init=0.05, bandwidth=0.2, sparsity_coefficient=0.3,
                                aux_coefficient=0.0, dead_coefficient=0.0)
    x = torch.randn(64, 8)
    sum(sae.training_output(x, 1.0).losses.values()).backward()
    ref = {k: v.detach().clone().requires_grad_() for k, v in sae.named_parameters()}
    ref["threshold"] = ref.pop("raw_threshold")
    assert sae.subtract_decoder_bias  # the default: the encoder reads x - b_dec
    pre = (x - ref["b_dec"]) @ ref["W_enc"] + ref["b_enc"]
    f = jumprelu(pre, ref["threshold"], 0.2)
    loss = 0.3 * step(pre, ref["threshold"], 0.2).sum(-1).mean()
    for m in (4, 16, 32):
        loss = loss + (f[:, :m] @ ref["W_dec"][:m] + ref["b_dec"] - x).pow(2).sum(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in sae.named_parameters()}
    grads["threshold"] = grads.pop("raw_threshold")
    assert ref["threshold"].grad.abs().sum() > 0  # the bandwidth reaches some thresholds
    for name, p in ref.items():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_every_prefix_of_a_skip_transcoder_includes_the_skip_path() -> None:
    torch.manual_seed(0)
    sae = MatryoshkaJumpReLUSAE(8, 32, prefixes=[4, 16], threshold_init=0.05, d_out=6, skip_connection=True)
    with torch.no_grad():
        sae.W_skip.normal_()
    x, y = torch.randn(16, 8), torch.randn(16, 6)
    out = sae.training_output(x, 1.0, target=y)
    f = sae.encode(x)
    for m in (4, 16):
        x_hat_m = f[:, :m] @ sae.W_dec[:m] + x @ sae.W_skip + sae.b_dec
        torch.testing.assert_close(out.losses[f"mse_prefix_{m}"], (x_hat_m - y).pow(2).sum(-1).mean())


def test_prefixes_are_checked_and_the_fused_step_is_off() -> None:
    for prefixes in ([], [8, 8], [24, 8], [0, 8], [8, 32]):
        with pytest.raises(ValueError, match="prefixes"):
            MatryoshkaJumpReLUSAE(8, 32, prefixes=prefixes)
    sae = MatryoshkaJumpReLUSAE(8, 32, prefixes=[8])
    assert not sae.uses_fused(torch.randn(4, 8)) and sae.init_args()["prefixes"] == [8]
