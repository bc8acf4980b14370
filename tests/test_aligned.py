"""AlignedShardsDataModule: stacked rows of several sites of one harvest, aligned, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gs_lightning.cli import main
from gs_lightning.data import AlignedShardsDataModule, ShardedActivationDataModule
from gs_lightning.data.shard_format import (
    MANIFEST,
    encode_shard,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.errors import ConfigError
from tests.test_shards import write_folder

SITES = 3


def _sibling(folder: Path, out: Path, k: int, site: str, d: int | None = None) -> Path:
    """Site k of the same harvest as ``folder``: every row is ``(k + 1)`` times ``folder``'s row
    (its first ``d`` columns), so a row's site is known and its token is ``acts[:, 0] / (k + 1)``."""
    out.mkdir()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["site"], manifest["shards"] = site, []
    for i, _ in enumerate(json.loads((folder / MANIFEST).read_text())["shards"]):
        shard = load_file(folder / shard_name(i))
        acts = (shard["acts"] * (k + 1))[:, :d]
        data = encode_shard(acts, shard["token_ids"], shard["positions"])
        (out / shard_name(i)).write_bytes(data)
        manifest["shards"].append(shard_entry(shard_name(i), data, acts, bucket=i))
    manifest["d"] = acts.shape[1]
    write_manifest(out, manifest)
    return out


@pytest.fixture
def sites(tmp_path) -> list[Path]:
    first = write_folder(tmp_path / "site0", n_shards=6, rows=256)
    return [first] + [_sibling(first, tmp_path / f"site{k}", k, f"blocks.{k}.hook_resid_mid") for k in range(1, SITES)]


def _dm(sites: list[Path], n_in: int = 2, **kwargs) -> AlignedShardsDataModule:
    kwargs = {"batch_size": 64, "window_tokens": 512, **kwargs}
    dm = AlignedShardsDataModule([str(p) for p in sites[:n_in]], [str(p) for p in sites[n_in:]] or None, **kwargs)
    dm.setup("fit")
    return dm


def test_stacked_rows_are_one_token_at_every_site(sites) -> None:
    dm = _dm(sites)
    single = ShardedActivationDataModule(str(sites[0]), batch_size=64, window_tokens=512)
    single.setup("fit")
    batches = list(dm.stream())
    assert len(batches) == single.batches_per_epoch() == 5 * 256 // 64
    for (x, y), ref in zip(batches, single.stream(), strict=True):
        assert x.shape == (64, 2, 8) and y.shape == (64, 1, 8) and x.dtype == torch.float32
        assert torch.equal(x[:, 0], ref)  # the first site streams in the single-site order
        assert torch.equal(x[:, 1], 2 * ref) and torch.equal(y[:, 0], 3 * ref)  # and the others with it
    x, y = dm.finish_batch(next(iter(dm.val_dataloader())))
    assert torch.equal(x[:, 1], 2 * x[:, 0]) and torch.equal(y[:, 0], 3 * x[:, 0])
    assert x[:, 0, 0].long().tolist() == list(range(5 * 256, 5 * 256 + 64))  # the held-out shard, in order
    assert dm.input_scale == pytest.approx([single.input_scale, single.input_scale / 2])
    assert dm.target_scale == pytest.approx([single.input_scale / 3])
    assert dm.stacked_sites == 2 and dm.n_targets == 1 and dm.paired and dm.d_out == 8
    assert dm.metadata["input_sites"] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"]
    assert dm.metadata["target_sites"] == ["blocks.2.hook_resid_mid"]
    inputs_only = _dm(sites, n_in=3)
    assert next(iter(inputs_only.stream())).shape == (64, 3, 8) and not inputs_only.paired


def test_resume_continues_with_the_next_aligned_batch(sites) -> None:
    first = _dm(sites)
    reference = [torch.cat(first.finish_batch(b), 1) for b in first.train_dataloader()]
    dm = _dm(sites)
    it = iter(dm.train_dataloader())
    pulled = [next(it) for _ in range(9)]  # the loop pulls one ahead and trains on 8 (mid-window)
    for batch in pulled[:8]:
        dm.on_before_batch_transfer(batch, 0)
    resumed = _dm(sites)
    resumed.load_state_dict(dm.state_dict())
    rest = [torch.cat(resumed.finish_batch(b), 1) for b in resumed.train_dataloader()]
    assert len(rest) == len(reference) - 8
    assert all(torch.equal(a, b) for a, b in zip(rest, reference[8:], strict=True))


def test_sites_that_do_not_stack_are_named(sites, tmp_path) -> None:
    narrow = _sibling(sites[0], tmp_path / "narrow", 1, "blocks.5.hook_mlp_out", d=4)
    with pytest.raises(ConfigError, match="input_paths: the sites have widths \\[4, 8\\]"):
        AlignedShardsDataModule([str(sites[0]), str(narrow)])
    other = write_folder(tmp_path / "other", n_shards=6, rows=128)
    with pytest.raises(ConfigError, match="do not line up"):
        AlignedShardsDataModule([str(sites[0])], [str(other)])
    with pytest.raises(ConfigError, match="input_paths is empty"):
        AlignedShardsDataModule([])


@pytest.mark.slow
def test_a_harvest_streams_aligned_residual_and_mlp_rows(tmp_path) -> None:
    # On the embedded model, row by row: resid_mid + mlp_out == resid_post of one layer,
    # which holds only if the three sites' rows are the same token.
    layer = 2
    sites = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_post"]
    root = Path(__file__).parent.parent
    main(["harvest", "--config", str(root / "configs" / "harvest_quickstart.yaml"), "--output", str(tmp_path),
          "--sites", json.dumps(sites), "--dtype", "float32", "--max_tokens", "2048", "--shard_tokens", "512",
          "--shuffle_bucket_tokens", "1024"])
    folders = [str(tmp_path / s) for s in sites]
    dm = AlignedShardsDataModule(folders[:1], folders[1:], batch_size=128, window_tokens=1024)
    dm.setup("fit")
    batches = list(dm.stream())
    assert len(batches) == dm.batches_per_epoch() >= 8
    for x, y in batches:
        torch.testing.assert_close(x[:, 0] + y[:, 0], y[:, 1], rtol=1e-5, atol=1e-4)
