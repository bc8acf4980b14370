"""JumpReLU's sparsity and dictionary-health terms: target L0, dense penalty, dead-latent loss.

Each term is checked against a value computed by hand, and its fused gradient against
autograd through :func:`gs_lightning.kernels.functional.step` (single and packed steps).
"""

import copy

import pytest
import torch

from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.packed import PackedSAE

D, S = 16, 64


def _sae(fused: bool = True, **kwargs) -> JumpReLUSAE:
    torch.manual_seed(0)
    args = dict(sparsity_coefficient=0.1, bandwidth=0.2, threshold_init=0.05, threshold_parameterization="raw",
                encoder_init_scale=1.0)
    sae = JumpReLUSAE(D, S, fused=fused, **{**args, **kwargs}).train()
    with torch.no_grad():  # spread the thresholds so some latents are near them, some not
        sae.raw_threshold.uniform_(0.0, 0.5)
        sae.b_enc.uniform_(-0.1, 0.1)
    return sae


def _tiny() -> JumpReLUSAE:
    """d_in 2, d_sae 3, identity-like encoder: pre = [x0, x1, x0 + x1], thresholds 0.5."""
    sae = JumpReLUSAE(2, 3, sparsity_coefficient=2.0, threshold_init=0.5, threshold_parameterization="raw",
                      encoder_init_scale=1.0, target_l0=2.0, fused=False)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    return sae


def test_quadratic_target_l0_penalty_equals_the_formula() -> None:
    sae = _tiny()
    # Token L0s: [1, 1] -> pre [1, 1, 2] -> 3 active; [1, 0] -> [1, 0, 1] -> 2; [0, 0] -> 0.
    x = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    out = sae.training_output(x, warmup=0.5)
    l0 = torch.tensor([3.0, 2.0, 0.0])
    expected = 0.5 * 2.0 * ((2 / 2.0) * (l0 - 2.0) ** 2).mean()  # warmup * lambda * mean (2/T)(l0-T)^2
    torch.testing.assert_close(out.losses["l0_penalty"], expected)
    assert out.l0.item() == pytest.approx(5 / 3)


@pytest.mark.parametrize("fused", [False, True])
def test_batch_mean_target_penalty_equals_the_formula(fused: bool) -> None:
    sae = _tiny()
    sae.target_per_token, sae.fused = False, fused
    x = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    out = sae.training_output(x, warmup=0.5)
    # mean L0 5/3: warmup * lambda * (2/T)(mean_b l0_b - T)^2, not the per-token mean above.
    torch.testing.assert_close(out.losses["l0_penalty"], torch.tensor(0.5 * 2.0 * (2 / 2.0) * (5 / 3 - 2.0) ** 2))


def test_mean_l0_penalty_without_a_target() -> None:
    sae = _tiny()
    sae.target_l0 = None
    out = sae.training_output(torch.tensor([[1.0, 1.0], [1.0, 0.0]]), warmup=1.0)
    torch.testing.assert_close(out.losses["l0_penalty"], torch.tensor(2.0 * 2.5))


def test_target_l0_pushes_thresholds_towards_the_target() -> None:
    """Above the target the penalty raises thresholds (negative gradient on -t means
    positive step); below it the penalty lowers them."""
    for start, sign in ((0.01, -1.0), (5.0, 1.0)):  # low thresholds: L0 too high; high: too low
        sae = _sae(fused=False, target_l0=8.0, bandwidth=20.0)
        with torch.no_grad():
            sae.raw_threshold.fill_(start)
        x = torch.randn(64, D)
        out = sae.training_output(x)
        out.losses["l0_penalty"].backward()
        assert (out.l0.item() - 8.0) * -sign > 0  # the start is on the side we meant
        assert torch.all(sae.raw_threshold.grad * sign >= 0) and sae.raw_threshold.grad.abs().sum() > 0


def test_dense_penalty_acts_only_on_dense_latents() -> None:
    sae = _sae(fused=False, dense_coefficient=1.0, dense_threshold=0.3, bandwidth=1.0)
    x = torch.randn(256, D)
    out = sae.training_output(x, warmup=1.0)
    frequency = out.fire_counts / 256
    excess = (frequency - 0.3).clamp(min=0).sum()
    torch.testing.assert_close(out.losses["dense_penalty"], excess)
    out.losses["dense_penalty"].backward()
    dense = frequency > 0.3
    assert dense.any() and (~dense).any()
    assert torch.all(sae.raw_threshold.grad[~dense] == 0)
    assert torch.all(sae.raw_threshold.grad[dense] <= 0) and sae.raw_threshold.grad[dense].sum() < 0


@pytest.mark.parametrize("pull_encoder", [False, True])
def test_dead_latents_are_counted_and_pulled_back(pull_encoder: bool) -> None:
    sae = _sae(fused=True, dead_coefficient=1.0, dead_tokens=100, dead_pull_encoder=pull_encoder)
    with torch.no_grad():
        sae.raw_threshold[:4] = 100.0  # latents 0-3 can never fire
    x = torch.randn(64, D)
    for _ in range(2):  # a batch's loss sees the counters of the batches before it
        assert sae.training_output(x).losses["dead_pre_act"].item() == 0.0
    assert sae.tokens_since_fired[:4].tolist() == [128.0] * 4
    assert torch.all(sae.dead[:4]) and sae.dead.sum() < S
    out = sae.training_output(x)
    pre = x @ sae.W_enc + sae.b_enc
    expected = (sae.threshold - pre).clamp(min=0)[:, sae.dead].sum(-1).mean()
    torch.testing.assert_close(out.losses["dead_pre_act"], expected)
    out.losses["dead_pre_act"].backward()
    # Only dead latents move: their thresholds down, and their biases up (gradient < 0)
    # only when the loss may pull the encoder.
    if pull_encoder:
        assert torch.all(sae.b_enc.grad[:4] < 0) and torch.all(sae.b_enc.grad[~sae.dead] == 0)
    else:
        assert sae.b_enc.grad is None and sae.W_enc.grad is None
    assert torch.all(sae.raw_threshold.grad[:4] > 0) and torch.all(sae.raw_threshold.grad[~sae.dead] == 0)


def test_dead_counters_are_training_state_not_weights() -> None:
    sae = _sae(dead_coefficient=1.0)
    sae.training_output(torch.randn(8, D))
    assert "tokens_since_fired" not in sae.canonical_state_dict()
    other = _sae(dead_coefficient=1.0)
    other.load_canonical_state_dict(sae.canonical_state_dict())
    assert torch.equal(other.threshold, sae.threshold)


ALL_TERMS = dict(target_l0=10.0, dense_coefficient=0.5, dense_threshold=0.2, dead_coefficient=0.3, aux_coefficient=0.2,
                 aux_k=2, dead_tokens=40)


@pytest.mark.parametrize("terms", [dict(target_l0=10.0), dict(dense_coefficient=0.5, dense_threshold=0.2),
                                   ALL_TERMS], ids=["target_l0", "dense", "all"])
def test_fused_step_equals_autograd_with_every_term(terms: dict) -> None:
    x = torch.randn(48, D)
    fused, plain = _sae(True, **terms), _sae(False, **terms)
    with torch.no_grad():
        for sae in (fused, plain):
            sae.raw_threshold[:3] = 100.0  # dead once 40 tokens have passed
            sae.training_output(x)  # one batch to make them dead
    for sae in (fused, plain):
        out = sae.training_output(x, warmup=0.7)
        sum(out.losses.values()).backward()
    a, b = fused.training_output, plain.training_output
    assert fused.uses_fused(x) and not plain.uses_fused(x)
    with torch.no_grad():
        fa, fb = a(x, 0.7), b(x, 0.7)
    assert fa.losses.keys() == fb.losses.keys()
    for key in fa.losses:
        torch.testing.assert_close(fa.losses[key], fb.losses[key], msg=key)
    for (name, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert fused.raw_threshold.grad.abs().sum() > 0


def test_packed_members_with_different_terms_equal_single_steps() -> None:
    members = [_sae(True, target_l0=6.0), _sae(True, **ALL_TERMS), _sae(True, sparsity_coefficient=0.3)]
    singles = [copy.deepcopy(m) for m in members]
    x = torch.randn(40, D)
    for _ in range(2):  # the second step sees dead latents in the member that tracks them
        packed_out = PackedSAE(members, ["a", "b", "c"]).train().training_outputs(x, 0.5)
        single_out = [s.training_output(x, 0.5) for s in singles]
        sum(sum(o.losses.values()) for o in packed_out + single_out).backward()
    for m, s, po, so in zip(members, singles, packed_out, single_out):
        assert po.losses.keys() == so.losses.keys()
        for key in po.losses:
            torch.testing.assert_close(po.losses[key], so.losses[key], msg=key)
        for (name, p), (_, q) in zip(m.named_parameters(), s.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_aux_k_trains_dead_latents_on_the_residual() -> None:
    sae = _sae(fused=True, aux_coefficient=0.5, aux_k=2, dead_tokens=10)
    with torch.no_grad():
        sae.raw_threshold[:3] = 100.0  # latents 0-2 never fire
    x = torch.randn(32, D)
    sae.training_output(x)  # 32 tokens: 0-2 are dead from the next batch on
    out = sae.training_output(x)
    dead = sae.dead.nonzero().squeeze(-1)
    assert dead.tolist() == [0, 1, 2]
    pre = (x @ sae.W_enc + sae.b_enc)[:, dead]
    values, chosen = pre.topk(2, dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, chosen, values.relu())
    residual = x - out.x_hat
    expected = 0.5 * (f_aux @ sae.W_dec[dead] - residual).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["aux_k"], expected)
    out.losses["aux_k"].backward()
    live = torch.ones(S, dtype=torch.bool)
    live[dead] = False
    # Encoder, bias and decoder of the dead latents learn; live latents and thresholds do not.
    assert sae.W_enc.grad[:, dead].abs().sum() > 0 and sae.W_dec.grad[dead].abs().sum() > 0
    assert torch.all(sae.W_enc.grad[:, live] == 0) and torch.all(sae.W_dec.grad[live] == 0)
    assert sae.raw_threshold.grad is None or torch.all(sae.raw_threshold.grad == 0)
