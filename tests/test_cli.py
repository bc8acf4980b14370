"""The LightningCLI entry point, in-process: a tiny fit, --help, and clear errors for bad input."""

from pathlib import Path

import pytest
import torch
import yaml

from gs_lightning.cli import main
from gs_lightning.formats.io import load_sae, load_sae_config


def _config(root: Path, **overrides) -> dict:
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 60,
            "accelerator": "cpu",
            "devices": 1,
            "default_root_dir": str(root / "run"),
            "val_check_interval": 30,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 10,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "callbacks.SaveSAE"},
                {"class_path": "callbacks.FinalSummary"},
            ],
        },
        "model": {
            "sae": {
                "class_path": "gs_lightning.saes.JumpReLUSAE",
                "init_args": {
                    "d_in": 32,
                    "d_sae": 128,
                    "sparsity_coefficient": 1e-3,
                    "threshold_parameterization": "raw",
                },
            },
            "lr": 2e-3,
            "lr_warmup_steps": 10,
            "sparsity_warmup_steps": 30,
        },
        "data": {
            "class_path": "gs_lightning.data.SyntheticActivationDataModule",
            "init_args": {
                "d_in": 32,
                "n_features": 64,
                "active_features": 3,
                "n_tokens": 8192,
                "batch_size": 256,
            },
        },
    }
    for dotted, value in overrides.items():
        node = config
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return config


def _write(root: Path, config: dict) -> str:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_tiny_fit_trains_saves_and_reports(tmp_path, capsys) -> None:
    main(["fit", "--config", _write(tmp_path, _config(tmp_path))])
    saved = next((tmp_path / "run").rglob("sae/config.json")).parent
    config = load_sae_config(saved)
    metrics = config["metadata"]["final_metrics"]
    assert config["metadata"]["global_step"] == 60
    # Synthetic data with a 64-direction dictionary: 60 steps must explain most variance.
    assert 0.0 < metrics["val/fvu"] < 0.5
    assert metrics["val/l0"] > 0
    out = capsys.readouterr()
    assert "final (step 60): val/l0" in out.out + out.err
    sae = load_sae(saved)
    assert sae.d_sae == 128 and config["input_scale_folded"] != 1.0
    # The checkpoint holds the unfolded SAE: the saved decoder is its decoder over the input scale.
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    torch.testing.assert_close(sae.W_dec.detach(), state["sae.W_dec"] / config["input_scale_folded"])
    logged = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    for key in (
        "train/loss",
        "train/mse",
        "train/l0",
        "train/fvu",
        "train/dead_frac",
        "train/dense_frac",
        "val/never_fire_frac",
        "val/dense_frac",
        "train/lambda",
        "train/lr",
    ):
        assert key in logged


def test_validate_subcommand(tmp_path, capsys) -> None:
    main(["validate", "--config", _write(tmp_path, _config(tmp_path))])
    out = capsys.readouterr()
    assert "val/fvu" in out.out + out.err


def test_help_documents_options(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.sae.help", "gs_lightning.saes.JumpReLUSAE"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "bandwidth" in text and "width of the rectangle kernel" in text
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    assert "sparsity_warmup_steps" in text and "Linear warm-up of the sparsity coefficient" in text


def _expect_error(tmp_path: Path, capsys, config: dict, *needles: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _write(tmp_path, config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "run").exists(), "a failed start left output behind"


def test_unknown_yaml_key_is_named(tmp_path, capsys) -> None:
    config = _config(tmp_path)
    config["model"]["sae"]["init_args"]["sparsity_coeficient"] = 1.0
    _expect_error(tmp_path, capsys, config, "sparsity_coeficient")


def test_wrong_type_is_named(tmp_path, capsys) -> None:
    config = _config(tmp_path, **{"model.lr": "fast"})
    _expect_error(tmp_path, capsys, config, "lr", "fast")


def test_d_in_mismatch_is_named(tmp_path, capsys) -> None:
    config = _config(tmp_path)
    config["model"]["sae"]["init_args"]["d_in"] = 48
    _expect_error(tmp_path, capsys, config, "d_in=48", "width 32")


def test_missing_activation_file_is_named(tmp_path, capsys) -> None:
    config = _config(tmp_path)
    config["data"] = {
        "class_path": "gs_lightning.data.TensorActivationDataModule",
        "init_args": {"path": str(tmp_path / "nope.safetensors")},
    }
    _expect_error(tmp_path, capsys, config, "nope.safetensors", "does not exist")


def test_missing_model_path_is_named(tmp_path, capsys) -> None:
    config = _config(tmp_path)
    config["data"] = {"class_path": "gs_lightning.data.LiveActivationDataModule",
                      "init_args": {"model": str(tmp_path / "no-such-model")}}
    _expect_error(tmp_path, capsys, config, "no-such-model")


def test_nan_activations_stop_with_a_clear_error(tmp_path, capsys) -> None:
    from safetensors.torch import save_file

    acts = torch.randn(4096, 32)
    acts[1234, 5] = float("nan")
    save_file({"acts": acts}, str(tmp_path / "acts.safetensors"))
    config = _config(tmp_path)
    config["data"] = {"class_path": "gs_lightning.data.TensorActivationDataModule",
                      "init_args": {"path": str(tmp_path / "acts.safetensors"), "batch_size": 256}}
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _write(tmp_path, config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "acts.safetensors" in err and "NaN" in err
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("sae.safetensors"))


def test_callbacks_import_outside_the_repository(tmp_path) -> None:
    import subprocess
    import sys

    # From an unrelated folder: `callbacks` must come from the installed package.
    code = "import callbacks, gs_lightning; print(callbacks.SaveSAE.__module__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "callbacks.save_sae"


def test_bf16_mixed_fit_keeps_fp32_weights_and_threshold(tmp_path) -> None:
    fvus = {}
    for precision in ("32-true", "bf16-mixed"):
        root = tmp_path / precision
        root.mkdir()
        cli = main(["fit", "--config", _write(root, _config(root)), "--trainer.precision", precision])
        fvus[precision] = float(cli.trainer.callback_metrics["val/fvu"])
    sae = cli.model.sae
    assert sae.raw_threshold.dtype == torch.float32 and sae.W_enc.dtype == torch.float32
    # bf16 matmuls change the trajectory only slightly on this problem.
    assert fvus["bf16-mixed"] < 0.5
    assert abs(fvus["bf16-mixed"] - fvus["32-true"]) < 0.02, fvus


def test_true_half_precision_is_refused(tmp_path, capsys) -> None:
    config = _config(tmp_path)
    config["trainer"]["precision"] = "bf16-true"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", _write(tmp_path, config)])
    assert exit_info.value.code == 2
    assert "bf16-mixed" in capsys.readouterr().err


def test_close_process_group_stops_gloo_threads(tmp_path) -> None:
    # Gloo threads still running at interpreter exit abort a finished multi-process run
    # (SIGABRT); a DeviceMesh (the model-parallel strategy's) keeps its groups referenced.
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from gs_lightning.train.parallel import close_process_group

    def gloo_threads() -> int:
        names = [(Path("/proc/self/task") / t / "comm").read_text().strip() for t in os.listdir("/proc/self/task")]
        return sum(name.startswith(("pt_gloo", "gloo")) for name in names)

    before = gloo_threads()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("tensor_parallel",))
    assert mesh.get_group().size() == 1
    assert gloo_threads() > before
    close_process_group()
    assert not dist.is_initialized()
    assert gloo_threads() == before
    close_process_group()  # nothing to close: a no-op, not an error


def test_close_process_group_is_registered_at_exit_once(monkeypatch) -> None:
    # Multi-process runs built without the CLI close their groups through atexit.
    from gs_lightning.train import parallel

    registered = []
    monkeypatch.setattr(parallel.atexit, "register", registered.append)
    monkeypatch.setattr(parallel, "_closing_at_exit", False)
    parallel.close_process_group_at_exit()
    parallel.close_process_group_at_exit()
    assert registered == [parallel.close_process_group]


def test_lightningcli_optimizer_options_point_to_the_module(tmp_path, capsys) -> None:
    # LightningCLI's --optimizer/--lr_scheduler would bypass the module's parameter groups:
    # they are not offered, and asking for them names the module's options instead.
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--model.optimizer {adam,adam8bit}" in help_text
    assert "\n  --optimizer" not in help_text and "\n  --lr_scheduler" not in help_text
    config = tmp_path / "run.yaml"
    config.write_text("lr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n")
    for args in (["--optimizer", "Adam"], ["--optimizer=torch.optim.SGD"], ["--config", str(config)]):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", "configs/synthetic.yaml", *args])
        assert exit_info.value.code == 2
        assert "use model.optimizer (adam or adam8bit)" in capsys.readouterr().err
