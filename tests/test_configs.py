"""Every YAML in configs/ parses against the code; the small ones run end to end."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from gs_lightning.cli import main

ALL_CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
# harvest_*.yaml configure `python -m gs_lightning harvest` and suite_*.yaml `suite`, not `fit`.
HARVEST_CONFIGS = [p for p in ALL_CONFIGS if p.name.startswith("harvest_")]
CONFIGS = [p for p in ALL_CONFIGS if p not in HARVEST_CONFIGS and not p.name.startswith("suite_")]
# Configs that need the Hugging Face hub are parsed but not instantiated.
NEEDS_HUB = {"gemma2_2b_resid_l12.yaml"}
# Configs for several devices or hosts: parsed, but a run would start processes.
MULTI_PROCESS = {"gpu_ddp.yaml", "multinode.yaml"}
# Configs trained on a synthetic world's harvest: a fake world as wide stands in (a real one needs
# SAELens and minutes).
WORLD_CONFIGS = {"synthetic_world.yaml"}


def test_configs_exist() -> None:
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "quickstart_relu.yaml", "synthetic.yaml",
                                         "quickstart_shards.yaml"} | NEEDS_HUB
    assert {p.name for p in HARVEST_CONFIGS} >= {"harvest_quickstart.yaml", "harvest_quickstart_val.yaml"}


@pytest.mark.parametrize("path", HARVEST_CONFIGS, ids=lambda p: p.name)
def test_harvest_config_parses(path: Path) -> None:
    from gs_lightning.harvest.model import HarvestConfig, build_parser

    cfg = build_parser().parse_args(["--config", str(path)])
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {f.name for f in dataclasses.fields(HarvestConfig)}
    assert all(cfg[key] == value for key, value in raw.items())


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path: Path, capsys) -> None:
    # --print_config validates every key and type against the signatures, then exits 0.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    raw = yaml.safe_load(path.read_text())
    assert printed["model"]["sae"]["class_path"].endswith(raw["model"]["sae"]["class_path"].split(".")[-1])
    assert printed["data"]["init_args"]["batch_size"] == raw["data"]["init_args"]["batch_size"]


# Per-source overrides that shrink a run to seconds without changing what it exercises.
SMALL_DATA = {
    "LiveActivationDataModule": {"batch_size": 256, "val_tokens": 2048, "buffer_tokens": 1024,
                                 "scale_estimate_tokens": 1024},
    "SyntheticActivationDataModule": {"batch_size": 256, "n_tokens": 8192},
    "ShardedActivationDataModule": {"batch_size": 256, "window_tokens": 2048},
    "AlignedShardsDataModule": {"batch_size": 256, "window_tokens": 2048},
}


def _harvest_small(root: Path) -> list[str]:
    """Harvest a few thousand tokens with the quickstart's harvest configs; the fit's data paths."""
    paths = {}
    for name, tokens in (("harvest_quickstart.yaml", 4096), ("harvest_quickstart_val.yaml", 1024)):
        config = Path(__file__).parent.parent / "configs" / name
        main(["harvest", "--config", str(config), "--output", str(root / name), "--max_tokens", str(tokens),
              "--shard_tokens", "1024", "--shuffle_bucket_tokens", "2048"])
        paths[name] = str(next((root / name).glob("*/manifest.json")).parent)
    return ["--data.init_args.path", paths["harvest_quickstart.yaml"],
            "--data.init_args.val_path", paths["harvest_quickstart_val.yaml"]]


def _harvest_small_world(root: Path, config: Path) -> list[str]:
    """Harvest a few thousand rows of a fake world as wide as the config's SAE; the fit's data path."""
    from gs_lightning.harvest.model import HarvestConfig
    from gs_lightning.harvest.world import harvest_world
    from tests.world_helpers import FakeWorld

    d_in = yaml.safe_load(config.read_text())["model"]["sae"]["init_args"]["d_in"]
    options = HarvestConfig(output=str(root), world="fake", max_tokens=4096, dtype="float32",
                            shuffle_bucket_tokens=2048, shard_tokens=1024, device="cpu")
    folders = harvest_world(options, world=FakeWorld(n_features=64, d=d_in))
    return ["--data.init_args.path", str(folders["world"])]


def _harvest_small_aligned(root: Path, config: Path) -> list[str]:
    """Harvest a few thousand tokens of every site the config streams; its data paths there."""
    data = yaml.safe_load(config.read_text())["data"]["init_args"]
    sites = [Path(p).name for p in data["input_paths"] + data.get("target_paths", [])]
    harvest = Path(__file__).parent.parent / "configs" / "harvest_quickstart_clt.yaml"
    main(["harvest", "--config", str(harvest), "--output", str(root), "--max_tokens", "4096",
          "--shard_tokens", "1024", "--shuffle_bucket_tokens", "2048"])
    inputs, targets = sites[: len(data["input_paths"])], sites[len(data["input_paths"]) :]
    return ["--data.init_args.input_paths", json.dumps([str(root / s) for s in inputs]),
            "--data.init_args.target_paths", json.dumps([str(root / s) for s in targets])]


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in NEEDS_HUB | MULTI_PROCESS], ids=lambda p: p.name)
def test_small_config_runs(path: Path, tmp_path: Path, capsys) -> None:
    source = yaml.safe_load(path.read_text())["data"]["class_path"].split(".")[-1]
    data_args = [arg for key, value in SMALL_DATA[source].items()
                 for arg in (f"--data.init_args.{key}", str(value))]
    if source == "ShardedActivationDataModule" and path.name in WORLD_CONFIGS:
        data_args += _harvest_small_world(tmp_path / "harvest", path)
    elif source == "ShardedActivationDataModule":  # CI has no harvested shards: make a tiny set
        data_args += _harvest_small(tmp_path / "harvest")
    if source == "AlignedShardsDataModule":
        data_args += _harvest_small_aligned(tmp_path / "harvest", path)
    main(["fit", "--config", str(path), "--trainer.max_steps", "6", "--trainer.val_check_interval", "3",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false", *data_args])
    out = capsys.readouterr().out
    assert "final (step 6): val/l0" in out
    if "callbacks.DeltaLMLoss" in path.read_text():
        assert "val/delta_loss" in out.split("final (step 6)")[1]
    assert list(tmp_path.rglob("sae/sae.safetensors"))


OVERLAYS = sorted((Path(__file__).parent.parent / "configs" / "overlays").glob("*.yaml"))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_overlay_parses_on_top_of_the_quickstart(path: Path, capsys) -> None:
    """An overlay adds to a run's config (e.g. the W&B logger); its keys must be CLI options."""
    root = Path(__file__).parent.parent
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(root / "configs" / "quickstart.yaml"), "--config", str(path), "--print_config"])
    assert exit_.value.code in (0, None)
    merged = yaml.safe_load(capsys.readouterr().out)
    overlay = yaml.safe_load(path.read_text())
    _assert_contains(merged, overlay, "")  # everything the overlay sets is in the merged config


def _assert_contains(merged, overlay, where: str) -> None:
    if isinstance(overlay, dict):
        for key, value in overlay.items():
            assert key in merged, f"{where}{key} missing"
            _assert_contains(merged[key], value, f"{where}{key}.")
    else:
        assert merged == overlay, where
