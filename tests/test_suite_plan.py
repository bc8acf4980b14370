"""``suite --plan``: storage, FLOPs and hours against hand computations, offline."""

from pathlib import Path

import huggingface_hub.constants
import pytest

from gs_lightning.errors import ConfigError
from gs_lightning.suite.cli import suite_main
from gs_lightning.suite.config import WidthSpec
from gs_lightning.suite.groups import Group, SuiteSite
from gs_lightning.suite.plan import MACHINES, group_flops, human_bytes

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub here: fail at once instead of retrying for half a minute; paths are repo-relative."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(ROOT)


def _plan(*args: str) -> dict:
    return suite_main(["--plan", *args])


def _gemma2_layer(d: int, heads: int, kv_heads: int, head_dim: int, d_mlp: int) -> int:
    """Parameters of one Gemma 2 decoder layer: q, k, v, o, gate/up/down, four RMSNorms."""
    attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    return attn + 3 * d * d_mlp + 4 * d


def test_quickstart_plan_matches_hand_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan("--config", "configs/suite_quickstart.yaml")
    # train_tokens is null: the estimate is the width's 614,400 tokens; val 32,768; d = 128, bf16.
    assert plan["train_tokens_estimated"] and plan["train_tokens"] == 614_400
    assert len(plan["sites"]) == 12 and all(s["d"] == 128 for s in plan["sites"])
    assert {s["bytes"] for s in plan["sites"]} == {(614_400 + 32_768) * 128 * 2}
    assert plan["storage_bytes"] == 12 * 647_168 * 256
    # 600 steps of 1,024 tokens, 3 target_l0 levels, d=128 -> d_sae=2048.
    assert plan["n_groups"] == 12 and plan["n_saes"] == 36
    assert {g["flops"] for g in plan["groups"]} == {12 * 128 * 2048 * 600 * 1024 * 3}
    assert plan["training_flops"] == 12 * 12 * 128 * 2048 * 600 * 1024 * 3
    params = 4 * _gemma2_layer(128, 4, 2, 32, 512)  # all four layers are harvested
    assert plan["harvest"]["params"] == params == 985_088
    assert plan["harvest"]["flops"] == 2 * params * 647_168
    out = capsys.readouterr().out
    assert "unknown until it is harvested" in out
    assert out.rstrip().splitlines()[-1].startswith("plan: 36 SAEs in 12 groups, storage 1.85 GiB")


def test_gemma2_2b_plan_runs_offline_from_its_model_config(capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan("--config", "configs/suite_gemma2_2b.yaml")
    assert plan["model_config_source"].startswith("configs/model_configs/gemma-2-2b.json")
    # 26 layers x (resid 2304, mlp_out 2304, hook_z 8 x 256 = 2048); 8e9 + 2,097,152 tokens, bf16.
    dims = 26 * (2304 + 2304 + 2048)
    tokens = 8_000_000_000 + 2_097_152
    assert len(plan["sites"]) == 78
    assert plan["storage_bytes"] == tokens * 2 * dims
    params = 26 * _gemma2_layer(2304, 8, 4, 256, 9216)
    assert plan["harvest"]["params"] == params == 2_024_515_584  # 2.61B minus the 589.8M embedding
    assert plan["harvest"]["flops"] == 2 * params * tokens
    # 16k: 4e9 // 4096 = 976,562 steps; 65k: 1,953,125 steps; five levels each.
    training = sum(12 * d_sae * steps * 4096 * 5 * dims
                   for d_sae, steps in ((16384, 976_562), (65536, 1_953_125)))
    assert plan["training_flops"] == training
    assert plan["n_groups"] == 156 and plan["n_saes"] == 780
    h100 = next(m for m in MACHINES if m.name == "H100 SXM")
    hours = (2 * params * tokens / 0.4 + training / 0.5) / h100.peak_flops / 3600
    assert plan["summary_machine"] == "H100 SXM"
    assert plan["summary_hours"] == pytest.approx(hours)
    assert "plan: 780 SAEs in 156 groups, storage 2.46 PiB" in capsys.readouterr().out


def test_unreachable_model_without_model_config_names_the_model() -> None:
    with pytest.raises(ConfigError, match="no-such-org/no-such-model.*set model_config"):
        _plan("--config", "configs/suite_quickstart.yaml", "--model", "no-such-org/no-such-model")


def test_a_bad_model_config_is_named() -> None:
    with pytest.raises(ConfigError, match="model_config='configs/nothing.json'"):
        _plan("--config", "configs/suite_gemma2_2b.yaml", "--model_config", "configs/nothing.json")


def test_transcoder_flops_count_both_widths() -> None:
    site = SuiteSite("blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "transcoder", 0, d_in=128, d_out=256)
    group = Group(site, WidthSpec(d_sae=1024, tokens=4096, sparsity={"k": [8, 16]}), steps=4)
    assert group_flops(group, batch_size=1024) == (6 * 128 * 1024 + 6 * 1024 * 256) * 4 * 1024 * 2


def test_storage_is_printed_in_binary_units() -> None:
    assert human_bytes(512) == "512 bytes"
    assert human_bytes(3 * 2**40) == "3 TiB"
    assert human_bytes(2.5 * 2**50) == "2.5 PiB"
