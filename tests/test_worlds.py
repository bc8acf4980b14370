"""Harvesting a synthetic world: shards hold the rows and their true activations (CSR), the
ground truth sits beside them, a killed harvest resumes byte for byte, and the sharded
datamodule trains on it and validates with the truth.

Most tests use a small fake world and need no SAELens; those marked by
``pytest.importorskip("sae_lens.synthetic")`` (and marked slow) sample a real ``sae_lens.synthetic`` world.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gs_lightning.cli import main
from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.data.ground_truth import (
    GroundTruthBatch,
    SparseRows,
    read_ground_truth,
    read_true_acts,
    sparse_true_acts,
)
from gs_lightning.data.shard_format import (
    MANIFEST,
    derive_seed,
    encode_shard,
    read_manifest,
    require_provenance,
    shard_entry,
    write_manifest,
)
from gs_lightning.errors import ConfigError
from gs_lightning.harvest.model import HarvestConfig, harvest
from gs_lightning.harvest.world import harvest_world
from tests.world_helpers import FakeWorld

ROOT = Path(__file__).resolve().parents[1]


def _config(output: Path, world: str = "fake", **overrides) -> HarvestConfig:
    base = dict(output=str(output), world=world, max_tokens=2000, dtype="float32", shuffle_bucket_tokens=600,
                shard_tokens=250, seed=5, device="cpu")
    return HarvestConfig(**{**base, **overrides})


def _files(output: Path) -> dict[str, bytes]:
    """Every file under ``output`` by relative path: what byte-identical means here."""
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def fake_harvest(tmp_path_factory) -> Path:
    """An uninterrupted harvest of the fake world: 2,000 rows, buckets of 600, shards of at most 250."""
    output = tmp_path_factory.mktemp("fake")
    harvest_world(_config(output), world=FakeWorld())
    return output / "world"


# -- what a world harvest stores --------------------------------------------------------------


def test_shards_hold_rows_and_their_true_activations(fake_harvest) -> None:
    world, manifest = FakeWorld(), read_manifest(fake_harvest)
    assert manifest["complete"] and manifest["tokens"] == 2000 and manifest["model"] is None
    assert manifest["site"] == "world" and manifest["d"] == 8
    assert manifest["world"] == {**world.record, "n_features": 24, "sample_rows": 4096}
    assert manifest["bucket_ends"] == [{"tokens": t} for t in (600, 1200, 1800, 2000)]
    # Each bucket cut into equal shards of at most 250 rows: 3 x 200 three times, then 1 x 200.
    expected = [(b, 200) for b in range(3) for _ in range(3)] + [(3, 200)]
    assert [(s["bucket"], s["tokens"]) for s in manifest["shards"]] == expected
    for entry in manifest["shards"]:
        tensors = load_file(fake_harvest / entry["file"])
        assert set(tensors) == {"acts", "feature_indptr", "feature_indices", "feature_values"}
        assert (tensors["feature_indptr"].dtype, tensors["feature_indices"].dtype) == (torch.int64, torch.int32)
        true = read_true_acts(str(fake_harvest), entry, manifest)
        assert true.dtype == torch.float32 and true.shape == (200, 24) and (true > 0).any()
        torch.testing.assert_close(tensors["acts"], true @ world.features + world.bias)
    truth = read_ground_truth(fake_harvest)
    assert torch.equal(truth.features, world.features) and torch.equal(truth.bias, world.bias)


def test_a_bucket_is_drawn_from_its_derived_seed(fake_harvest) -> None:
    """Bucket 1 (rows 600..1199, shards 3..5) is what the world draws after seeding with
    derive_seed(seed, 1): nothing before the bucket matters, which is what resume relies on."""
    manifest, world = read_manifest(fake_harvest), FakeWorld()
    torch.manual_seed(derive_seed(5, 1))
    expected = [world.sample(200) for _ in range(3)]
    for entry, (acts, true) in zip(manifest["shards"][3:6], expected):
        assert torch.equal(load_file(fake_harvest / entry["file"])["acts"], acts)
        assert torch.equal(read_true_acts(str(fake_harvest), entry, manifest), true)


def test_a_failed_world_harvest_resumes_to_identical_files(fake_harvest, tmp_path) -> None:
    class Killed(Exception):
        pass

    def kill(path: Path) -> None:
        if path.name == "shard_00004.safetensors":  # in the middle of bucket 1
            raise Killed

    with pytest.raises(Killed):
        harvest_world(_config(tmp_path), on_shard=kill, world=FakeWorld())
    assert [s["file"] for s in read_manifest(tmp_path / "world")["shards"]][-1] == "shard_00004.safetensors"
    harvest_world(_config(tmp_path), world=FakeWorld())
    assert _files(tmp_path) == _files(fake_harvest.parent)


def test_resume_refuses_other_options_or_another_world(fake_harvest) -> None:
    with pytest.raises(ConfigError, match="manifest.json: holds a harvest with other options or another world"):
        harvest_world(_config(fake_harvest.parent, seed=6), world=FakeWorld())
    with pytest.raises(ConfigError, match="another world"):
        harvest_world(_config(fake_harvest.parent), world=FakeWorld(p=0.2))


def test_a_world_has_no_tokens_to_browse(fake_harvest) -> None:
    with pytest.raises(ConfigError, match="synthetic world 'fake': its rows come from no text"):
        require_provenance(fake_harvest, read_manifest(fake_harvest))


def test_world_options_are_checked(tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="max_tokens: world='synthsaebench-cpu' is sampled"):
        harvest(_config(tmp_path, world="synthsaebench-cpu", max_tokens=None))
    with pytest.raises(ConfigError, match="world='nowhere': not one of .*synthsaebench-16k"):
        harvest(_config(tmp_path, world="nowhere"))
    monkeypatch.setitem(sys.modules, "sae_lens.synthetic", None)  # as if the bench extra were not installed
    with pytest.raises(ConfigError, match=r"needs the bench extra: pip install -e '\.\[bench\]'"):
        harvest(_config(tmp_path, world="synthsaebench-cpu"))


def test_a_model_harvest_records_no_world() -> None:
    """The identity of a language model's harvest is what it was before worlds existed (its
    manifest bytes and resume of older harvests depend on it)."""
    identity = HarvestConfig(output="x").identity()
    assert "world" not in identity and {"model", "sites", "text"} <= set(identity)
    assert set(_config(Path("x")).identity()) == {"world", "max_tokens", "dtype", "shuffle_bucket_tokens",
                                                  "shard_tokens", "seed"}


# -- reading the truth back -------------------------------------------------------------------


def test_sparse_rows_densify_and_concatenate() -> None:
    rows = SparseRows(torch.tensor([0, 2, 2, 3]), torch.tensor([1, 4, 0], dtype=torch.int32),
                      torch.tensor([0.5, 2.0, 3.0]), n_features=5)
    expected = torch.tensor([[0, 0.5, 0, 0, 2.0], [0, 0, 0, 0, 0], [3.0, 0, 0, 0, 0]])
    assert torch.equal(rows.dense(), expected) and torch.equal(rows.dense(1, 3), expected[1:])
    both = SparseRows.cat([rows, rows])
    assert both.rows == 6 and torch.equal(both.dense(), torch.cat([expected, expected]))


def test_inconsistent_true_activations_are_named() -> None:
    tensors = {"acts": torch.zeros(2, 3), "feature_indptr": torch.tensor([0, 1, 3]),
               "feature_indices": torch.tensor([0, 1, 7], dtype=torch.int32), "feature_values": torch.ones(3)}
    with pytest.raises(ConfigError, match="shard_00009.safetensors: a feature index outside 0..4"):
        sparse_true_acts(tensors, 5, "shard_00009.safetensors")
    tensors["feature_indptr"] = torch.tensor([0, 1, 2])
    with pytest.raises(ConfigError, match="inconsistent true feature activations"):
        sparse_true_acts(tensors, 8, "x")
    with pytest.raises(ConfigError, match=r"no true feature activations \(\['feature_indptr'"):
        sparse_true_acts({"acts": torch.zeros(2, 3)}, 8, "x")


def _model_folder(folder: Path, rows: int = 64, shards: int = 3) -> Path:
    """A language model's harvest written by hand: tokens, no ground truth."""
    folder.mkdir(parents=True)
    manifest = {"model": "test/model", "site": "blocks.0.hook_resid_post", "d": 8, "dtype": "float32", "shards": []}
    for i in range(shards):
        acts = torch.randn(rows, 8)
        data = encode_shard(acts, torch.arange(rows), torch.arange(rows))
        (folder / f"shard_{i:05d}.safetensors").write_bytes(data)
        manifest["shards"].append(shard_entry(f"shard_{i:05d}.safetensors", data, acts, bucket=i))
    write_manifest(folder, manifest)
    return folder


def test_datamodule_validates_a_world_with_its_truth(fake_harvest) -> None:
    dm = ShardedActivationDataModule(str(fake_harvest), batch_size=64, val_shards=2, window_tokens=400)
    dm.setup("fit")
    truth = dm.ground_truth
    assert torch.equal(truth.features, FakeWorld().features) and torch.equal(truth.bias, FakeWorld().bias)
    train = list(dm.stream())
    assert len(train) == 1600 // 64 and all(type(b) is torch.Tensor and b.shape == (64, 8) for b in train)
    val = list(dm.val_dataloader())
    assert len(dm.val_dataloader()) == len(val) == 7  # 400 rows: 6 x 64 + 16
    assert all(isinstance(b, GroundTruthBatch) for b in val)
    manifest = read_manifest(fake_harvest)
    expected = torch.cat([read_true_acts(str(fake_harvest), e, manifest) for e in manifest["shards"][-2:]])
    acts = torch.cat([load_file(fake_harvest / e["file"])["acts"] for e in manifest["shards"][-2:]])
    assert torch.equal(torch.cat([b.true_acts for b in val]), expected)
    assert torch.equal(torch.cat([b.acts for b in val]), acts)
    moved = dm.on_after_batch_transfer(val[0], 0)  # stays a GroundTruthBatch, not an (input, target) pair
    assert isinstance(moved, GroundTruthBatch) and moved.acts.dtype == torch.float32


def test_a_model_harvest_has_no_ground_truth(tmp_path) -> None:
    folder = _model_folder(tmp_path / "site")
    assert read_ground_truth(folder) is None
    dm = ShardedActivationDataModule(str(folder), batch_size=32)
    dm.setup("fit")
    assert dm.ground_truth is None
    assert all(type(b) is torch.Tensor for b in dm.val_dataloader())


def test_fit_trains_on_a_world_harvest(tmp_path, capsys) -> None:
    output = tmp_path / "harvest"
    harvest_world(_config(output, max_tokens=4096, shuffle_bucket_tokens=1024, shard_tokens=512),
                  world=FakeWorld())
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 8, "accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp_path / "run"),
                    "val_check_interval": 4, "check_val_every_n_epoch": None, "enable_progress_bar": False,
                    "enable_model_summary": False, "logger": False, "enable_checkpointing": False,
                    "callbacks": [{"class_path": "callbacks.FinalSummary"}]},
        "model": {"sae": {"class_path": "gs_lightning.saes.JumpReLUSAE", "init_args": {"d_in": 8, "d_sae": 32}},
                  "lr": 1e-3, "lr_warmup_steps": 2, "sparsity_warmup_steps": 2},
        "data": {"class_path": "gs_lightning.data.ShardedActivationDataModule",
                 "init_args": {"path": str(output / "world"), "batch_size": 256, "val_shards": 1,
                               "window_tokens": 1024}},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(tmp_path / "fit.yaml")])
    assert cli.trainer.global_step == 8
    final = capsys.readouterr().out.split("final (step 8): ")[1].splitlines()[0]
    logged = cli.trainer.callback_metrics
    assert "val/fvu" in logged and "val/mcc" in logged  # validated with the world's truth
    # The run's last line says what it recovered of the truth, as logged.
    assert f"val/mcc {float(logged['val/mcc']):.4g}" in final and "val/f1 " in final


# -- a real sae_lens.synthetic world ------------------------------------------------------------


def _tiny_world_file(folder: Path) -> Path:
    """A SyntheticModelConfig of 64 features in 16 dimensions with a hierarchy and correlations,
    no orthogonalization: built in milliseconds."""
    synthetic = pytest.importorskip("sae_lens.synthetic")
    config = synthetic.SyntheticModelConfig(
        num_features=64, hidden_dim=16, seed=7, bias=0.5,
        firing_probability=synthetic.ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=0.01),
        hierarchy=synthetic.HierarchyConfig(total_root_nodes=4, branching_factor=2, max_depth=2,
                                            mutually_exclusive_portion=1.0, compensate_probabilities=True),
        correlation=synthetic.LowRankCorrelationConfig(rank=4, correlation_scale=0.1),
    )
    path = folder / "tiny_world.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


@pytest.mark.peer
@pytest.mark.slow
def test_killed_world_harvest_resumes_byte_identical(tmp_path) -> None:
    """SIGKILL a harvest of a real world after its first shard, rerun it: every file (shards,
    manifest, ground truth, the saved world) is byte for byte an uninterrupted run's."""
    world = str(_tiny_world_file(tmp_path))
    options = dict(world=world, max_tokens=6000, shuffle_bucket_tokens=1000, shard_tokens=500, seed=3,
                   dtype="bfloat16")
    reference = harvest(_config(tmp_path / "reference", **options))["world"]
    # The child sleeps after each shard so that the kill lands mid-harvest, whatever the machine.
    child = ("import json, sys, time\nfrom gs_lightning.harvest.model import HarvestConfig, harvest\n"
             "harvest(HarvestConfig(**json.loads(sys.argv[1])), on_shard=lambda path: time.sleep(0.5))\n")
    killed = tmp_path / "killed"
    config = json.dumps({**options, "output": str(killed), "device": "cpu"})
    process = subprocess.Popen([sys.executable, "-c", child, config], cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    while not (killed / "world" / MANIFEST).exists():  # written right after the first shard
        assert process.poll() is None and time.monotonic() < deadline, "the child ended before its first shard"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    cut = read_manifest(killed / "world")  # one shard of bucket 0, which the rerun writes again
    assert len(cut["shards"]) == 1 and cut["bucket_ends"] == [] and not cut["complete"]
    harvest(_config(killed, **options))
    assert _files(killed) == _files(reference.parent)
    manifest = read_manifest(reference)
    assert manifest["world"]["source"] == world and manifest["world"]["config"]["num_features"] == 64
    assert (reference / "model" / "synthetic_model.safetensors").is_file()


@pytest.mark.peer
@pytest.mark.slow
def test_a_saved_world_is_copied_and_sampled_from_the_bucket_seed(tmp_path) -> None:
    synthetic = pytest.importorskip("sae_lens.synthetic")
    source = tmp_path / "saved"
    synthetic.SyntheticModel(synthetic.SyntheticModelConfig.from_dict(
        yaml.safe_load(_tiny_world_file(tmp_path).read_text()))).save(source)
    folder = harvest(_config(tmp_path / "out", world=str(source), max_tokens=300, shuffle_bucket_tokens=300,
                             shard_tokens=300))["world"]
    model = synthetic.SyntheticModel.load_from_disk(source)
    torch.manual_seed(derive_seed(5, 0))
    acts, true = model.sample_with_features(300)
    manifest = read_manifest(folder)
    assert torch.equal(load_file(folder / "shard_00000.safetensors")["acts"], acts)
    assert torch.equal(read_true_acts(str(folder), manifest["shards"][0], manifest), true)
    truth = read_ground_truth(folder)
    assert torch.equal(truth.features, model.feature_dict.feature_vectors) and truth.bias.shape == (16,)
    assert (folder / "model" / "synthetic_model_config.json").is_file() and (folder / MANIFEST).is_file()


@pytest.mark.peer
@pytest.mark.slow
def test_named_worlds_are_synthsaebench() -> None:
    pytest.importorskip("sae_lens.synthetic")
    from gs_lightning.data.worlds import world_config

    paper, cpu = world_config("synthsaebench-16k"), world_config("synthsaebench-cpu")
    assert (paper["num_features"], paper["hidden_dim"], paper["hierarchy"]["total_root_nodes"]) == (16384, 768, 128)
    assert (cpu["num_features"], cpu["hidden_dim"], cpu["hierarchy"]["total_root_nodes"]) == (4096, 256, 32)
    assert {k: v for k, v in paper.items() if k not in ("num_features", "hidden_dim", "hierarchy")} == \
        {k: v for k, v in cpu.items() if k not in ("num_features", "hidden_dim", "hierarchy")}
    assert paper["firing_probability"] == {"exponent": 0.5, "max_prob": 0.4, "min_prob": 5e-4,
                                           "generator_name": "zipfian"}
    assert paper["orthogonalization"]["num_steps"] == 100 and paper["correlation"]["rank"] == 25
    assert (paper["bias"], paper["seed"]) == (0.5, 42)
