"""Suites: a small suite end to end, its release loads back, it resumes after kill -9 to the
same release, it retrains only what a changed YAML affects, and bad input fails before work."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from gs_lightning import load_sae
from gs_lightning.cli import main
from gs_lightning.data.shard_format import MANIFEST
from gs_lightning.suite.cli import build_parser, config_from
from gs_lightning.suite.run import plan_groups
from tests.suite_helpers import suite_yaml, write

REPO = Path(__file__).resolve().parents[1]


def run_suite(config: dict, tmp_path: Path, *extra: str) -> list[dict]:
    return main(["suite", "--config", str(write(config, tmp_path / "suite.yaml")), *extra])  # type: ignore[return-value]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted tiny suite (the reference for the other tests)."""
    root = tmp_path_factory.mktemp("suite")
    run_suite(suite_yaml(root / "out"), root)
    return root / "out"


def release_weights(output: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every params.npz of a release, by its path in the release."""
    release = output / "release"
    weights = {}
    for path in sorted(release.glob("tiny-*/**/params.npz")):
        with np.load(path, allow_pickle=False) as npz:
            weights[str(path.relative_to(release))] = {k: npz[k] for k in npz.files}
    return weights


def test_small_suite_end_to_end(finished: Path) -> None:
    rows = json.loads((finished / "suite.json").read_text())
    assert len(rows) == 2 * 2 * 2  # layers x site kinds x sparsity levels
    assert {(r["kind"], r["layer"]) for r in rows} == {("res", 0), ("res", 2), ("att", 0), ("att", 2)}
    for row in rows:
        assert 0 < row["l0"] <= 64 and 0 < row["fvu"] < 5 and row["eval_tokens"] == 1024
        assert row["delta_loss"] > 0  # an SAE trained for 20 steps makes the model worse
        # One packed run per (site, width): its shards were read once for both levels.
        assert row["passes_over_shards"] == 1.0
    # The stronger penalty gives the lower L0 at every site.
    by_site = {}
    for row in rows:
        by_site.setdefault(row["site"], {})[row["sparsity"]] = row["l0"]
    assert all(levels[0.01] < levels[0.001] for levels in by_site.values())
    csv_lines = (finished / "suite.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows)
    page = (finished / "report" / "report.md").read_text()
    for figure in ("fvu_by_layer.png", "delta_loss_by_layer.png", "frontier.png"):
        assert f"]({figure})" in page and (finished / "report" / figure).stat().st_size > 10_000


def test_release_loads_back_with_the_trained_weights(finished: Path) -> None:
    index = json.loads((finished / "release" / "index.json").read_text())
    assert len(index) == 8
    x = torch.randn(32, 128)
    for entry in index:
        assert entry["gemma_scope"].startswith(f"tiny-{entry['kind']}/layer_{entry['layer']}/width_64/average_l0_")
        trained = load_sae(finished / entry["source"])
        for fmt in ("gemma_scope", "saelens"):
            released = load_sae(finished / "release" / entry[fmt])
            torch.testing.assert_close(released(x), trained(x), rtol=0, atol=1e-6)
    directory = yaml.safe_load((finished / "release" / "pretrained_saes.yaml").read_text())
    assert sorted(directory) == ["tiny-att", "tiny-res"]
    for release in directory.values():
        for sae in release["saes"]:
            assert (Path(release["repo_id"]) / sae["path"] / "cfg.json").is_file()


@pytest.mark.peer
def test_release_loads_in_saelens(finished: Path) -> None:
    sae_lens = pytest.importorskip("sae_lens")
    index = json.loads((finished / "release" / "index.json").read_text())
    x = torch.randn(32, 128)
    for entry in index:
        theirs = sae_lens.SAE.load_from_disk(str(finished / "release" / entry["saelens"]), device="cpu")
        ours = load_sae(finished / entry["source"])
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x), rtol=1e-5, atol=1e-5)


def _suite_process(config_path: Path, *extra: str) -> subprocess.Popen:
    # One thread: bit-equal weights need the same matmul blocking in both runs.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "gs_lightning", "suite", "--config", str(config_path), *extra],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_kill_9_mid_run_resumes_to_the_same_release(tmp_path: Path) -> None:
    long = {"widths": [{"d_sae": 64, "tokens": 25600, "sparsity": {"sparsity_coefficient": [0.001, 0.01]}}],
            "sites": ["blocks.{L}.hook_resid_post"]}
    # The reference runs its two groups at once (--devices 2, a process each): the same
    # release as one after another, as the killed and resumed run must give too.
    reference = tmp_path / "reference"
    reference_yaml = write(suite_yaml(reference, **long), tmp_path / "reference.yaml")
    assert _suite_process(reference_yaml, "--devices", "2").wait() == 0

    output = tmp_path / "out"
    config_path = write(suite_yaml(output, **long), tmp_path / "suite.yaml")
    groups = [g.id for g in plan_groups(config_from(build_parser().parse_args(["--config", str(config_path)]))[0])]
    first, second = (output / "groups" / g for g in groups)
    process = _suite_process(config_path)
    deadline = time.monotonic() + 300
    # Kill once the first group is finished and the second has checkpointed mid-run.
    while not ((first / "eval.json").is_file() and (second / "last.ckpt").is_file()):
        assert process.poll() is None, "the suite ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads((second / "state.json").read_text())["status"] == "new"  # killed mid-training
    untouched = [first / "eval.json", first / "state.json", *first.glob("saes/*/sae/sae.safetensors")]
    before = {p: p.stat().st_mtime_ns for p in untouched}

    assert _suite_process(config_path).wait() == 0
    # The finished group was not retrained (its files untouched); the killed one resumed.
    assert {p: p.stat().st_mtime_ns for p in untouched} == before
    assert json.loads((second / "state.json").read_text())["resumed"] is True
    ours, theirs = release_weights(output), release_weights(reference)
    assert sorted(ours) == sorted(theirs) and len(ours) == 4
    for name in ours:
        for key in ours[name]:
            np.testing.assert_array_equal(ours[name][key], theirs[name][key], err_msg=f"{name}:{key}")


def test_changed_entry_retrains_only_what_it_affects(finished: Path, tmp_path: Path) -> None:
    # A copy of the finished suite, asked for one more layer: only that layer's sites are
    # harvested and only its groups train.
    output = tmp_path / "out"
    shutil.copytree(finished, output, ignore=shutil.ignore_patterns("release", "report"))
    before = {p: p.stat().st_mtime_ns for p in output.glob("groups/*/eval.json")}
    assert len(before) == 4
    rows = run_suite(suite_yaml(output, layers=[0, 1, 2]), tmp_path)
    assert len(rows) == 12
    assert {p: p.stat().st_mtime_ns for p in before} == before  # layers 0 and 2 were not retrained
    assert sorted(r["layer"] for r in rows if (output / r["sae"]).is_dir()) == [0] * 4 + [1] * 4 + [2] * 4
    # The same model, text and seed: the copied groups' rows are the reference's.
    reference = {r["sae"]: r["fvu"] for r in json.loads((finished / "suite.json").read_text())}
    assert {r["sae"]: r["fvu"] for r in rows if r["layer"] != 1} == reference
    # Changed evaluation options evaluate again without retraining.
    weights = {p: p.stat().st_mtime_ns for p in output.glob("groups/*/saes/*/sae/sae.safetensors")}
    rows = run_suite(suite_yaml(output, layers=[0, 1, 2], evaluate={"n_contexts": 2, "batch_size": 2}), tmp_path)
    assert {p: p.stat().st_mtime_ns for p in weights} == weights
    assert all(p.stat().st_mtime_ns != before[p] for p in before)
    assert {r["sae"]: r["fvu"] for r in rows if r["layer"] != 1} == reference  # same held-out rows
    # A changed sparsity list retrains every group of that width (and only those).
    width = {"d_sae": 64, "tokens": 5120, "sparsity": {"sparsity_coefficient": [0.001, 0.003]}}
    rows = run_suite(suite_yaml(output, layers=[0, 1, 2], widths=[width]), tmp_path)
    assert {r["sparsity"] for r in rows} == {0.001, 0.003}
    assert all(not p.exists() or p.stat().st_mtime_ns != weights[p] for p in weights)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layers": [7]}, "layers: 7 is not a layer"),
        ({"sites": ["blocks.{L}.hook_nonsense"]}, "sites[0]='blocks.{L}.hook_nonsense'"),
        ({"sites": ["blocks.9.hook_resid_post"], "layers": None}, "sites[0]='blocks.9.hook_resid_post': matches no"),
        ({"sites": []}, "sites: the list is empty"),
        ({"widths": []}, "widths: the list is empty"),
        ({"widths": [{"d_sae": 64, "tokens": 512, "sparsity": {"target_l0": []}}]},
         "widths[0].sparsity.target_l0: the list of levels is empty"),
        ({"recipe": {"sae": {"class_path": "gs_lightning.saes.JumpReLUSAE", "init_args": {"d_sae": 8}}}},
         "recipe.sae.init_args.d_sae"),
        ({"harvest": {"dtype": "float8"}}, "harvest.dtype"),
        ({"trainer": {"accelerator": "cpu", "devices_per_group": 0}}, "trainer.devices_per_group=0 must be at least 1"),
    ],
)
def test_bad_input_fails_before_any_work(tmp_path: Path, capsys, overrides: dict, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_suite(suite_yaml(tmp_path / "out", **overrides), tmp_path)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_harvest_that_disagrees_with_the_suite_is_named(finished: Path, tmp_path: Path, capsys) -> None:
    config = suite_yaml(finished, harvest={**suite_yaml(finished)["harvest"], "dtype": "bfloat16"})
    before = sorted(p.name for p in (finished / "groups").iterdir())
    with pytest.raises(SystemExit):
        run_suite(config, tmp_path)
    err = capsys.readouterr().err
    assert f"{finished / 'harvest' / 'train' / 'blocks.0.hook_resid_post' / MANIFEST}" in err
    assert "dtype='float32' but the suite asks for 'bfloat16'" in err
    assert sorted(p.name for p in (finished / "groups").iterdir()) == before


def test_transcoder_suite_releases_in_the_gemma_scope_layout(tmp_path: Path) -> None:
    sites = ["blocks.{L}.hook_mlp_in -> blocks.{L}.hook_mlp_out"]
    rows = run_suite(suite_yaml(tmp_path / "out", sites=sites, layers=[1]), tmp_path)
    assert [(r["kind"], r["site"]) for r in rows] == [("transcoder", "blocks.1.hook_mlp_in -> blocks.1.hook_mlp_out")] * 2
    index = json.loads((tmp_path / "out" / "release" / "index.json").read_text())
    x = torch.randn(16, 128)
    for entry in index:
        assert entry["gemma_scope"].startswith("tiny-transcoder/layer_1/width_64/")
        assert entry["saelens"] is not None  # as SAELens' jumprelu_transcoder
        source = load_sae(tmp_path / "out" / entry["source"])(x)
        for layout in ("gemma_scope", "saelens"):
            released = load_sae(tmp_path / "out" / "release" / entry[layout])
            torch.testing.assert_close(released(x), source, rtol=0, atol=1e-6, msg=layout)
