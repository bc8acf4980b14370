"""Run records: resolved config, versions, code and data identity, final metrics; a recorded
config re-runs to the same SAE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gs_lightning.cli import main
from gs_lightning.formats.io import load_sae
from tests.test_cli import _config
from tests.test_shards import write_folder


def _run(config: dict, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (run,) = (root / "run" / "lightning_logs").iterdir()
    return run


def test_run_directory_records_the_run_and_reruns_to_the_same_sae(tmp_path) -> None:
    shards = write_folder(tmp_path / "shards", n_shards=6, rows=512)
    config = _config(tmp_path / "first", **{"trainer.max_steps": 30, "trainer.val_check_interval": 15})
    config["model"]["sae"]["init_args"]["d_in"] = 8
    config["data"] = {"class_path": "gs_lightning.data.ShardedActivationDataModule",
                      "init_args": {"path": str(shards), "batch_size": 128, "window_tokens": 1024}}
    run = _run(config, tmp_path / "first")
    record = json.loads((run / "run.json").read_text())
    assert record["packages"]["torch"] == torch.__version__
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True).stdout.strip()
    assert record["code"]["git_commit"] == head
    manifest_sha = __import__("hashlib").sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert record["data"]["manifests"] == {str(shards): manifest_sha}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 30 and {"val/fvu", "val/l0", "train/loss"} <= set(metrics["metrics"])
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["seed_everything"] == 0 and resolved["model"]["lr"] == 2e-3  # every value, defaults too
    assert resolved["model"]["adam_betas"] == [0.0, 0.999]
    # Re-running the recorded config (elsewhere) reproduces the SAE bit for bit.
    resolved["trainer"]["default_root_dir"] = str(tmp_path / "again" / "run")
    rerun = _run(resolved, tmp_path / "again")
    first, second = load_sae(run / "sae"), load_sae(rerun / "sae")
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.slow
def test_cli_runs_ddp_and_records_once(tmp_path) -> None:
    """Two gloo processes through `python -m gs_lightning fit`: the record is written by rank 0
    without deadlocking the other rank (log_dir is a collective)."""
    config = _config(tmp_path, **{"trainer.max_steps": 6, "trainer.val_check_interval": 6,
                                  "trainer.devices": 2, "trainer.strategy": "ddp"})
    # SavePlots measures on rank 0 alone: its metrics once waited at compute() for rank 1,
    # which had left fit, and the run hung.
    config["trainer"]["callbacks"] = [{"class_path": "callbacks.SaveSAE"}, {"class_path": "callbacks.SavePlots"}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    repo = Path(__file__).parents[1]
    done = subprocess.run([sys.executable, "-m", "gs_lightning", "fit", "--config", str(path)], cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "run" / "lightning_logs").iterdir()
    record = json.loads((run / "run.json").read_text())
    assert record["world_size"] == 2
    assert json.loads((run / "metrics.json").read_text())["step"] == 6
    assert (run / "plots" / "frontier.png").stat().st_size > 0


def test_wandb_overlay_keeps_versioned_run_folders(tmp_path, monkeypatch) -> None:
    """With only a WandbLogger configured, trainer.log_dir would be W&B's one save_dir for every
    run (a second run overwriting the first one's SAE): the CLI puts a CSVLogger first."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(tmp_path, **{"trainer.max_steps": 4, "trainer.val_check_interval": 4})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    overlay = str(Path(__file__).parents[1] / "configs" / "overlays" / "wandb.yaml")
    dirs = []
    for _ in range(2):
        cli = main(["fit", "--config", str(path), "--config", overlay, f"--trainer.logger.init_args.save_dir={tmp_path}/wb"])
        assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger", "WandbLogger"]
        dirs.append(Path(cli.trainer.log_dir))
        cli.trainer.loggers[1].experiment.finish()
    assert dirs == [tmp_path / "run" / "lightning_logs" / f"version_{i}" for i in (0, 1)]
    assert all((d / "sae" / "sae.safetensors").is_file() and (d / "run.json").is_file() for d in dirs)
    assert len(list((tmp_path / "wb" / "wandb").glob("offline-run-*"))) == 2
