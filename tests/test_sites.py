"""Every site reads exactly the tensor the model itself computes there."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from gs_lightning.errors import ConfigError
from gs_lightning.lm.sites import (
    ActivationExtractor,
    check_site_config,
    parse_site,
    site_dim,
    site_dim_from_config,
)

# head_dim * heads (96) differs from hidden_size (64), so hook_z's width is checked too.
GEMMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    vocab_size=512,
    attn_implementation="eager",
)


@pytest.fixture(scope="module")
def gemma() -> Gemma2ForCausalLM:
    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(**GEMMA)).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 7), generator=torch.Generator().manual_seed(1))


def _extract(model: torch.nn.Module, sites: list[str], ids: torch.Tensor) -> dict:
    with ActivationExtractor(model, sites) as extract:
        return extract(ids, torch.ones_like(ids))


def _reference(model: torch.nn.Module, module: torch.nn.Module, ids: torch.Tensor, io: str):
    """The tensor a plain hook sees in a full, unhooked-by-us forward pass."""
    seen = {}
    if io == "output":
        handle = module.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(ids, attention_mask=torch.ones_like(ids))
    handle.remove()
    return seen["x"]


@pytest.mark.parametrize("layer", [0, 1])
def test_resid_post_is_hidden_states(gemma, ids, layer):
    with torch.no_grad():
        hidden = gemma(ids, output_hidden_states=True).hidden_states
    acts = _extract(gemma, [f"blocks.{layer}.hook_resid_post"], ids)
    torch.testing.assert_close(acts[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1])


def test_last_resid_post_is_before_the_final_norm(gemma, ids):
    # HF's last hidden state is normed; the TransformerLens hook is the raw layer output.
    with torch.no_grad():
        hidden = gemma(ids, output_hidden_states=True).hidden_states
        resid = _extract(gemma, ["blocks.2.hook_resid_post"], ids)["blocks.2.hook_resid_post"]
        torch.testing.assert_close(gemma.model.norm(resid), hidden[3])


def test_mlp_out_is_post_feedforward_layernorm(gemma, ids):
    ref = _reference(gemma, gemma.model.layers[1].post_feedforward_layernorm, ids, "output")
    acts = _extract(gemma, ["blocks.1.hook_mlp_out"], ids)
    torch.testing.assert_close(acts["blocks.1.hook_mlp_out"], ref)


def test_mlp_in_is_pre_feedforward_layernorm_output(gemma, ids):
    # The MLP sees the normed residual: the transcoder input Gemma Scope used.
    ref = _reference(gemma, gemma.model.layers[1].pre_feedforward_layernorm, ids, "output")
    acts = _extract(gemma, ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"], ids)
    torch.testing.assert_close(acts["blocks.1.hook_mlp_in"], ref)
    mlp_out = gemma.model.layers[1].post_feedforward_layernorm(gemma.model.layers[1].mlp(ref))
    torch.testing.assert_close(acts["blocks.1.hook_mlp_out"], mlp_out)


def test_resid_pre_and_mid_add_up_to_resid_post(gemma, ids):
    # resid_pre is the layer's input (hidden_states[L]); resid_mid is the stream after
    # attention, which the MLP branch (pre-norm, MLP, post-norm) adds to: resid_post.
    sites = ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]
    acts = _extract(gemma, sites, ids)
    with torch.no_grad():
        hidden = gemma(ids, output_hidden_states=True).hidden_states
        layer = gemma.model.layers[1]
        mlp = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(acts[sites[1]])))
    torch.testing.assert_close(acts[sites[0]], hidden[1])
    torch.testing.assert_close(acts[sites[1]], _reference(gemma, layer.pre_feedforward_layernorm, ids, "input"))
    torch.testing.assert_close(acts[sites[1]] + mlp, acts[sites[2]])
    assert not torch.allclose(acts[sites[0]], acts[sites[1]])
    assert site_dim(gemma, sites[1]) == 64


def test_resid_mid_on_llama_is_the_pre_mlp_norm_input(ids):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=512)).eval()
    layer = llama.model.layers[0]
    acts = _extract(llama, ["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"], ids)
    with torch.no_grad():
        mlp = layer.mlp(layer.post_attention_layernorm(acts["blocks.0.hook_resid_mid"]))
    torch.testing.assert_close(acts["blocks.0.hook_resid_mid"] + mlp, acts["blocks.0.hook_resid_post"])


def test_hook_z_is_o_proj_input(gemma, ids):
    ref = _reference(gemma, gemma.model.layers[2].self_attn.o_proj, ids, "input")
    acts = _extract(gemma, ["blocks.2.attn.hook_z"], ids)
    assert acts["blocks.2.attn.hook_z"].shape == (2, 7, 4 * 24)
    torch.testing.assert_close(acts["blocks.2.attn.hook_z"], ref)


def test_all_sites_in_one_pass(gemma, ids):
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]
    calls = []
    handle = gemma.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    acts = _extract(gemma, sites, ids)
    handle.remove()
    assert len(calls) == 1 and set(acts) == set(sites)


def test_site_dims(gemma):
    assert site_dim(gemma, "blocks.0.hook_resid_post") == 64
    assert site_dim(gemma, "blocks.0.hook_mlp_out") == 64
    assert site_dim(gemma, "blocks.0.attn.hook_z") == 96
    assert site_dim(gemma, "model.layers.0.mlp.up_proj:output") == 128
    assert site_dim_from_config(gemma.config, "blocks.1.attn.hook_z") == 96
    assert site_dim_from_config(gemma.config, "model.layers.0:output") is None


def test_forward_stops_after_the_last_site(gemma, ids):
    calls = {"layer1": 0, "layer2": 0, "norm": 0, "lm_head": 0}
    modules = {
        "layer1": gemma.model.layers[1],
        "layer2": gemma.model.layers[2],
        "norm": gemma.model.norm,
        "lm_head": gemma.lm_head,
    }
    handles = [
        m.register_forward_pre_hook(lambda *a, k=k: calls.__setitem__(k, calls[k] + 1))
        for k, m in modules.items()
    ]
    _extract(gemma, ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"], ids)
    for h in handles:
        h.remove()
    # Layer 1 starts (its attention is the last site), nothing after it runs.
    assert calls == {"layer1": 1, "layer2": 0, "norm": 0, "lm_head": 0}


def test_extractors_on_one_model_do_not_interfere(gemma, ids):
    with torch.no_grad():
        hidden = gemma(ids, output_hidden_states=True).hidden_states
    with ActivationExtractor(gemma, ["blocks.0.hook_resid_post"]) as early:
        # A plain forward is not cut short by the idle extractor's hooks.
        assert gemma(ids).logits.shape == (2, 7, 512)
        late = _extract(gemma, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], ids)
        torch.testing.assert_close(late["blocks.1.hook_resid_post"], hidden[2])
        torch.testing.assert_close(early(ids)["blocks.0.hook_resid_post"], hidden[1])


def test_close_removes_hooks(gemma, ids):
    layer = gemma.model.layers[0]
    before = len(layer._forward_hooks)
    extract = ActivationExtractor(gemma, ["blocks.0.hook_resid_post"])
    assert len(layer._forward_hooks) == before + 1
    extract.close()
    assert len(layer._forward_hooks) == before


def test_module_path_on_bert():
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        vocab_size=100,
    )
    bert = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        hidden = bert(ids, output_hidden_states=True).hidden_states
    acts = _extract(bert, ["encoder.layer.0:output", "encoder.layer.1:input"], ids)
    torch.testing.assert_close(acts["encoder.layer.0:output"], hidden[1])
    torch.testing.assert_close(acts["encoder.layer.1:input"], hidden[1])
    assert site_dim(bert, "encoder.layer.1.intermediate:output") == 48
    # BertModel's layer list is found too, so TransformerLens names work on it.
    resid = _extract(bert, ["blocks.1.hook_resid_post"], ids)["blocks.1.hook_resid_post"]
    torch.testing.assert_close(resid, hidden[2])


def test_mlp_out_without_post_norm_is_the_mlp_output():
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    llama = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (1, 6))
    ref = _reference(llama, llama.model.layers[1].mlp, ids, "output")
    torch.testing.assert_close(
        _extract(llama, ["blocks.1.hook_mlp_out"], ids)["blocks.1.hook_mlp_out"], ref
    )


@pytest.mark.parametrize(
    "site, words",
    [
        ("blocks.3.hook_resid_post", ["blocks.3.hook_resid_post", "3 layers"]),
        ("blocks.7.attn.hook_z", ["blocks.7.attn.hook_z", "3 layers"]),
        ("blocks.0.hook_attn_out", ["blocks.0.hook_attn_out"]),
        ("model.layers.0.mlpp:output", ["model.layers.0.mlpp:output", "mlp"]),
        ("model.layers.0.mlp:middle", ["model.layers.0.mlp:middle"]),
        ("resid", ["'resid'"]),
    ],
)
def test_bad_sites_name_the_site(gemma, site, words):
    with pytest.raises(ConfigError) as err:
        ActivationExtractor(gemma, [site])
    for word in words:
        assert word in str(err.value)


def test_check_site_config_needs_no_weights(gemma):
    assert parse_site("blocks.2.attn.hook_z").layer == 2
    check_site_config(gemma.config, "blocks.2.hook_mlp_out")
    with pytest.raises(ConfigError, match="blocks.3.hook_mlp_out"):
        check_site_config(gemma.config, "blocks.3.hook_mlp_out")
