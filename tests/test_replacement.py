"""The replacement model (every written site replaced at once) on the embedded Gemma 2:
one part against the single-site splice, a set of per-layer transcoders against an
independent hook-by-hook reference, a CLT without cross-layer decoders against those same
transcoders, per-site FVU and L0 against brute force, and acausal dictionaries refused."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from gs_lightning.errors import ConfigError
from gs_lightning.evaluation import ReplacementPart, check_causal, replacement_metrics
from gs_lightning.evaluation.evaluate import reconstruction_metrics
from gs_lightning.evaluation.splice import delta_lm_loss
from gs_lightning.lm.load import shared_language_model
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.saes.clt import CrossLayerTranscoder

MODEL = "gs-lightning/tiny-gemma2-kjv"
L, D, N = 2, 128, 64  # the first two of the embedded model's layers, 64 latents each


def _mid(l: int) -> str:
    return f"blocks.{l}.hook_resid_mid"


def _out(l: int) -> str:
    return f"blocks.{l}.hook_mlp_out"


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = shared_language_model(MODEL)
    contexts = list(itertools.islice(iter_contexts(iter_texts("kjv", split="validation"), tokenizer, 32), 6))
    return model, tokenizer, contexts


def _clt(cross: bool, seed: int = 0) -> CrossLayerTranscoder:
    """A CLT whose latents fire (a third of them or so) and whose outputs are of the MLP
    outputs' size; without ``cross`` its decoders write only to their own layer."""
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(L, D, L * N)
    with torch.no_grad():
        clt.W_enc.mul_(0.05)
        clt.raw_threshold.fill_(0.05)
        for W in clt.W_dec:
            W.mul_(2.0)
            if not cross:
                W[:, 1:] = 0
        clt.b_dec.normal_(0, 0.1)
    return clt


def _transcoders(clt: CrossLayerTranscoder) -> list[JumpReLUSAE]:
    """Layer l of a CLT without cross-layer decoders, as a JumpReLU transcoder."""
    out = []
    for l in range(L):
        t = JumpReLUSAE(D, N, d_out=D, threshold_init=0.05)
        t.load_canonical_state_dict({"W_enc": clt.W_enc[l], "b_enc": clt.b_enc[l], "threshold": clt.threshold[l],
                                     "W_dec": clt.W_dec[l][:, 0], "b_dec": clt.b_dec[l]})
        out.append(t)
    return out


def _parts(transcoders: list[JumpReLUSAE]) -> list[ReplacementPart]:
    return [ReplacementPart(t, [_mid(l)], [_out(l)], name=f"T{l}") for l, t in enumerate(transcoders)]


def test_one_part_is_the_single_site_splice(lm) -> None:
    model, tokenizer, contexts = lm
    t = _transcoders(_clt(cross=False))[1]
    got = replacement_metrics(model, tokenizer, [ReplacementPart(t, [_mid(1)], [_out(1)])], contexts, 4)
    splice = delta_lm_loss(model, tokenizer, t, _out(1), contexts, 4, source_site=_mid(1))
    clean = reconstruction_metrics(t, model, tokenizer, _mid(1), contexts, 4, target_site=_out(1))
    assert got["delta_loss"] == pytest.approx(splice["delta_loss"], rel=1e-6) and got["delta_loss"] > 0.01
    assert got["kl"] == pytest.approx(splice["kl"], rel=1e-6)
    assert got["fvu_sites"][_out(1)] == pytest.approx(clean["fvu"], rel=1e-6)
    assert got["l0"] == pytest.approx(clean["l0"], rel=1e-6) and 2 < got["l0"] < N - 2
    assert got["tokens"] == splice["tokens"]


def _reference_ce(model, tokenizer, transcoders: list[JumpReLUSAE], contexts) -> tuple[float, float]:
    """Clean and replaced CE, written hook by hook without the package's splice machinery:
    layer l's MLP output becomes T_l(resid_mid of the same, already replaced, pass)."""
    layers = model.model.layers
    seen: dict[int, torch.Tensor] = {}
    active = {"on": False}
    handles = []
    for l, t in enumerate(transcoders):
        def keep(_m, args, l=l):
            seen[l] = args[0]
        def replace(_m, _a, out, l=l, t=t):
            if active["on"]:
                mask = content_mask(ids, tokenizer).unsqueeze(-1)
                return torch.where(mask, t(seen[l].float()).to(out.dtype), out)
            return None
        handles.append(layers[l].pre_feedforward_layernorm.register_forward_pre_hook(keep))
        handles.append(layers[l].post_feedforward_layernorm.register_forward_hook(replace))
    totals, count = [0.0, 0.0], 0
    try:
        for start in range(0, len(contexts), 4):
            ids = torch.stack(contexts[start : start + 4])
            keep_pos = content_mask(ids, tokenizer)[:, :-1]
            for k, on in enumerate((False, True)):
                active["on"] = on
                with torch.no_grad():
                    logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
                totals[k] -= float(logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)[keep_pos].sum())
            count += int(keep_pos.sum())
    finally:
        for h in handles:
            h.remove()
    return totals[0] / count, totals[1] / count


def test_per_layer_transcoders_against_a_hand_written_replacement(lm) -> None:
    model, tokenizer, contexts = lm
    transcoders = _transcoders(_clt(cross=False))
    got = replacement_metrics(model, tokenizer, _parts(transcoders), contexts, 4)
    clean, replaced = _reference_ce(model, tokenizer, transcoders, contexts)
    assert got["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert got["ce_replaced"] == pytest.approx(replaced, rel=1e-5)
    # Compounding: both layers at once cost more than either alone.
    alone = [replacement_metrics(model, tokenizer, [p], contexts, 4)["delta_loss"] for p in _parts(transcoders)]
    assert got["delta_loss"] > max(alone)


def test_clt_without_cross_decoders_equals_the_transcoder_set(lm) -> None:
    model, tokenizer, contexts = lm
    clt = _clt(cross=False)
    as_clt = replacement_metrics(model, tokenizer, [ReplacementPart(clt, [_mid(0), _mid(1)], [_out(0), _out(1)])],
                                 contexts, 4)
    as_set = replacement_metrics(model, tokenizer, _parts(_transcoders(clt)), contexts, 4)
    for key in ("ce_replaced", "delta_loss", "kl", "fvu", "l0", "dead_frac"):
        assert as_clt[key] == pytest.approx(as_set[key], rel=1e-5), key
    for site in (_out(0), _out(1)):
        assert as_clt["fvu_sites"][site] == pytest.approx(as_set["fvu_sites"][site], rel=1e-5)
    assert as_clt["l0_sites"][_mid(0)] == pytest.approx(as_set["l0_sites"][_mid(0)], rel=1e-6)
    # Cross-layer decoders change layer 1's output only.
    crossed = replacement_metrics(model, tokenizer, [ReplacementPart(_clt(cross=True), [_mid(0), _mid(1)],
                                                                    [_out(0), _out(1)])], contexts, 4)
    assert crossed["fvu_sites"][_out(0)] == pytest.approx(as_clt["fvu_sites"][_out(0)], rel=1e-6)
    assert crossed["fvu_sites"][_out(1)] != pytest.approx(as_clt["fvu_sites"][_out(1)], rel=1e-3)


def test_per_site_l0_and_fvu_against_brute_force(lm) -> None:
    model, tokenizer, contexts = lm
    clt = _clt(cross=True)
    got = replacement_metrics(model, tokenizer, [ReplacementPart(clt, [_mid(0), _mid(1)], [_out(0), _out(1)])],
                              contexts, 4)
    from gs_lightning.lm.sites import ActivationExtractor

    with ActivationExtractor(model, [_mid(0), _mid(1), _out(0), _out(1)]) as extract:
        ids = torch.stack(contexts)
        acts = extract(ids)
    mask = content_mask(ids, tokenizer)
    x = torch.stack([acts[_mid(l)][mask].float() for l in range(L)], 1)
    y = torch.stack([acts[_out(l)][mask].float() for l in range(L)], 1)
    with torch.no_grad():
        f = clt.encode(x)
        y_hat = clt.decode(f)
    for l in range(L):
        assert got["l0_sites"][_mid(l)] == pytest.approx(float((f[:, l * N : (l + 1) * N] != 0).sum(-1).float().mean()),
                                                         rel=1e-5)
        res = (y[:, l] - y_hat[:, l]).pow(2).sum()
        total = (y[:, l] - y[:, l].mean(0)).pow(2).sum()
        assert got["fvu_sites"][_out(l)] == pytest.approx(float(res / total), rel=1e-4)
    assert got["l0"] == pytest.approx(float((f != 0).sum(-1).float().mean()), rel=1e-5)


class _Acausal(CrossLayerTranscoder):
    """Layer 0's output also reads layer 1's latents: not computable in one forward pass."""

    def decode(self, f, x=None):
        y = super().decode(f, x)
        return y + y[..., -1:, :].flip(-2)


def test_acausal_and_mismatched_dictionaries_are_refused() -> None:
    clt = _clt(cross=True)
    check_causal(ReplacementPart(clt, [_mid(0), _mid(1)], [_out(0), _out(1)]))  # causal: passes
    bad = _Acausal(L, D, L * N)
    with pytest.raises(ConfigError, match="depends on inputs after blocks.0.hook_resid_mid"):
        check_causal(ReplacementPart(bad, [_mid(0), _mid(1)], [_out(0), _out(1)], name="bad"))
    with pytest.raises(ConfigError, match="stacks 2 input sites"):
        ReplacementPart(clt, [_mid(0)], [_out(0), _out(1)])
    with pytest.raises(ConfigError, match="reads one site and writes one"):
        ReplacementPart(_transcoders(clt)[0], [_mid(0), _mid(1)], [_out(0)])


def test_a_site_written_twice_is_refused(lm) -> None:
    model, tokenizer, contexts = lm
    t = _transcoders(_clt(cross=False))
    parts = [ReplacementPart(t[0], [_mid(0)], [_out(0)]), ReplacementPart(t[1], [_mid(1)], [_out(0)])]
    with pytest.raises(ConfigError, match="several dictionaries replace"):
        replacement_metrics(model, tokenizer, parts, contexts, 4)


def test_evaluate_scores_a_clt_and_a_transcoder_set_as_replacement_models(lm, tmp_path) -> None:
    from gs_lightning.evaluation.evaluate import evaluate
    from gs_lightning.formats.io import save_sae

    model, tokenizer, contexts = lm
    meta = {"model": MODEL, "text": "kjv", "val_split": "validation", "context_size": 32}
    clt = _clt(cross=True)
    save_sae(clt, tmp_path / "clt", [1.0, 1.0], {**meta, "site": "span", "input_sites": [_mid(0), _mid(1)],
                                                "target_sites": [_out(0), _out(1)]}, [1.0, 1.0])
    transcoders = _transcoders(_clt(cross=False))
    for l, t in enumerate(transcoders):
        save_sae(t, tmp_path / f"t{l}", 1.0, {**meta, "site": _mid(l), "target_site": _out(l)}, 1.0)
    [row] = evaluate(str(tmp_path / "clt"), output=str(tmp_path / "clt_eval"), n_contexts=6, batch_size=4)
    want = replacement_metrics(model, tokenizer, [ReplacementPart(clt, [_mid(0), _mid(1)], [_out(0), _out(1)])],
                               contexts, 4)
    assert row["delta_loss"] == pytest.approx(want["delta_loss"], rel=1e-6)
    assert row["fvu_sites"] == pytest.approx(want["fvu_sites"], rel=1e-6)
    assert row["site"] == f"{_mid(0)} .. {_mid(1)} (2 sites) -> {_out(0)} .. {_out(1)} (2 sites)"
    [together] = evaluate([str(tmp_path / 't0'), str(tmp_path / 't1')], output=str(tmp_path / "set"), n_contexts=6,
                          batch_size=4, together=True)
    want = replacement_metrics(model, tokenizer, _parts(transcoders), contexts, 4)
    assert together["delta_loss"] == pytest.approx(want["delta_loss"], rel=1e-6)
    assert together["l0_sites"] == pytest.approx(want["l0_sites"], rel=1e-6) and together["d_sae"] == 2 * N
    alone = evaluate(str(tmp_path / "t*"), output=str(tmp_path / "alone"), n_contexts=6, batch_size=4)
    assert len(alone) == 2 and max(r["delta_loss"] for r in alone) < together["delta_loss"]
    assert json.loads((tmp_path / "set.json").read_text())[0]["fvu_sites"].keys() == {_out(0), _out(1)}


def test_resid_mid_is_read_but_never_replaced(lm) -> None:
    """Rewriting the pre-MLP norm's input leaves the residual stream as it was: no delta LM loss."""
    model, tokenizer, contexts = lm
    sae = JumpReLUSAE(D, N)
    with pytest.raises(ConfigError, match="hook_resid_mid' cannot be replaced"):
        delta_lm_loss(model, tokenizer, sae, _mid(1), contexts, 4)
    with pytest.raises(ConfigError, match="cannot be replaced"):
        replacement_metrics(model, tokenizer, [ReplacementPart(sae, [_mid(1)], [_mid(1)])], contexts, 4)


def test_evaluate_gives_a_crosscoder_its_per_site_fvu_without_a_delta_loss(lm, tmp_path, capsys) -> None:
    from gs_lightning.evaluation.evaluate import evaluate
    from gs_lightning.formats.io import save_sae
    from gs_lightning.saes import Crosscoder

    model, tokenizer, contexts = lm
    cc = Crosscoder(L, D, L * N)  # acausal, on hook_resid_mid: neither can be spliced
    meta = {"model": MODEL, "text": "kjv", "val_split": "validation", "context_size": 32, "site": "span",
            "input_sites": [_mid(0), _mid(1)]}
    save_sae(cc, tmp_path / "cc", [1.0, 1.0], meta)
    [row] = evaluate(str(tmp_path / "cc"), output=str(tmp_path / "cc_eval"), n_contexts=6, batch_size=4)
    assert "no delta LM loss" in capsys.readouterr().out and "delta_loss" not in row
    from gs_lightning.evaluation.replacement import clean_metrics

    want = clean_metrics(model, tokenizer, [ReplacementPart(cc, [_mid(0), _mid(1)], [_mid(0), _mid(1)])], contexts, 4)
    assert row["fvu_sites"] == pytest.approx(want["fvu_sites"], rel=1e-6) and len(row["fvu_sites"]) == 2
    assert list(row["l0_sites"]) == [f"{_mid(0)} .. {_mid(1)}"]  # acausal latents belong to no one site
