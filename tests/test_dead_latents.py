"""Dead latents are defined once (gs_lightning.saes.dead): the training log, the validation
loop, evaluation and the SAEs' own counters agree; TopK's token-counted window marks the
latents its former step counter did; the quadratic target-L0 penalty is the former formula."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from gs_lightning.evaluation.scoring import score
from gs_lightning.kernels.functional import target_l0_penalty
from gs_lightning.saes import BatchTopKSAE, CrossLayerTranscoder, JumpReLUSAE, TopKSAE
from gs_lightning.suite.evaluation import shard_metrics
from gs_lightning.train.module import SAETrainingModule

D, S, N, KILLED = 8, 32, 256, 8


def test_training_validation_and_evaluation_read_the_same_dead_fraction() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(N, D)
    # The SAE's own window and the log's are both the N tokens of one batch.
    sae = JumpReLUSAE(D, S, threshold_init=1e-3, bandwidth=1e-3, dead_tokens=N)
    with torch.no_grad():
        sae.b_enc[:KILLED] = -100.0  # these latents can never fire (nor AuxK revive them)
    module = SAETrainingModule(sae, lr=1e-4, lr_warmup_steps=1, sparsity_warmup_steps=1, dead_window_tokens=N)
    trainer = pl.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=DataLoader(tokens, batch_size=N))
    train = float(trainer.callback_metrics["train/dead_frac"])
    own = float(sae.dead.float().mean())
    val = trainer.validate(module, dataloaders=DataLoader(tokens, batch_size=64), verbose=False)[0]
    evaluated = score(sae.eval(), [(tokens, tokens)])["dead_frac"]
    suite = shard_metrics(sae, [tokens], [tokens])["dead_frac"]
    # Not trivially 0 or 1: the killed latents are dead, the rest fire on some of the tokens.
    assert train == own == val["val/never_fire_frac"] == evaluated == suite == KILLED / S


def test_quadratic_penalty_is_the_former_formula_by_hand() -> None:
    # (2 / T) (l0 - T)^2 at T = 4: l0 2 and 6 give 2 each, l0 4 gives 0.
    l0 = torch.tensor([2.0, 6.0, 4.0])
    assert target_l0_penalty(l0, 4).tolist() == [2.0, 2.0, 0.0]
    T = 4.0
    torch.testing.assert_close(target_l0_penalty(l0, 4), (2.0 / T) * (l0 - T).pow(2), rtol=0, atol=0)
    # JumpReLU, per token: lambda * mean_b = 0.5 * 4 / 3; on the batch's mean L0 (4): 0.
    sae = JumpReLUSAE(D, S, target_l0=4, sparsity_coefficient=0.5)
    assert sae.sparsity_terms(None, l0, 3, 1.0)["l0_penalty"].item() == pytest.approx(0.5 * 4 / 3)
    sae.target_per_token = False
    assert sae.sparsity_terms(None, l0, 3, 1.0)["l0_penalty"].item() == 0.0
    # A CLT sums it over layers, then averages over tokens: tokens (2, 6) and (4, 4) -> (4 + 0) / 2.
    clt = CrossLayerTranscoder(2, D, S, target_l0=4, sparsity_coefficient=1.0)
    block_l0 = torch.tensor([[2.0, 6.0], [4.0, 4.0]])
    assert clt.sparsity_terms(block_l0, block_l0, 2, 1.0)["l0_penalty"].item() == 2.0


def _reference_aux_k(sae: TopKSAE, x: torch.Tensor, pre: torch.Tensor, x_hat: torch.Tensor,
                     dead: torch.Tensor) -> torch.Tensor:
    """SAELens' TopK AuxK written out: the ``min(aux_k, dead)`` largest signed dead
    pre-activations reconstruct the residual, the loss scaled by ``min(dead / aux_k, 1)``."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros(())
    values, indices = pre.masked_fill(~dead, float("-inf")).topk(min(sae.aux_k, n_dead), dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, indices, values)
    error = (f_aux @ sae.decoder_rows() - (x - x_hat).detach()).pow(2).sum(-1).mean()
    return min(n_dead / sae.aux_k, 1.0) * error


@pytest.mark.parametrize("cls", [TopKSAE, BatchTopKSAE])
def test_topk_tracker_marks_the_latents_the_step_counter_did(cls: type[TopKSAE]) -> None:
    torch.manual_seed(0)
    steps, B = 3, 16
    by_steps = cls(D, S, k=2, aux_k=4, dead_steps_threshold=steps)
    by_tokens = cls(D, S, k=2, aux_k=4, dead_tokens=steps * B)
    by_tokens.load_state_dict(by_steps.state_dict())
    since = torch.zeros(S, dtype=torch.long)  # the former counter: steps since each latent fired
    batches = [torch.randn(B, D) for _ in range(2)]
    for i in range(8):
        x = batches[i % 2] if i < 5 else batches[0]  # later, the same batch: latents die
        former_dead = since >= steps
        for sae in (by_steps, by_tokens):
            out = sae.training_output(x)
            pre = sae.pre_activation(x)
            expected = sae.aux_coefficient * _reference_aux_k(sae, x, pre, out.x_hat, former_dead)
            torch.testing.assert_close(out.losses["aux_k"], expected)
        fired = by_steps.activation(by_steps.pre_activation(x)) != 0
        since = (since + 1).masked_fill(fired.any(0), 0)
        assert torch.equal(by_steps.dead, since >= steps) and torch.equal(by_tokens.dead, since >= steps)
    assert by_steps.dead.any() and not by_steps.dead.all()


def test_a_checkpoint_that_counted_steps_loads_into_tokens() -> None:
    torch.manual_seed(0)
    B = 16
    sae = TopKSAE(D, S, k=2, aux_k=4, dead_tokens=3 * B)
    old = {k: v for k, v in sae.state_dict().items() if k != "tokens_since_fired"}
    old["steps_since_fired"] = torch.tensor([0, 5, 2, 3] * (S // 4))  # as TopK saved them before
    sae.load_state_dict(old)
    x = torch.randn(B, D)
    out = sae.training_output(x)  # the first batch gives a step's size: 16 tokens
    fired = out.fire_counts > 0
    expected = (old["steps_since_fired"].double() * B + B).masked_fill(fired, 0)
    torch.testing.assert_close(sae.tokens_since_fired, expected, rtol=0, atol=0)


@pytest.mark.parametrize("aux_relu", [False, True])
def test_signed_aux_k_reaches_a_dead_latent_with_only_negative_pre_activations(aux_relu: bool) -> None:
    torch.manual_seed(0)
    sae = TopKSAE(D, S, k=2, aux_k=4, dead_tokens=8, aux_relu=aux_relu)
    with torch.no_grad():
        sae.b_enc[0] = -100.0  # latent 0 is below zero on every token
    sae.tokens_since_fired[:3] = 100.0  # latents 0-2 dead, fewer than aux_k: all three reconstruct
    out = sae.training_output(torch.randn(16, D))
    assert out.losses["aux_k"] > 0
    out.losses["aux_k"].backward()
    reached = sae.W_dec.grad[0].abs().sum().item()
    assert (reached == 0) == aux_relu  # relu'd, latent 0's value is 0 and it learns nothing
