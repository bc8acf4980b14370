"""The feature browser end to end on a tiny harvest of the embedded model: the site's data
equal the collected figures, the Neuronpedia JSON has SAEDashboard's fields, and, in a
real headless Chromium opened from file://, search, the latent view, its highlighted
peak token and its numbers match what Python computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from callbacks import BuildBrowser, SaveSAE
from gs_lightning.browse import collect
from gs_lightning.browse.build import browse
from gs_lightning.browse.records import token_strings
from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.formats.io import save_sae
from gs_lightning.harvest.model import HarvestConfig, harvest
from gs_lightning.lm.load import load_language_model
from gs_lightning.saes import JumpReLUSAE
from gs_lightning.train.module import SAETrainingModule

SITE = "blocks.1.hook_resid_post"
D_SAE = 48
OPTIONS = {"k": 4, "intervals": 3, "samples": 2, "before": 4, "after": 2}
# The fields SAEDashboard's Neuronpedia export writes per feature and per activation.
NEURONPEDIA_FEATURE = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
    "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"}
NEURONPEDIA_ACTIVATION = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("browse")
    config = HarvestConfig(output=str(root / "harvest"), sites=[SITE], context_size=32, model_batch_size=4,
                           max_tokens=1200, dtype="float32", shuffle_bucket_tokens=400, shard_tokens=200, seed=1)
    folder = harvest(config)[SITE]
    torch.manual_seed(0)
    sae = JumpReLUSAE(128, D_SAE).eval()
    with torch.no_grad():  # thresholds low enough that most latents fire
        sae.threshold.fill_(0.02)
    path = save_sae(sae, root / "run" / "sae", 1.0, {"model": config.model, "site": SITE, "text": "kjv",
                                                    "context_size": 32})
    [index] = browse(str(path), shards=str(folder), output=str(root / "site"), **OPTIONS)
    data = collect(sae, folder, k=OPTIONS["k"], intervals=OPTIONS["intervals"], samples=OPTIONS["samples"])
    _, tokenizer = load_language_model(config.model)
    return {"index": index, "data": data, "strings": token_strings(tokenizer), "sae_path": path, "folder": folder}


def _js_data(path: Path, prefix: str) -> object:
    """The JSON inside one of the site's data scripts (``<prefix>{json}`` and ``;`` or ``);``)."""
    text = path.read_text().strip()
    suffix = ");" if prefix.endswith(("(", ", ")) else ";"
    assert text.startswith(prefix) and text.endswith(suffix), path
    return json.loads(text[len(prefix):-len(suffix)])


def _records(index: Path) -> list[dict]:
    records = []
    for chunk in sorted((index.parent / "data" / "latents").glob("chunk_*.js")):
        number = int(chunk.stem.split("_")[1])
        records += _js_data(chunk, f"GS_CHUNK({number}, ")
    return records


def test_site_data_equal_the_collected_figures(site) -> None:
    data = site["data"]
    records = _records(site["index"])
    assert [r["id"] for r in records] == list(range(D_SAE))
    fired = [r for r in records if r["count"]]
    assert len(fired) > D_SAE // 2  # the test means something only if latents fire
    for r in records:
        i = r["id"]
        assert r["count"] == int(data.count[i]) and r["max"] == pytest.approx(float(data.max[i]))
        assert "input_neighbours" not in r  # only transcoders have an input side apart
        assert r["frequency"] == pytest.approx(int(data.count[i]) / data.tokens)
        top = r["groups"][0]
        assert top["kind"] == "top" and len(top["examples"]) == int((data.top_keys[i] >= 0).sum())
        for example, value, key in zip(top["examples"], data.top_values[i], data.top_keys[i]):
            # The peak token is the example's own token and carries the collected value.
            assert example["context_id"] * 32 + example["position"] == int(key)
            assert example["values"][example["peak"]] == pytest.approx(float(value), abs=1e-4)
        if top["examples"]:
            first = top["examples"][0]
            assert max(first["values"]) == pytest.approx(first["values"][first["peak"]], abs=1e-4)
    # The index rows: flags and search text come from the records.
    index = _js_data(site["index"].parent / "data" / "index.js", "const GS_INDEX = ")
    flags = {row[0]: row[5] for row in index["rows"]}
    assert {i for i, flag in flags.items() if flag == "dead"} == {r["id"] for r in records if r["count"] == 0}
    assert sum(row[4] for row in index["rows"]) == pytest.approx(1.0)  # L0 shares
    for row in index["rows"]:  # search text: the tokens the top examples fire on
        tops = records[row[0]]["groups"][0]["examples"]
        assert row[6].split() == list(dict.fromkeys(t for e in tops if (t := e["tokens"][e["peak"]].strip())))[:6]


def test_token_strings_spell_the_text() -> None:
    # Byte-level BPE spells bytes as characters (a curly quote is 3 of them): mapped back.
    _, tokenizer = load_language_model("gs-lightning/tiny-gemma2-kjv")
    strings = token_strings(tokenizer)
    text = "And Simon’s house stood round about;\nthe LORD’s temple."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "".join(strings[i] for i in ids) == text == tokenizer.decode(ids)


def test_neuronpedia_json_has_the_saedashboard_fields(site) -> None:
    folder = site["index"].parent / "neuronpedia"
    batches = [json.loads(p.read_text()) for p in sorted(folder.glob("batch-*.json"))]
    features = [f for b in batches for f in b["features"]]
    assert [f["feature_index"] for f in features] == list(range(D_SAE))
    assert {b["layer"] for b in batches} == {1} and {b["sae_set"] for b in batches} == {SITE}
    records = {r["id"]: r for r in _records(site["index"])}
    for feature in features:
        assert set(feature) == NEURONPEDIA_FEATURE
        record = records[feature["feature_index"]]
        assert feature["frac_nonzero"] == pytest.approx(record["frequency"])
        assert feature["pos_str"] == [t for t, _ in record["effects"][0]["promoted"]]
        assert len(feature["activations"]) == sum(len(g["examples"]) for g in record["groups"])
        for activation in feature["activations"]:
            assert set(activation) == NEURONPEDIA_ACTIVATION
            assert len(activation["tokens"]) == len(activation["values"])


def test_browse_takes_one_sae_a_list_or_a_glob(site, tmp_path) -> None:
    for name in ("a", "b"):
        shutil.copytree(site["sae_path"], tmp_path / name / "sae")
    quick = {"shards": str(site["folder"]), "k": 2, "intervals": 0, "neuronpedia": False}
    built = browse(str(tmp_path / "*" / "sae"), output=str(tmp_path / "sites"), **quick)
    assert built == [tmp_path / "sites" / "00-a" / "index.html", tmp_path / "sites" / "01-b" / "index.html"]
    assert all(p.is_file() for p in built)
    with pytest.raises(ConfigError, match="sae: the pattern"):
        browse(str(tmp_path / "nothing*" / "sae"), **quick)


def test_a_transcoder_is_browsed_on_both_sides(tmp_path) -> None:
    sites = ["blocks.1.hook_mlp_in", "blocks.1.hook_mlp_out"]
    config = HarvestConfig(output=str(tmp_path / "harvest"), sites=sites, context_size=32, model_batch_size=4,
                           max_tokens=300, dtype="float32", shuffle_bucket_tokens=300, shard_tokens=300)
    folders = harvest(config)
    torch.manual_seed(0)
    sae = JumpReLUSAE(128, 16, d_out=128).eval()
    path = save_sae(sae, tmp_path / "sae", 1.0, {"model": config.model, "site": sites[0], "target_site": sites[1],
                                               "text": "kjv", "context_size": 32})
    [index] = browse(str(path), shards=str(folders[sites[0]]), k=2, intervals=0, neuronpedia=False,
                     neighbours=3, logits=4)
    records = _records(index)
    # Input side: nearest latents by encoder direction; output side: the decoder's logits at the MLP output.
    enc = torch.nn.functional.normalize(sae.W_enc.detach().T, dim=1)
    sims = (enc @ enc.T).fill_diagonal_(-torch.inf)
    model, _ = load_language_model(config.model)
    gain = 1 + model.model.norm.weight.float()
    logits = (sae.W_dec.detach() * gain) @ model.get_output_embeddings().weight.float().T
    strings = token_strings(load_language_model(config.model)[1])
    for r in records:
        assert [n for n, _ in r["input_neighbours"]] == sims[r["id"]].topk(3).indices.tolist()
        assert [t for t, _ in r["effects"][0]["promoted"]] == [strings[t] for t in logits[r["id"]].topk(4).indices]


def test_build_browser_callback_browses_the_saved_sae(site, tmp_path) -> None:
    data = ShardedActivationDataModule(path=str(site["folder"]), batch_size=100, val_shards=1)
    module = SAETrainingModule(JumpReLUSAE(128, 32), lr=1e-3)
    browser = BuildBrowser(k=2, intervals=1, samples=1, neuronpedia=False)
    trainer = pl.Trainer(max_steps=3, callbacks=[SaveSAE(), browser], default_root_dir=tmp_path,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    log_dir = Path(trainer.log_dir)
    assert browser.built == [log_dir / "browser" / "index.html"] and browser.built[0].is_file()
    records = _records(browser.built[0])
    assert len(records) == 32 and sum(r["count"] for r in records) > 0
    misordered = pl.Trainer(max_steps=1, callbacks=[BuildBrowser(), SaveSAE()], default_root_dir=tmp_path,
                            enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ConfigError, match="list callbacks.SaveSAE before it"):
        misordered.fit(SAETrainingModule(JumpReLUSAE(128, 32)), data)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")


@pytest.mark.browser
def test_the_site_in_a_headless_browser(site, tmp_path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra has it)")
    data, index = site["data"], site["index"]
    records = {r["id"]: r for r in _records(index)}
    # A latent with examples, and a token its top example fires on, to search for.
    latent = max(records, key=lambda i: (len(records[i]["groups"][0]["examples"]), float(data.max[i])))
    first = records[latent]["groups"][0]["examples"][0]
    token = first["tokens"][first["peak"]].strip()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(index.as_uri())
        page.wait_for_selector("tr.latent-row")
        assert page.locator("tr.latent-row").count() == D_SAE
        page.fill("#search", token)
        shown = [int(x) for x in page.locator("tr.latent-row").evaluate_all("rows => rows.map(r => r.dataset.id)")]
        assert latent in shown and len(shown) < D_SAE
        page.screenshot(path=str(tmp_path / "index.png"))
        page.click(f"tr.latent-row[data-id='{latent}'] a")
        page.wait_for_selector(f"#latent-view[data-id='{latent}']")
        # The numbers shown are the ones Python computed (4 significant digits).
        assert float(page.inner_text("#stat-max")) == pytest.approx(float(data.max[latent]), rel=1e-3)
        assert float(page.inner_text("#stat-frequency")) == pytest.approx(float(data.frequency[latent]), rel=1e-3)
        assert int(page.inner_text("#stat-count")) == int(data.count[latent])
        # The top example highlights the token of highest activation, which is the latent's max.
        example = page.locator(".group[data-kind=top] .example").first
        values = [float(v) for v in example.locator(".tok").evaluate_all("s => s.map(e => e.dataset.value)")]
        peak = example.locator(".tok.peak")
        assert peak.count() == 1 and float(peak.get_attribute("data-value")) == pytest.approx(max(values))
        assert max(values) == pytest.approx(float(data.top_values[latent, 0]), abs=1e-4)
        assert peak.inner_text().strip() == token
        page.screenshot(path=str(tmp_path / "latent.png"), full_page=True)
        page.goto(index.as_uri() + "#summary")
        page.wait_for_selector("#summary")
        assert str(D_SAE) in page.inner_text("#summary")
        browser.close()
    assert errors == [] and (tmp_path / "latent.png").stat().st_size > 10_000
