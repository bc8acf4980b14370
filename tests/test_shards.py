"""ShardedActivationDataModule: seeded order, rank partition, exact resume, and bad shards named."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.data.scaling import estimate_input_scale
from gs_lightning.data.shard_format import (
    MANIFEST,
    encode_shard,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.errors import ConfigError
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule

D = 8


def write_folder(folder: Path, n_shards: int = 6, rows: int = 512, dtype: torch.dtype = torch.float32,
                 model: str = "test/model", poison: int | None = None) -> Path:
    """A synthetic site folder whose acts[:, 0] is each row's global id (exact in fp32)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    manifest = {"model": model, "site": "blocks.0.hook_resid_post", "d": D,
                "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], "shards": []}
    for i in range(n_shards):
        acts = torch.randn(rows, D, generator=g)
        acts[:, 0] = torch.arange(i * rows, (i + 1) * rows, dtype=torch.float32)
        if i == poison:
            acts[3, 2] = float("nan")
        acts = acts.to(dtype)
        data = encode_shard(acts, torch.arange(rows), torch.arange(rows) % 64)
        (folder / shard_name(i)).write_bytes(data)
        manifest["shards"].append(shard_entry(shard_name(i), data, acts, bucket=i))
    write_manifest(folder, manifest)
    return folder


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_folder(tmp_path / "site")


def _ids(batches) -> list[list[int]]:
    return [b[:, 0].long().tolist() for b in batches]


def test_order_is_seeded_and_changes_per_epoch(folder) -> None:
    def epoch(seed: int, e: int) -> list[list[int]]:
        dm = ShardedActivationDataModule(str(folder), batch_size=64, seed=seed, window_tokens=1024)
        dm.setup("fit")
        dm.load_state_dict({"epoch": e, "window": 0, "offset": 0, "seed": seed})
        return _ids(dm.stream())

    first = epoch(0, 0)
    assert first == epoch(0, 0)
    assert first != epoch(0, 1) and first != epoch(1, 0)
    # An epoch covers every training row (5 shards; the 6th is validation) exactly once.
    assert sorted(i for b in first for i in b) == list(range(5 * 512))
    # The window shuffle mixes shards: a batch holds rows of more than one shard.
    assert len({i // 512 for i in first[0]}) > 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_one_global_order(folder, world: int) -> None:
    # 5 training shards x 512 rows / 64 = 40 batches; 40 // 3 = 13 steps drop one batch at 3 ranks.
    dm = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=1024)
    dm.setup("fit")
    single = _ids(dm.stream(0, 1))
    per_rank = [_ids(dm.stream(r, world)) for r in range(world)]
    steps = len(single) // world
    assert all(len(b) == steps for b in per_rank)
    interleaved = [per_rank[r][s] for s in range(steps) for r in range(world)]
    assert interleaved == single[: steps * world]  # the same global order at any world size
    ids = [i for b in interleaved for i in b]
    assert len(ids) == len(set(ids))  # no overlap between ranks


def test_state_resumes_at_the_consumed_batch(folder) -> None:
    full = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=1024)
    full.setup("fit")
    reference = _ids(full.train_dataloader())
    dm = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=1024)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    pulled = [next(it) for _ in range(13)]  # a prefetching loop pulls one batch ahead ...
    for batch in pulled[:12]:  # ... but trains on 12: only those move the state
        dm.on_before_batch_transfer(batch, 0)
    state = dm.state_dict()
    assert set(state) == {"epoch", "window", "offset", "seed"}
    resumed = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=1024)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    assert _ids(resumed.train_dataloader()) == reference[12:]


def test_scale_and_validation_come_from_the_manifest(folder) -> None:
    dm = ShardedActivationDataModule(str(folder), batch_size=64, val_shards=2)
    dm.setup("fit")
    train = torch.cat(list(dm.stream()))
    assert train.shape[0] == 4 * 512
    expected = estimate_input_scale([train], "unit_mean_squared_norm")
    assert dm.input_scale == pytest.approx(expected, rel=1e-12)
    val = torch.cat(list(dm.val_dataloader()))
    assert val[:, 0].long().tolist() == list(range(4 * 512, 6 * 512))
    assert dm.d_in == D and dm.metadata["model"] == "test/model"


def test_validation_from_a_held_out_harvest(folder, tmp_path) -> None:
    held_out = write_folder(tmp_path / "val", n_shards=2, rows=64)
    dm = ShardedActivationDataModule(str(folder), val_path=str(held_out), batch_size=64)
    dm.setup("fit")
    assert dm.batches_per_epoch() == 6 * 512 // 64  # every shard of path trains
    assert torch.cat(list(dm.val_dataloader()))[:, 0].long().tolist() == list(range(128))
    with pytest.raises(ConfigError, match="site/d differ"):
        ShardedActivationDataModule(str(folder), val_path=str(_other_site(tmp_path)))


def _other_site(tmp_path: Path) -> Path:
    other = write_folder(tmp_path / "other", n_shards=1, rows=64)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["site"] = "blocks.3.hook_mlp_out"
    (other / MANIFEST).write_text(json.dumps(manifest))
    return other


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
def test_workers_keep_the_order_and_the_resume_point(folder) -> None:
    def dm(workers: int) -> ShardedActivationDataModule:
        m = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=1024, num_workers=workers)
        m.setup("fit")
        return m

    reference = _ids(dm(0).train_dataloader())
    two = dm(2)
    it = iter(two.train_dataloader())
    pulled = [next(it) for _ in range(9)]
    assert _ids(pulled) == reference[:9]  # workers take turns: the same order as none
    for batch in pulled[:7]:
        two.on_before_batch_transfer(batch, 0)
    resumed = dm(3)
    resumed.load_state_dict(two.state_dict())
    assert _ids(resumed.train_dataloader()) == reference[7:]


def test_fsspec_urls_read_like_local_paths(folder) -> None:
    fsspec = pytest.importorskip("fsspec")
    local = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=1024)
    local.setup("fit")
    memory = fsspec.filesystem("memory")
    root = f"/gs-lightning-test-{id(folder)}"
    for path in folder.iterdir():
        memory.pipe(f"{root}/{path.name}", path.read_bytes())
    try:
        for url in (f"file://{folder}", f"memory://{root}"):
            remote = ShardedActivationDataModule(url, batch_size=64, window_tokens=1024)
            remote.setup("fit")
            for epoch in (0, 1):  # the second epoch takes the read-into path
                state = {"epoch": epoch, "window": 0, "offset": 0, "seed": 0}
                local.load_state_dict(state)
                remote.load_state_dict(state)
                assert _ids(remote.stream()) == _ids(local.stream()), url
            assert torch.equal(torch.cat(list(remote.val_dataloader())), torch.cat(list(local.val_dataloader())))
        memory.rm(f"{root}/{shard_name(3)}")
        with pytest.raises(ConfigError, match=f"memory://{root}/{shard_name(3)}: shard listed"):
            ShardedActivationDataModule(f"memory://{root}", batch_size=64).setup("fit")
    finally:
        memory.rm(root, recursive=True)


def _target_folder(folder: Path, out: Path, shift_tokens: bool = False) -> Path:
    """A second site of the same harvest: acts[:, 0] = 2 * the input row's id."""
    out.mkdir()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["site"], manifest["shards"] = "blocks.0.hook_mlp_out", []
    for i in range(6):
        from safetensors.torch import load_file
        shard = load_file(folder / shard_name(i))
        acts = shard["acts"] * 2
        ids = shard["token_ids"] + int(shift_tokens and i == 4)
        data = encode_shard(acts, ids, shard["positions"])
        (out / shard_name(i)).write_bytes(data)
        manifest["shards"].append(shard_entry(shard_name(i), data, acts, bucket=i))
    write_manifest(out, manifest)
    return out


def test_two_sites_stream_as_aligned_pairs(folder, tmp_path) -> None:
    target = _target_folder(folder, tmp_path / "mlp_out")
    dm = ShardedActivationDataModule(str(folder), target_path=str(target), batch_size=64, window_tokens=1024)
    dm.setup("fit")
    single = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=1024)
    single.setup("fit")
    pairs = list(dm.stream())
    assert all(isinstance(p, tuple) and len(p) == 2 for p in pairs)
    assert _ids(x for x, _ in pairs) == _ids(single.stream())  # the input order is unchanged
    for x, y in pairs:
        assert torch.equal(y, 2 * x)  # each target row belongs to its input row
    for x, y in dm.val_dataloader():
        assert torch.equal(y, 2 * x)
    assert dm.target_scale == pytest.approx(dm.input_scale / 2)
    worker = ShardedActivationDataModule(str(folder), target_path=str(target), batch_size=64, window_tokens=1024,
                                         num_workers=1)
    worker.setup("fit")
    through_worker = list(worker.stream())  # pairs stay tuples through a DataLoader worker
    assert all(isinstance(p, tuple) and torch.equal(p[0], q[0]) and torch.equal(p[1], q[1])
               for p, q in zip(through_worker, pairs, strict=True))
    assert dm.metadata["target_site"] == "blocks.0.hook_mlp_out"


def test_misaligned_target_site_is_named(folder, tmp_path) -> None:
    target = _target_folder(folder, tmp_path / "mlp_out", shift_tokens=True)
    dm = ShardedActivationDataModule(str(folder), target_path=str(target), batch_size=64)
    dm.setup("fit")
    with pytest.raises(ConfigError, match=f"{target}/{shard_name(4)}: holds other tokens"):
        list(dm.stream())
    short = write_folder(tmp_path / "short", n_shards=6, rows=256)
    with pytest.raises(ConfigError, match="do not line up"):
        ShardedActivationDataModule(str(folder), target_path=str(short))


def test_bf16_shards_stream_as_float32(tmp_path) -> None:
    folder = write_folder(tmp_path / "bf16", n_shards=3, rows=128, dtype=torch.bfloat16)
    dm = ShardedActivationDataModule(str(folder), batch_size=32)
    dm.setup("fit")
    assert next(iter(dm.stream())).dtype == torch.float32


def _fit(folder: Path, root: Path, steps: int, ckpt: str | None = None, workers: int = 0) -> dict[str, torch.Tensor]:
    pl.seed_everything(0)
    dm = ShardedActivationDataModule(str(folder), batch_size=64, window_tokens=256, num_workers=workers)
    module = SAETrainingModule(JumpReLUSAE(D, 32, threshold_parameterization="raw"), lr=1e-2,
                               lr_warmup_steps=3, sparsity_warmup_steps=5)
    saver = ModelCheckpoint(dirpath=root, every_n_train_steps=7, save_top_k=-1)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, callbacks=[saver],
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return {k: v.clone() for k, v in module.sae.state_dict().items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype,workers", [(torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 2)], ids=str)
def test_kill_and_resume_fit_is_bit_exact(tmp_path, dtype: torch.dtype, workers: int) -> None:
    # 5 training shards of 128 rows = 10 batches an epoch: 17 steps cross an epoch boundary,
    # and the checkpoint at step 7 is mid-epoch and mid-window. With workers, the killed run
    # has 2 and the resumed run none: the order does not depend on them.
    folder = write_folder(tmp_path / "site", n_shards=6, rows=128, dtype=dtype)
    full = _fit(folder, tmp_path / "full", 17)
    _fit(folder, tmp_path / "killed", 7, workers=workers)
    resumed = _fit(folder, tmp_path / "resumed", 17, ckpt=str(tmp_path / "killed" / "epoch=0-step=7.ckpt"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


# -- bad input: every error names the file ---------------------------------------------


def _expect(match: str, folder: Path, **kwargs) -> None:
    with pytest.raises(ConfigError, match=match):
        dm = ShardedActivationDataModule(str(folder), batch_size=64, **kwargs)
        dm.setup("fit")
        list(dm.stream())


def test_missing_manifest(tmp_path) -> None:
    _expect(f"{tmp_path}/empty/{MANIFEST}: no manifest", tmp_path / "empty")


def test_manifest_of_another_model(folder) -> None:
    _expect("harvested from model 'test/model'.*'google/gemma-2-2b'", folder, model="google/gemma-2-2b")


def test_truncated_shard(folder) -> None:
    path = folder / shard_name(2)
    path.write_bytes(path.read_bytes()[:-100])
    _expect("shard_00002.safetensors: truncated", folder)


def test_corrupted_shard_fails_its_checksum(folder) -> None:
    path = folder / shard_name(1)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size, header intact: only the checksum can tell
    path.write_bytes(bytes(data))
    _expect("shard_00001.safetensors: sha256 checksum mismatch", folder)


def test_corrupted_header(folder) -> None:
    path = folder / shard_name(0)
    data = bytearray(path.read_bytes())
    data[8:16] = b"{{{{{{{{"
    path.write_bytes(bytes(data))
    _expect("shard_00000.safetensors: corrupted shard", folder)


@pytest.mark.parametrize("stats_finite", [False, True])
def test_nan_in_a_shard(tmp_path, stats_finite: bool) -> None:
    folder = write_folder(tmp_path / "s", poison=1)
    if stats_finite:  # NaN that the manifest's statistics do not show: caught when read
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest["shards"][1]["sum_sq_norm"] = manifest["shards"][1]["sum_norm"] = 1.0
        (folder / MANIFEST).write_text(json.dumps(manifest))
    _expect("shard_00001.safetensors: activations contain NaN", folder, verify_checksums=not stats_finite)


@pytest.mark.parametrize("key,value", [("d", 16), ("dtype", "bfloat16")])
def test_shard_disagrees_with_manifest(folder, key: str, value) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest[key] = value
    (folder / MANIFEST).write_text(json.dumps(manifest))
    _expect("shard_00000.safetensors: acts .* disagree with manifest.json", folder)
