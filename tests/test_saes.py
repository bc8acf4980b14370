"""SAE variants: initialisation, fused step, decoder constraint, save/load and scale folding."""

import copy

import pytest
import torch

from gs_lightning.formats.io import load_sae, load_sae_config, save_sae
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE


def _perturbed_jumprelu(threshold_parameterization: str, fused: bool = True,
                        subtract_decoder_bias: bool = False) -> JumpReLUSAE:
    torch.manual_seed(0)
    sae = JumpReLUSAE(
        16,
        64,
        sparsity_coefficient=0.1,
        bandwidth=0.05,
        threshold_init=0.05,
        threshold_parameterization=threshold_parameterization,
        fused=fused,
        subtract_decoder_bias=subtract_decoder_bias,
    )
    with torch.no_grad():  # move away from the symmetric init so every term is exercised
        sae.b_enc.uniform_(-0.1, 0.1)
        sae.b_dec.uniform_(-0.1, 0.1)
    return sae


def test_gemma_scope_init_with_a_scaled_encoder() -> None:
    torch.manual_seed(0)
    # Gemma Scope's unit-norm decoder, with the default encoder scale and the former default
    # threshold sigma0 / 10 (about half the latents fire at first).
    sigma0 = 0.5 / 32**0.5
    sae = JumpReLUSAE(32, 128, normalize_decoder=True, threshold_init=sigma0 / 10)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))
    # The default encoder scale 2 d_in / d_sae makes the first reconstruction about x's size.
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t() * 0.5)
    gemma_scope = JumpReLUSAE(32, 128, encoder_init_scale=1.0, normalize_decoder=True, threshold_init=sigma0 / 10)
    assert torch.equal(gemma_scope.W_enc, gemma_scope.W_dec.t())
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # untied after init
    assert torch.all(sae.b_enc == 0) and torch.all(sae.b_dec == 0)
    x = torch.randn(4096, 32)
    x = x / x.pow(2).sum(-1).mean().sqrt()  # E||x||^2 = 1, as training scales inputs
    pre = sae.pre_activation(x)
    assert 0.8 < float(pre.std() / sigma0) < 1.25  # sigma0 is the typical pre-activation
    assert sae.raw_threshold.dtype == torch.float32
    # The first reconstruction has about the input's size (unit encoder: d_sae / 2 d_in = 2x).
    ratio = float(sae.eval()(x).norm(dim=-1).mean())
    assert 0.6 < ratio < 1.6, ratio
    assert float(gemma_scope.eval()(x).norm(dim=-1).mean()) > 1.5


def test_default_recipe_init_is_synthsaebench_in_our_units() -> None:
    torch.manual_seed(0)
    sae = JumpReLUSAE(64, 256, target_l0=8)
    # Free decoder rows of norm 0.5, encoder 2 d_in / d_sae = 0.5 times their transpose.
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((256,), 0.5))
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    assert not sae.normalize_decoder and sae.normalize_gradient
    # Bandwidth and threshold 2 sigma0 = 2 * 0.5 / sqrt(d_in): 1 / sqrt(d_in) at d_sae = 4 d_in (1.0
    # in SAELens' E||x|| = sqrt(d) units); the quadratic penalty's coefficient 1 / d_in (SAELens' 1.0).
    assert sae.bandwidth == pytest.approx(1 / 8) and sae.sparsity_coefficient == pytest.approx(1 / 64)
    torch.testing.assert_close(sae.threshold, torch.full((256,), 1 / 8))
    assert JumpReLUSAE(64, 256).sparsity_coefficient == 1e-3  # the mean-L0 term keeps Gemma Scope's scale
    wide = JumpReLUSAE(64, 2048)  # 32x: the threshold follows sigma0 = (2 * 64 / 2048) / 8, not 1 / sqrt(d_in)
    assert wide.threshold_init == pytest.approx(2 * (2 * 64 / 2048) / 8) == wide.bandwidth
    assert sae.lr_scales() == {"raw_threshold": 1 / 8, "b_enc": 1 / 8, "b_dec": 1 / 8}
    transcoder = JumpReLUSAE(64, 256, d_out=16, threshold_parameterization="log", bias_lr_scale=0.5)
    assert transcoder.lr_scales() == {"log_threshold": 0.5, "b_enc": 0.5, "b_dec": 0.5}
    assert JumpReLUSAE(64, 256, d_out=16).lr_scales()["b_dec"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="decoder_init_norm"):
        JumpReLUSAE(64, 256, decoder_init_norm=0.0)


def test_free_decoder_moves_and_the_gradient_is_normalised() -> None:
    torch.manual_seed(0)
    sae = JumpReLUSAE(16, 64, target_l0=4)
    sum(sae.training_output(torch.randn(64, 16)).losses.values()).backward()
    raw = {n: p.grad.clone() for n, p in sae.named_parameters()}
    # The norm in SAELens' units: thresholds and biases count at their lr scale, 1 / sqrt(16).
    scale = {"raw_threshold": 0.25, "b_enc": 0.25, "b_dec": 0.25}
    total = torch.linalg.vector_norm(torch.stack([g.norm() * scale.get(n, 1.0) for n, g in raw.items()]))
    plain = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()]))
    assert abs(float(total) - 1.0) > 0.1  # the test means something only if the norm was not 1 already
    assert float(plain / total) > 1.01  # and only if weighting the biases changes it
    sae.before_optimizer_step()
    for name, p in sae.named_parameters():  # no decoder projection: the same direction, unit norm overall
        torch.testing.assert_close(p.grad, raw[name] / total)
    norms = sae.W_dec.norm(dim=1).detach().clone()
    torch.optim.Adam(sae.parameters(), lr=0.01).step()
    sae.after_optimizer_step()
    assert not torch.allclose(sae.W_dec.norm(dim=1), norms)  # rows are not renormalised


@pytest.mark.parametrize("parameterization,subtract", [("log", False), ("raw", False), ("raw", True)])
def test_fused_step_equals_autograd(parameterization: str, subtract: bool) -> None:
    x = torch.randn(48, 16)
    grads, outputs = [], []
    for fused in (True, False):
        sae = _perturbed_jumprelu(parameterization, fused, subtract)
        out = sae.training_output(x, warmup=0.7)
        sum(out.losses.values()).backward()
        outputs.append(out)
        grads.append({n: p.grad for n, p in sae.named_parameters()})
    (a, b), (ga, gb) = outputs, grads
    for key in ("mse", "l0_penalty"):
        torch.testing.assert_close(a.losses[key], b.losses[key])
    torch.testing.assert_close(a.x_hat, b.x_hat)
    torch.testing.assert_close(a.fire_counts.float(), b.fire_counts.float())
    assert a.l0.item() == b.l0.item() > 0
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-6)
    threshold_grad = ga["log_threshold" if parameterization == "log" else "raw_threshold"]
    assert threshold_grad.abs().sum() > 0


def test_fused_step_under_bf16_autocast_keeps_fp32_threshold() -> None:
    x = torch.randn(64, 16)
    sae = _perturbed_jumprelu("raw")
    ref = copy.deepcopy(sae)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.training_output(x)
    sum(out.losses.values()).backward()
    sum(ref.training_output(x).losses.values()).backward()
    assert sae.raw_threshold.grad.dtype == torch.float32 and sae.W_enc.grad.dtype == torch.float32
    torch.testing.assert_close(
        out.losses["mse"], ref.training_output(x).losses["mse"].detach(), rtol=0.05, atol=0.05
    )
    torch.testing.assert_close(sae.W_dec.grad, ref.W_dec.grad, rtol=0.1, atol=0.05)


@pytest.mark.parametrize("fused", [True, False])
def test_l0_term_sends_no_gradient_to_encoder(fused: bool) -> None:
    sae = _perturbed_jumprelu("log", fused)
    out = sae.training_output(torch.randn(32, 16))
    out.losses["l0_penalty"].backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        grad = getattr(sae, name).grad
        assert grad is None or torch.all(grad == 0), name
    assert sae.log_threshold.grad.abs().sum() > 0


def test_fused_backward_refuses_overwritten_workspace() -> None:
    sae = _perturbed_jumprelu("log")
    first = sae.training_output(torch.randn(8, 16))
    sae.training_output(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="reused the workspace"):
        sum(first.losses.values()).backward()


def test_decoder_rows_unit_norm_after_step_and_parallel_gradient_removed() -> None:
    sae = _perturbed_jumprelu("log")
    sae.normalize_decoder, sae.normalize_gradient = True, False  # Gemma Scope's constraint
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    opt = torch.optim.Adam(sae.parameters(), lr=0.05, betas=(0.0, 0.999))
    sum(sae.training_output(torch.randn(64, 16)).losses.values()).backward()
    sae.before_optimizer_step()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(1)
    torch.testing.assert_close(parallel, torch.zeros(64), atol=1e-6, rtol=0)
    before = sae.W_dec.detach().clone()
    opt.step()
    sae.after_optimizer_step()
    assert not torch.allclose(sae.W_dec, before)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))


def test_raw_threshold_clamped_at_zero() -> None:
    sae = _perturbed_jumprelu("raw")
    with torch.no_grad():
        sae.raw_threshold[:5] = -1.0
    sae.after_optimizer_step()
    assert sae.raw_threshold.min().item() == 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: _perturbed_jumprelu("log"),
        lambda: _perturbed_jumprelu("raw"),
        lambda: ReLUSAE(16, 64, sparsity_coefficient=1.0),
    ],
)
def test_save_load_gives_identical_outputs(tmp_path, make) -> None:
    sae = make().eval()
    x = torch.randn(20, 16)
    path = save_sae(sae, tmp_path / "sae", metadata={"site": "blocks.0.hook_resid_post"})
    loaded = load_sae(path)
    assert type(loaded) is type(sae)
    assert torch.equal(loaded(x), sae(x))
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert load_sae_config(path)["metadata"]["site"] == "blocks.0.hook_resid_post"
    assert not list(tmp_path.glob(".sae.*")), "temporary folder left behind"


def test_folded_sae_on_raw_inputs_equals_trained_sae_on_scaled_inputs(tmp_path) -> None:
    sae = _perturbed_jumprelu("log").eval()
    scale = 0.37
    x_raw = 3.0 * torch.randn(40, 16)
    f_trained = sae.encode(scale * x_raw)
    x_hat_trained = sae.decode(f_trained)
    assert (f_trained != 0).any()
    folded = load_sae(save_sae(sae, tmp_path / "sae", input_scale=scale))
    torch.testing.assert_close(folded.encode(x_raw), f_trained, rtol=1e-5, atol=1e-6)
    # The folded SAE reconstructs in raw units.
    torch.testing.assert_close(folded(x_raw), x_hat_trained / scale, rtol=1e-5, atol=1e-5)
    # Saving folds a copy: the trained SAE is untouched.
    torch.testing.assert_close(sae.encode(scale * x_raw), f_trained)


def test_subtracted_decoder_bias_trains_differently_and_saves_folded(tmp_path) -> None:
    x = 3.0 * torch.randn(40, 16)
    sae = _perturbed_jumprelu("raw", subtract_decoder_bias=True)
    plain = _perturbed_jumprelu("raw")  # the same parameters, x not centred on b_dec
    assert torch.equal(sae.b_dec, plain.b_dec) and float(sae.b_dec.abs().sum()) > 0
    torch.testing.assert_close(sae.pre_activation(x), (x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert not torch.allclose(sae.pre_activation(x), plain.pre_activation(x))
    # b_dec also gets a gradient through the encoder: the two train differently.
    for model in (sae, plain):
        sum(model.training_output(x).losses.values()).backward()
    assert not torch.allclose(sae.b_dec.grad, plain.b_dec.grad)
    # Saved, b_dec @ W_enc is folded into b_enc: every reader sees a plain JumpReLU ...
    sae.eval()
    folded = sae.canonical_state_dict()
    torch.testing.assert_close(folded["b_enc"], sae.b_enc - sae.b_dec @ sae.W_enc)
    gemma_scope = JumpReLUSAE(16, 64, fused=False)
    gemma_scope.load_canonical_state_dict(folded)
    torch.testing.assert_close(gemma_scope.encode(x), sae.encode(x))
    # ... and our own loader unfolds it, input scale folded in as well.
    loaded = load_sae(save_sae(sae, tmp_path / "sae", input_scale=0.5))
    assert loaded.subtract_decoder_bias
    torch.testing.assert_close(loaded.b_enc, sae.b_enc, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loaded.encode(x / 0.5), sae.encode(x), rtol=1e-5, atol=1e-6)
    # A checkpoint's raw state carries its form: loaded into an SAE of the other form (or one
    # from before the option, which has no b_dec_subtracted), b_enc is converted.
    old_checkpoint = {k: v for k, v in plain.state_dict().items() if k != "b_dec_subtracted"}
    for source, target in ((old_checkpoint, sae), (sae.state_dict(), plain)):
        model = copy.deepcopy(target).eval()
        model.load_state_dict(source)
        torch.testing.assert_close(model.pre_activation(x), _pre_of_state(source, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="transcoder"):
        JumpReLUSAE(16, 64, d_out=8, subtract_decoder_bias=True)


def _pre_of_state(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The pre-activation a raw JumpReLU state dict computes, from its own form."""
    b_enc = state["b_enc"] - (state["b_dec"] @ state["W_enc"] if bool(state.get("b_dec_subtracted", False)) else 0)
    return x @ state["W_enc"] + b_enc


def test_variant_must_expose_its_constructor_arguments() -> None:
    class Forgetful(SAE):
        def __init__(self, d_in: int, d_sae: int, k: int = 3) -> None:
            super().__init__(d_in, d_sae)

    with pytest.raises(TypeError, match="'k'"):
        Forgetful(4, 8).init_args()


def test_load_rejects_missing_files_and_non_sae_classes(tmp_path) -> None:
    from gs_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="config.json is missing"):
        load_sae(tmp_path)
    path = save_sae(ReLUSAE(4, 8), tmp_path / "sae")
    config = (
        (path / "config.json")
        .read_text()
        .replace("gs_lightning.saes.relu.ReLUSAE", "collections.OrderedDict")
    )
    (path / "config.json").write_text(config)
    with pytest.raises(ConfigError, match="not an SAE subclass"):
        load_sae(path)
