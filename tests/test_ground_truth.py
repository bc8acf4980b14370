"""Ground-truth scores (gs_lightning.evaluation.ground_truth): hand-computed cases, streaming,
agreement with SynthSAEBench's own functions (sae_lens.synthetic), and the validation loop's
``val/mcc`` and friends."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save, save_file

from gs_lightning.data.ground_truth import GroundTruth, GroundTruthBatch
from gs_lightning.data.memory import ShuffledBatches
from gs_lightning.data.shard_format import shard_entry, write_manifest
from gs_lightning.data.shards import ShardedActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.evaluation.evaluate import evaluate_main
from gs_lightning.evaluation.ground_truth import (
    GroundTruthScorer,
    GroundTruthScores,
    score,
)
from gs_lightning.formats.io import save_sae
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule
from gs_lightning.train.packed import metric_key


def _world(n_features: int = 8, d: int = 6, rows: int = 200, seed: int = 0) -> tuple[GroundTruth, torch.Tensor]:
    """Random unit feature directions and sparse true activations (every feature on at least once)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features /= features.norm(dim=1, keepdim=True)
    true_acts = torch.rand(rows, n_features, generator=g) * (torch.rand(rows, n_features, generator=g) < 0.2)
    true_acts[:n_features] += torch.eye(n_features)
    return GroundTruth(features, torch.randn(d, generator=g)), true_acts


def test_the_true_dictionary_scores_perfectly() -> None:
    truth, true_acts = _world()
    x = true_acts @ truth.features + truth.bias
    scorer = GroundTruthScorer(truth.features, truth.features)
    scorer.update(x, x.clone(), true_acts, true_acts)
    scores = scorer.compute()
    assert scores.mcc == pytest.approx(1.0)
    assert scores.uniqueness == 1.0
    assert (scores.precision, scores.recall, scores.f1, scores.accuracy) == (1.0, 1.0, 1.0, 1.0)
    assert scores.explained_variance == 1.0 and scores.shrinkage == pytest.approx(1.0)
    assert scores.l0 == scores.true_l0 == pytest.approx(float((true_acts > 0).sum()) / 200)
    assert (scores.dead_latents, scores.dead_frac, scores.tokens) == (0, 0.0, 200)


def _hand_case() -> tuple[GroundTruthScorer, list[torch.Tensor]]:
    """Three true features in 2-d and three latents, four rows (numbers worked out in the test)."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    # latent 0 is feature 0 (longer), latent 1 is feature 1 flipped, latent 2 leans on feature 0
    W_dec = torch.tensor([[2.0, 0.0], [0.0, -1.0], [1.0, 0.1]])
    true_acts = torch.tensor([[0.5, 0.0, 0.0],   # feature 0 on
                              [1.0, 2.0, 0.0],   # features 0 and 1 on
                              [0.0, 0.0, 3.0],   # feature 2 on
                              [0.0, 0.0, 0.0]])  # nothing on
    f = torch.tensor([[1.0, 0.0, 0.0],           # latent 0 fires on rows 0 and 2
                      [0.0, -0.5, 0.0],          # latent 1 fires (negative counts) on row 1
                      [2.0, 0.0, 0.0],           # latent 2 never fires
                      [0.0, 0.0, 0.0]])
    # x and x_hat are chosen for the reconstruction scores on their own (the scorer does
    # not tie them to the latents)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
    x_hat = torch.tensor([[0.5, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    return GroundTruthScorer(W_dec, features), [x, x_hat, f, true_acts]


def test_hand_computed_scores() -> None:
    scorer, batch = _hand_case()
    scorer.update(*batch)
    scores = scorer.compute()
    # Best matches by |cos|: latents 0 -> f0 (1), 1 -> f1 (1), 2 -> f0 (1/sqrt(1.01) > 1.1/sqrt(2.02)):
    # two distinct features for three latents.
    assert scores.uniqueness == pytest.approx(2 / 3)
    # One-to-one: 0-f0, 1-f1, 2-f2 sums 2 + 1.1/sqrt(2.02) = 2.774, above 2-f0, 0-f2, 1-f1
    # (1/sqrt(1.01) + 1/sqrt(2) + 1 = 2.702).
    assert scores.mcc == pytest.approx((2 + 1.1 / math.sqrt(2.02)) / 3, abs=1e-6)
    # Latent 0 detects f0: TP row 0, FP row 2, FN row 1, TN row 3 -> P = R = F1 = 1/2, acc 2/4.
    # Latent 1 detects f1: TP row 1, TN rows 0, 2, 3 -> P = R = F1 = 1, acc 1.
    # Latent 2 (dead) detects f0: no TP, FN rows 0 and 1 -> P = R = F1 = 0, acc 2/4.
    assert scores.precision == pytest.approx(0.5)
    assert scores.recall == pytest.approx(0.5)
    assert scores.f1 == pytest.approx(0.5)
    assert scores.accuracy == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert (scores.dead_latents, scores.dead_frac) == (1, pytest.approx(1 / 3))
    assert scores.l0 == pytest.approx(3 / 4) and scores.true_l0 == pytest.approx(4 / 4)
    # Rows' mean (0.5, 1), E||x||^2 = 10/4, variance 2.5 - 1.25 = 1.25; SSE 0.25 + 1 -> MSE 0.3125.
    assert scores.explained_variance == pytest.approx(1 - 0.3125 / 1.25)
    # The zero row is skipped: ratios 0.5, 1 and sqrt(2)/sqrt(5).
    assert scores.shrinkage == pytest.approx((0.5 + 1 + math.sqrt(2 / 5)) / 3)
    assert scores.tokens == 4


def test_explained_variance_of_constant_rows() -> None:
    """No variance: 1 for an exact reconstruction, else 0 (not a division by zero)."""
    features = torch.eye(2)
    x = torch.ones(5, 2)
    for x_hat, expected in ((x.clone(), 1.0), (x * 0.9, 0.0)):
        scorer = GroundTruthScorer(features, features)
        scorer.update(x, x_hat, torch.zeros(5, 2), torch.zeros(5, 2))
        assert scorer.compute().explained_variance == expected


def test_streaming_equals_one_batch() -> None:
    truth, true_acts = _world(n_features=12, d=5, rows=300, seed=1)
    g = torch.Generator().manual_seed(2)
    W_dec = torch.randn(7, 5, generator=g)
    x = true_acts @ truth.features + truth.bias
    x_hat = x + 0.3 * torch.randn(x.shape, generator=g)
    f = torch.randn(300, 7, generator=g).relu() * (torch.rand(300, 7, generator=g) < 0.3)
    whole = GroundTruthScorer(W_dec, truth.features)
    whole.update(x, x_hat, f, true_acts)
    streamed = GroundTruthScorer(W_dec, truth.features)
    for rows in torch.arange(300).split([1, 120, 179]):
        streamed.update(x[rows], x_hat[rows], f[rows], true_acts[rows])
    expected, got = whole.compute(), streamed.compute()
    for name in GroundTruthScores._fields:
        assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-12), name


def test_shapes_are_checked() -> None:
    truth, true_acts = _world()
    scorer = GroundTruthScorer(truth.features, truth.features)
    with pytest.raises(ValueError, match="true_acts has shape"):
        scorer.update(torch.zeros(3, 6), torch.zeros(3, 6), torch.zeros(3, 8), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="same d"):
        GroundTruthScorer(torch.zeros(4, 5), truth.features)


def _half_dead_sae(d_in: int, d_sae: int, seed: int) -> JumpReLUSAE:
    """A random JumpReLU SAE whose first half of latents can fire and second half cannot."""
    torch.manual_seed(seed)
    sae = JumpReLUSAE(d_in, d_sae, threshold_init=0.05, fused=False)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.raw_threshold[d_sae // 2 :] = 1e6
    return sae


@pytest.mark.peer
def test_scores_agree_with_synthsaebench() -> None:
    pytest.importorskip("sae_lens")
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig
    from sae_lens.synthetic.evals import (
        ClassificationMetricsCalculator,
        DeadLatentsCalculator,
        L0Calculator,
        ShrinkageCalculator,
        feature_uniqueness,
        mean_correlation_coefficient,
    )

    world = SyntheticModel(SyntheticModelConfig(num_features=64, hidden_dim=16, seed=0))
    with torch.no_grad():
        x, true_acts = world.sample_with_features(3000)
        features, bias = world.feature_dict.feature_vectors.detach(), world.feature_dict.bias.detach()
        sae = _half_dead_sae(16, 40, seed=1)  # not 0: the world draws its features from seed 0 too
        f = sae.encode(x)
        x_hat = sae.decode(f, x)
    ours = score(sae, x, true_acts, GroundTruth(features, bias), batch_size=700)

    W_dec = sae.W_dec.detach()
    classification = ClassificationMetricsCalculator(W_dec, features)
    l0, true_l0, dead = L0Calculator(), L0Calculator(), DeadLatentsCalculator(40)
    shrinkage, explained = ShrinkageCalculator(), ExplainedVarianceCalculator()
    for rows in torch.arange(3000).split(700):
        classification.add_batch(f[rows], true_acts[rows])
        l0.add_batch(f[rows])
        true_l0.add_batch(true_acts[rows])
        dead.add_batch(f[rows])
        shrinkage.add_batch(x_hat[rows], x[rows])
        explained.add_batch(x_hat[rows], x[rows])
    theirs = classification.compute()
    assert 0 < l0.compute() and 20 <= dead.compute() < 40, "the comparison needs firing and dead latents"
    expected = {
        "mcc": mean_correlation_coefficient(W_dec, features), "uniqueness": feature_uniqueness(W_dec, features),
        "precision": theirs.precision, "recall": theirs.recall, "f1": theirs.f1_score,
        "accuracy": theirs.accuracy, "explained_variance": explained.compute(), "shrinkage": shrinkage.compute(),
        "l0": l0.compute(), "true_l0": true_l0.compute(), "dead_latents": dead.compute(),
        "dead_frac": dead.compute() / 40, "tokens": 3000,
    }
    assert 0 < expected["precision"] < 1 and 0 < expected["recall"] < 1
    for name, value in expected.items():
        assert getattr(ours, name) == pytest.approx(value, abs=1e-6), name


class _Batches:
    """Validation batches as one loader (Lightning reads a plain list as several)."""

    def __init__(self, batches: list[GroundTruthBatch]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class _WorldData(pl.LightningDataModule):
    """A world's rows: plain training batches, validation batches with their true activations."""

    def __init__(self, truth: GroundTruth, true_acts: torch.Tensor, n_val: int, batch_size: int) -> None:
        super().__init__()
        acts = true_acts @ truth.features + truth.bias
        self.train_rows, self.val_rows, self.val_true = acts[n_val:], acts[:n_val], true_acts[:n_val]
        self.batch_size, self.ground_truth = batch_size, truth
        self.d_in, self.input_scale = acts.shape[1], 0.5  # not 1: scores must come back in raw units

    def train_dataloader(self) -> ShuffledBatches:
        return ShuffledBatches(self.train_rows, self.batch_size, seed=0)

    def val_dataloader(self) -> _Batches:
        return _Batches([GroundTruthBatch(a, t) for a, t in zip(self.val_rows.split(self.batch_size),
                                                                self.val_true.split(self.batch_size))])


@pytest.mark.parametrize("sweep", [None, {"sparsity_coefficient": [1e-3, 1e-2]}])
def test_validation_logs_ground_truth_scores(sweep: dict | None) -> None:
    truth, true_acts = _world(n_features=24, d=8, rows=556, seed=3)
    data = _WorldData(truth, true_acts, n_val=300, batch_size=64)  # 4 training steps, 5 validation batches
    module = SAETrainingModule(JumpReLUSAE(8, 16), lr_warmup_steps=1, sparsity_warmup_steps=1, sweep=sweep)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    logged = trainer.callback_metrics
    for name, sae in module.named_saes():
        expected = score(sae, data.val_rows, data.val_true, truth, batch_size=100, input_scale=0.5)
        assert 0 < expected.f1 < 1 and expected.tokens == 300
        for key in ("mcc", "uniqueness", "precision", "recall", "f1", "shrinkage"):
            assert float(logged[metric_key(f"val/{key}", name)]) == pytest.approx(getattr(expected, key), abs=1e-6)
        assert float(logged[metric_key("val/fvu", name)]) == pytest.approx(1 - expected.explained_variance, abs=1e-5)


def test_true_activations_without_true_features_are_an_error() -> None:
    module = SAETrainingModule(JumpReLUSAE(6, 4))
    with pytest.raises(ConfigError, match="ground_truth is None"):
        module.validation_step(GroundTruthBatch(torch.zeros(3, 6), torch.zeros(3, 8)), 0)


def _write_world_harvest(folder: Path, truth: GroundTruth, true_acts: torch.Tensor, shard_rows: int) -> torch.Tensor:
    """A world harvest's site folder written by hand: shards of ``acts`` and CSR true activations,
    the manifest and ``ground_truth.safetensors``; returns the rows."""
    folder.mkdir(parents=True)
    acts = true_acts @ truth.features + truth.bias
    manifest = {"format_version": 2, "model": None, "site": "world", "d": acts.shape[1], "dtype": "float32",
                "shards": [], "world": {"source": "by hand", "n_features": true_acts.shape[1]}}
    for i, rows in enumerate(torch.arange(acts.shape[0]).split(shard_rows)):
        on = true_acts[rows] > 0
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), on.sum(1).cumsum(0)])
        data = save({"acts": acts[rows].contiguous(), "feature_indptr": indptr,
                     "feature_indices": on.nonzero()[:, 1].to(torch.int32), "feature_values": true_acts[rows][on]})
        name = f"shard_{i:05d}.safetensors"
        (folder / name).write_bytes(data)
        manifest["shards"].append(shard_entry(name, data, acts[rows], bucket=i))
    write_manifest(folder, manifest)
    save_file({"features": truth.features, "bias": truth.bias}, folder / "ground_truth.safetensors")
    return acts


def test_evaluate_scores_an_sae_on_a_world_harvest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth, true_acts = _world(n_features=24, d=8, rows=150, seed=4)
    folder = tmp_path / "harvest" / "world"
    acts = _write_world_harvest(folder, truth, true_acts, shard_rows=50)
    sae = _half_dead_sae(8, 16, seed=5)
    # As SaveSAE records it: the metadata of the datamodule that read the harvest.
    saved = save_sae(sae, tmp_path / "trained", metadata=ShardedActivationDataModule(str(folder)).metadata)
    other = save_sae(sae, tmp_path / "given")  # no metadata: scored only because --shards names a world
    expected = score(sae, acts[30:], true_acts[30:], truth)  # the last 120 rows
    for args in ([str(saved)], [str(other), "--shards", str(folder)]):
        rows = evaluate_main(["--saes", *args, "--output", str(tmp_path / "table"), "--n_rows", "120"])
        assert "no delta LM loss" in capsys.readouterr().out
        (row,) = rows
        assert 0 < row["f1"] < 1 and 0.5 <= row["dead_frac"] < 1 and row["tokens"] == 120
        for key in GroundTruthScores._fields:
            assert row[key] == pytest.approx(getattr(expected, key), abs=1e-9), key
        assert row["fvu"] == pytest.approx(1 - expected.explained_variance) and "delta_loss" not in row
        with open(tmp_path / "table.csv") as handle:
            (written,) = list(csv.DictReader(handle))
        assert float(written["mcc"]) == pytest.approx(expected.mcc) and written["delta_loss"] == ""
        assert json.loads((tmp_path / "table.json").read_text())[0]["uniqueness"] == expected.uniqueness


def test_evaluate_refuses_a_folder_without_ground_truth(tmp_path: Path) -> None:
    saved = save_sae(_half_dead_sae(8, 16, seed=5), tmp_path / "sae")
    with pytest.raises(ConfigError, match="ground_truth.safetensors"):
        evaluate_main(["--saes", str(saved), "--output", str(tmp_path / "t"), "--shards", str(tmp_path)])
