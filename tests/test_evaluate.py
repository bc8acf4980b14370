"""The evaluate table on SAEs whose answers are known: an identity SAE and a silent one."""

import csv
import json

import pytest
import torch

from gs_lightning.errors import ConfigError
from gs_lightning.evaluation.evaluate import evaluate
from gs_lightning.formats.io import save_sae
from gs_lightning.saes import JumpReLUSAE

META = {"model": "gs-lightning/tiny-gemma2-kjv", "site": "blocks.1.hook_resid_post", "text": "kjv",
        "val_split": "validation", "context_size": 64}


def _sae(threshold: float) -> JumpReLUSAE:
    sae = JumpReLUSAE(128, 128, threshold_parameterization="raw")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(128))
        sae.W_dec.copy_(torch.eye(128))
        sae.raw_threshold.fill_(threshold)
    return sae


def test_evaluate_identity_and_silent_saes(tmp_path) -> None:
    identity = save_sae(_sae(-1e9), tmp_path / "identity", input_scale=0.25, metadata=META)
    silent = save_sae(_sae(1e9), tmp_path / "silent", metadata=META)
    rows = evaluate([str(identity), str(silent)], output=str(tmp_path / "table"), n_contexts=6, batch_size=4)
    ident, mute = rows
    # Identity: every latent fires on every token, reconstruction is exact, nothing is lost.
    assert ident["l0"] == 128.0 and ident["dead_frac"] == 0.0 and ident["dense_frac"] == 1.0
    assert ident["fvu"] < 1e-10 and abs(ident["delta_loss"]) < 1e-4
    # Silent: nothing fires, x_hat = 0 is the zero ablation, FVU about the mean exceeds 1.
    assert mute["l0"] == 0.0 and mute["dead_frac"] == 1.0 and mute["dense_frac"] == 0.0
    assert mute["fvu"] > 1.0 and mute["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert ident["tokens"] == mute["tokens"] > 0
    with open(tmp_path / "table.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["sae"] for r in table] == [str(identity), str(silent)]
    assert float(table[1]["fvu"]) == pytest.approx(mute["fvu"])
    assert json.loads((tmp_path / "table.json").read_text())[0]["l0"] == 128.0
    for picture in ("table_frontier.png", "table_density.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_needs_metadata(tmp_path) -> None:
    path = save_sae(_sae(0.0), tmp_path / "bare")
    with pytest.raises(ConfigError, match="metadata lacks"):
        evaluate([str(path)], output=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="config.json is missing"):
        evaluate([str(tmp_path)], output=str(tmp_path / "t"))


def test_evaluate_and_export_through_the_command_line(tmp_path, capsys) -> None:
    from gs_lightning.cli import main

    saved = save_sae(_sae(-1e9), tmp_path / "sae", metadata={**META, "final_metrics": {"val/l0": 128.0}})
    main(["evaluate", "--saes", str(saved), "--output", str(tmp_path / "t"), "--n_contexts", "2"])  # one path
    assert "l0 128" in capsys.readouterr().out and (tmp_path / "t.csv").is_file()
    second = save_sae(_sae(1e9), tmp_path / "sae2", metadata=META)
    for saes in (f"[{saved}, {second}]", str(tmp_path / "sae*")):  # a list, and a glob
        rows = main(["evaluate", "--saes", saes, "--output", str(tmp_path / "t"), "--n_contexts", "2"])
        assert [r["sae"] for r in rows] == [str(saved), str(second)]
    with pytest.raises(SystemExit):
        main(["evaluate", "--saes", str(tmp_path / "nothing*"), "--output", str(tmp_path / "t")])
    assert "saes: the pattern" in capsys.readouterr().err
    main(["export", "--sae", str(saved), "--format", "gemma_scope", "--out", str(tmp_path / "release")])
    assert (tmp_path / "release/layer_1/width_128/average_l0_128/params.npz").is_file()
    # Several SAEs (a list or a glob): one SAELens folder each, named after its folder (after
    # the folder above it for SaveSAE's ".../<name>/sae").
    written = main(["export", "--sae", str(tmp_path / "sae*"), "--format", "saelens", "--out", str(tmp_path / "lens")])
    assert written == [tmp_path / "lens" / tmp_path.name, tmp_path / "lens" / "sae2"]
    assert all((path / "cfg.json").is_file() for path in written)
    with pytest.raises(SystemExit):  # both would land in layer_1/width_128/average_l0_128
        main(["export", "--sae", f"[{saved}, {saved}]", "--format", "gemma_scope", "--out", str(tmp_path / "r3")])
    assert "would both be written to" in capsys.readouterr().err and not (tmp_path / "r3").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--sae", str(tmp_path / "nope"), "--format", "saelens", "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gs_lightning: error:") and "nope/config.json is missing" in err


def test_run_labels_drop_lightning_folders() -> None:
    from gs_lightning.evaluation.plots import run_label

    assert run_label("runs/quickstart_relu/lightning_logs/version_3/sae") == "quickstart_relu"
    assert run_label("exports/l12_wide") == "l12_wide"
