"""The table of site kinds: every row parses back to itself, and the names other modules
used to spell out by hand are the table's columns."""

from __future__ import annotations

import re

import pytest
from transformers import Gemma2Config

from gs_lightning.errors import ConfigError
from gs_lightning.formats.circuit_tracer import INPUT_HOOK, OUTPUT_HOOK
from gs_lightning.formats.gemma_scope_2 import GEMMA_SCOPE_2_KINDS, HF_HOOK_POINTS
from gs_lightning.formats.naming import site_layer
from gs_lightning.lm.sites import (
    SITE_KINDS,
    layer_and_kind,
    parse_site,
    site_dim_from_config,
)
from gs_lightning.suite.groups import KIND_NAMES
from gs_lightning.suite.report import KIND_TITLES


@pytest.mark.parametrize("kind", SITE_KINDS.values(), ids=SITE_KINDS)
@pytest.mark.parametrize("layer", [0, 7, 31])
def test_every_row_round_trips(kind, layer):
    site = kind.site(layer)
    assert layer_and_kind(site) == (layer, kind)
    spec = parse_site(site)
    assert (spec.layer, spec.kind, spec.hook, spec.io) == (layer, kind, kind.name, kind.io)
    assert site_layer(site) == layer


def test_the_table_holds_the_six_kinds_in_order():
    assert [(k.name, k.hook) for k in SITE_KINDS.values()] == [
        ("resid_pre", "hook_resid_pre"), ("resid_mid", "hook_resid_mid"), ("resid_post", "hook_resid_post"),
        ("mlp_in", "hook_mlp_in"), ("mlp_out", "hook_mlp_out"), ("attn_z", "attn.hook_z")]


def test_derived_names_are_what_modules_hard_coded():
    assert GEMMA_SCOPE_2_KINDS == {"hook_resid_post": "resid_post", "hook_mlp_out": "mlp_out",
                                   "attn.hook_z": "attn_out"}
    assert HF_HOOK_POINTS == {"hook_resid_post": "model.layers.{L}.output",
                              "hook_mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
                              "hook_mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
                              "attn.hook_z": "model.layers.{L}.self_attn.o_proj.input"}
    # groups.KIND_NAMES used to list four kinds and fall back to the kind's own name.
    assert KIND_NAMES == {"resid_pre": "resid_pre", "resid_mid": "resid_mid", "resid_post": "res",
                          "mlp_in": "mlp_in", "mlp_out": "mlp", "attn_z": "att"}
    assert {k: KIND_TITLES[k] for k in ("res", "mlp", "att", "transcoder")} == {
        "res": "residual stream", "mlp": "MLP output", "att": "attention (hook_z)", "transcoder": "transcoders"}
    assert (INPUT_HOOK, OUTPUT_HOOK) == ("hook_resid_mid", "hook_mlp_out")


def test_roles_and_splicing():
    assert [k.name for k in SITE_KINDS.values() if not k.spliceable] == ["resid_mid"]
    assert {k.name: k.transcoder_role for k in SITE_KINDS.values() if k.transcoder_role} == {
        "resid_mid": "input", "mlp_in": "input", "mlp_out": "target"}
    assert {k.name: k.to_residual for k in SITE_KINDS.values() if k.to_residual} == {
        "resid_post": "identity", "mlp_out": "identity", "attn_z": "module_weight"}


def test_width_rules():
    # head_dim * heads (4 * 24 = 96) differs from hidden_size (64).
    config = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=24, vocab_size=512)
    widths = {name: site_dim_from_config(config, kind.site(1)) for name, kind in SITE_KINDS.items()}
    assert widths == {"resid_pre": 64, "resid_mid": 64, "resid_post": 64, "mlp_in": 64, "mlp_out": 64, "attn_z": 96}


@pytest.mark.parametrize("site", ["blocks.3.hook_attn_out", "blocks.x.hook_resid_post", "blocks.3.hook_resid_post.",
                                  "resid", "layers.3.hook_mlp_out"])
def test_a_bad_site_names_itself(site):
    assert layer_and_kind(site) == (None, None) and site_layer(site) is None
    with pytest.raises(ConfigError, match=re.escape(f"site={site!r} is not a site; expected one of: blocks")):
        parse_site(site)


def test_module_paths_have_no_kind():
    spec = parse_site("model.layers.0.mlp:input")
    assert (spec.kind, spec.hook, spec.layer, spec.path, spec.io) == (None, "module", None, "model.layers.0.mlp", "input")
