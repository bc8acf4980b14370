"""Feature-browser collection: streamed statistics, top-k and interval samples equal a
brute-force computation over all rows; contexts rebuilt from shards equal the harvested
text; version-1 shards are refused with the command that re-harvests them."""

from __future__ import annotations

import dataclasses
import json
from itertools import islice
from pathlib import Path

import pytest
import torch

from gs_lightning.browse import collect, decoder_data, rebuild_windows, split_keys
from gs_lightning.browse.streaming import HIST_EDGES, priority
from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.data.shard_format import (
    FORMAT_VERSION,
    MANIFEST,
    encode_shard,
    read_manifest,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.errors import ConfigError
from gs_lightning.harvest.model import HarvestConfig, harvest
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts
from gs_lightning.saes import JumpReLUSAE, ReLUSAE

D, D_SAE, CONTEXT, N_CONTEXTS = 8, 24, 16, 75
SITE = "blocks.1.hook_resid_post"


def _synthetic(folder: Path, version: int = FORMAT_VERSION) -> Path:
    """Shuffled rows of 75 contexts (positions 1..15), on a 1/16 grid so that every
    activation below is computed exactly, whatever the batch."""
    g = torch.Generator().manual_seed(0)
    contexts = torch.arange(N_CONTEXTS).repeat_interleave(CONTEXT - 1)
    positions = torch.arange(1, CONTEXT).repeat(N_CONTEXTS)
    order = torch.randperm(len(contexts), generator=g)
    acts = torch.randint(-64, 65, (len(order), D), generator=g).float() / 16
    token_ids = torch.randint(5, 100, (len(order),), generator=g)
    folder.mkdir(parents=True)
    manifest = {"format_version": version, "model": "test/model", "site": SITE, "d": D, "dtype": "float32",
                "context_size": CONTEXT, "shards": []}
    for i, part in enumerate(order.tensor_split(4)):
        data = encode_shard(acts[part], token_ids[part], positions[part],
                            contexts[part] if version >= 2 else None)
        (folder / shard_name(i)).write_bytes(data)
        manifest["shards"].append(shard_entry(shard_name(i), data, acts[part], bucket=0))
    write_manifest(folder, manifest)
    return folder


def _exact_sae() -> ReLUSAE:
    g = torch.Generator().manual_seed(1)
    sae = ReLUSAE(D, D_SAE).eval()
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-64, 65, (D, D_SAE), generator=g).float() / 64)
        sae.b_enc.copy_(torch.randint(-256, 65, (D_SAE,), generator=g).float() / 64)
    return sae


def _all_rows(folder: Path, sae) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's activations ``f`` and token key, read whole."""
    from safetensors.torch import load_file

    shards = [load_file(folder / e["file"]) for e in read_manifest(folder)["shards"]]
    acts = torch.cat([s["acts"] for s in shards])
    keys = torch.cat([s["context_ids"] * CONTEXT + s["positions"].long() for s in shards])
    with torch.no_grad():
        return sae.encode(acts), keys


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return _synthetic(tmp_path_factory.mktemp("synthetic") / "site")


def test_statistics_equal_brute_force(synthetic) -> None:
    sae = _exact_sae()
    data = collect(sae, synthetic, k=5, intervals=4, samples=3, batch_size=64)
    f, _ = _all_rows(synthetic, sae)
    firing = f > 0
    assert data.tokens == len(f) == N_CONTEXTS * (CONTEXT - 1)
    assert torch.equal(data.count, firing.sum(0))
    assert 0 < int(firing.sum(0).min()) and int(firing.sum(0).max()) < len(f)  # the test has teeth
    torch.testing.assert_close(data.frequency, firing.double().mean(0))
    torch.testing.assert_close(data.max, f.max(0).values)
    mean = torch.where(firing, f, 0).double().sum(0) / firing.sum(0)
    torch.testing.assert_close(data.mean.double(), mean, rtol=1e-6, atol=0)
    for latent in range(D_SAE):
        values = f[firing[:, latent], latent].double().clamp(HIST_EDGES[0], HIST_EDGES[-1])
        expected = torch.histogram(values, HIST_EDGES).hist.long()
        assert torch.equal(data.histogram[latent], expected), latent


def test_top_k_equals_brute_force_and_ignores_batching(synthetic) -> None:
    sae = _exact_sae()
    f, keys = _all_rows(synthetic, sae)
    by_key = dict(zip(keys.tolist(), range(len(keys))))
    data = collect(sae, synthetic, k=5, intervals=0, batch_size=37)
    for latent in range(D_SAE):
        expected = f[:, latent].sort(descending=True).values[:5]
        assert torch.equal(data.top_values[latent], expected), latent
        got = data.top_keys[latent].tolist()
        assert len(set(got)) == 5  # distinct tokens, each holding the value reported for it (ties allowed)
        assert [float(f[by_key[k], latent]) for k in got] == expected.tolist()
    other = collect(sae, synthetic, k=5, intervals=0, batch_size=1000)
    assert torch.equal(other.top_values, data.top_values)


def test_interval_samples_equal_brute_force(synthetic) -> None:
    sae = _exact_sae()
    f, keys = _all_rows(synthetic, sae)
    n, s = 4, 3
    data = collect(sae, synthetic, k=2, intervals=n, samples=s, batch_size=50, seed=7)
    other = collect(sae, synthetic, k=2, intervals=n, samples=s, batch_size=300, seed=7)
    assert torch.equal(data.interval_keys, other.interval_keys)
    sizes = []
    for latent in range(D_SAE):
        top = f[:, latent].max().double()
        values = f[:, latent].double()
        for i in range(n):
            members = ((values > top * i / n) & (values <= top * (i + 1) / n)).nonzero().squeeze(1)
            ranks = priority(keys[members], torch.full_like(members, latent), seed=7).argsort()
            chosen = members[ranks[:s]]
            got = data.interval_keys[latent, i]
            assert got[got >= 0].tolist() == keys[chosen].tolist(), (latent, i)
            assert data.interval_values[latent, i, : len(chosen)].tolist() == f[chosen, latent].tolist()
            sizes.append(len(members))
    assert min(sizes) < s < max(sizes)  # both full and partly filled intervals were checked
    plain = data.latent(3)
    assert plain["count"] == int((f[:, 3] > 0).sum()) and len(plain["intervals"]) == n
    context, position = split_keys(data.top_keys[3, :1], CONTEXT)
    assert plain["top"][0] == {"context_id": int(context), "position": int(position),
                               "value": float(data.top_values[3, 0])}
    json.dumps(plain)


def test_version_1_shards_are_refused_but_still_stream(tmp_path) -> None:
    folder = _synthetic(tmp_path / "old", version=1)
    with pytest.raises(ConfigError, match=rf"{folder}.*version 1.*re-harvest.*python -m gs_lightning harvest"):
        collect(_exact_sae(), folder)
    dm = ShardedActivationDataModule(str(folder), batch_size=100, val_shards=1)
    dm.setup()
    assert sum(len(b) for b in dm.stream()) == 800


@pytest.fixture(scope="module")
def tiny_harvest(tmp_path_factory) -> tuple[HarvestConfig, Path]:
    output = tmp_path_factory.mktemp("harvest")
    config = HarvestConfig(output=str(output), sites=[SITE], context_size=32, model_batch_size=4, max_tokens=500,
                           dtype="float32", shuffle_bucket_tokens=200, shard_tokens=90, seed=1)
    return config, harvest(config)[SITE]


def test_rebuilt_context_is_the_harvested_text(tiny_harvest) -> None:
    config, folder = tiny_harvest
    manifest = read_manifest(folder)
    assert manifest["format_version"] == FORMAT_VERSION == 2
    _, tokenizer = load_language_model(config.model)
    torch.manual_seed(0)
    sae = JumpReLUSAE(manifest["d"], 32).eval()
    data = collect(sae, folder, k=3, intervals=2, samples=2)
    assert data.tokens == 500
    tops = [(latent, e) for latent in (0, 5, 9) for e in data.latent(latent)["top"]]
    examples = [(latent, e["context_id"], e["position"]) for latent, e in tops]
    examples.append((1, manifest["contexts"] // 2, 20))  # a context from a middle bucket
    windows = rebuild_windows(sae, folder, examples, before=32, after=32)
    stream = list(islice(iter_contexts(iter_texts("kjv", split="train"), tokenizer, 32), manifest["contexts"]))
    for window, (latent, context_id, position) in zip(windows, examples):
        ids = stream[context_id]
        content = content_mask(ids, tokenizer).nonzero().squeeze(1)
        if context_id == manifest["contexts"] - 1:  # max_tokens may cut the last context short
            content = content[: len(window.positions)]
        assert window.positions.tolist() == content.tolist()
        assert torch.equal(window.token_ids, ids[content])
        assert tokenizer.decode(window.token_ids) == tokenizer.decode(ids[content])
    for window, (_, example) in zip(windows, tops):  # the collected activation, recomputed from the shard
        assert float(window.activations[window.positions == window.position]) == pytest.approx(example["value"])
    narrow = rebuild_windows(sae, folder, examples[:1], before=2, after=1)[0]
    assert narrow.positions.max() <= examples[0][2] + 1 and narrow.positions.min() >= examples[0][2] - 2


def test_decoder_data_equals_brute_force(tiny_harvest) -> None:
    config, folder = tiny_harvest
    model, _ = load_language_model(config.model)
    torch.manual_seed(0)
    W_dec = JumpReLUSAE(read_manifest(folder)["d"], 40).W_dec.detach()
    extras = decoder_data(W_dec, model, SITE, n_logits=4, n_neighbours=3)
    # Brute force: the logits of the direction after the (linear part of the) final norm.
    gain = 1 + model.model.norm.weight.float()  # Gemma's RMSNorm scales by 1 + weight
    logits = (W_dec * gain) @ model.get_output_embeddings().weight.float().T
    assert torch.equal(extras["promoted_ids"], logits.topk(4, dim=1).indices)
    assert torch.equal(extras["suppressed_ids"], logits.topk(4, dim=1, largest=False).indices)
    torch.testing.assert_close(extras["promoted_values"], logits.topk(4, dim=1).values, rtol=1e-4, atol=1e-4)
    unit = W_dec / W_dec.norm(dim=1, keepdim=True)
    cos = (unit @ unit.T).fill_diagonal_(-2)
    assert torch.equal(extras["neighbour_ids"], cos.topk(3, dim=1).indices)
    assert "promoted_ids" not in decoder_data(W_dec, model, "blocks.1.hook_mlp_in")


def test_unfinished_version_1_harvest_is_not_resumed(tiny_harvest, tmp_path) -> None:
    config, folder = tiny_harvest
    other = dataclasses.replace(config, output=str(tmp_path))
    copy = tmp_path / folder.name
    copy.mkdir()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(format_version=1, complete=False)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="unfinished harvest in shard format version 1"):
        harvest(other)
