"""The activation store's throughput: reading shards, and harvesting them.

Side by side in one process:

1. a plain sequential read (``Path.read_bytes``) of a set of synthetic bf16 shards, page
   cache warm, against one epoch of :class:`ShardedActivationDataModule` over the same
   files (checksums on and off; batches converted to float32 as training gets them);
2. a harvest of the embedded model on the KJV (one site, bf16 shards) against a bare
   forward pass of the same model over the same contexts, cut at the same depth (the
   harvest stops after the last layer it needs, so a full forward would flatter it), both
   in tokens/s (model loading excluded from both). The harvest writes four shuffle
   buckets, as a long harvest writes many.

Ends with ``result: stream_vs_read <x>`` (DataModule GB/s in its second epoch, once every
shard has passed its checksum and NaN check, over plain read GB/s) and ``result: harvest_vs_forward <x>``.

Run: ``python benchmarks/stream.py [--tokens 524288 --d 384 --harvest_tokens 524288]``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from jsonargparse import CLI

from gs_lightning.data import ShardedActivationDataModule
from gs_lightning.data.shard_format import (
    encode_shard,
    shard_entry,
    shard_name,
    write_manifest,
)
from gs_lightning.harvest.model import HarvestConfig, harvest
from gs_lightning.lm.load import load_language_model
from gs_lightning.lm.text import content_mask, iter_contexts, iter_texts


def _write_shards(folder: Path, tokens: int, d: int, shard_tokens: int) -> int:
    folder.mkdir(parents=True)
    manifest = {"model": "synthetic", "site": "synthetic", "d": d, "dtype": "bfloat16", "shards": []}
    for i in range(tokens // shard_tokens):
        acts = torch.randn(shard_tokens, d).to(torch.bfloat16)
        data = encode_shard(acts, torch.zeros(shard_tokens), torch.zeros(shard_tokens))
        (folder / shard_name(i)).write_bytes(data)
        manifest["shards"].append(shard_entry(shard_name(i), data, acts, i))
    write_manifest(folder, manifest)
    return sum(s["bytes"] for s in manifest["shards"])


def _plain_read(folder: Path) -> tuple[float, int]:
    start, total = time.perf_counter(), 0
    for path in sorted(folder.glob("shard_*.safetensors")):
        total += len(path.read_bytes())
    return time.perf_counter() - start, total


def _stream(folder: Path, verify: bool, batch_size: int) -> list[tuple[float, int]]:
    """Two epochs: the first checks every shard (checksum, NaN/Inf), the second reads only."""
    dm = ShardedActivationDataModule(str(folder), batch_size=batch_size, val_shards=0,
                                     window_tokens=262144, verify_checksums=verify)
    dm.setup("fit")
    epochs = []
    for epoch in range(2):
        dm.load_state_dict({"epoch": epoch, "window": 0, "offset": 0, "seed": 0})
        start, rows = time.perf_counter(), 0
        for batch in dm.stream(as_float=False):  # as training gets them: float32 only on the device
            rows += batch.shape[0]
        epochs.append((time.perf_counter() - start, rows * dm.d_in * 2))  # bytes of bf16 acts delivered
    return epochs


def bench_stream(tokens: int, d: int, shard_tokens: int, batch_size: int, root: Path) -> float:
    folder = root / "synthetic"
    size = _write_shards(folder, tokens, d, shard_tokens)
    _plain_read(folder)  # warm the page cache: both sides then read from memory
    rows = [("plain read_bytes", *_plain_read(folder))]
    checked, steady = _stream(folder, True, batch_size)
    rows += [("DataModule, epoch 1 (checks)", *checked), ("DataModule, epoch 2", *steady)]
    rows.append(("DataModule, no checksums, ep 1", *_stream(folder, False, batch_size)[0]))
    print(f"\nshards: {tokens} tokens x d={d} bf16, {size / 1e6:.0f} MB in {tokens // shard_tokens} files")
    print(f"{'reader':<32}{'s':>8}{'GB/s':>8}")
    for name, seconds, nbytes in rows:
        print(f"{name:<32}{seconds:>8.2f}{nbytes / seconds / 1e9:>8.2f}")
    read_rate = rows[0][2] / rows[0][1]
    return (rows[2][2] / rows[2][1]) / read_rate


def _bare_forward(model: torch.nn.Module, tokenizer, tokens: int, context_size: int, depth: int,
                  batch: int) -> float:
    """Tokens/s of the decoder stack cut to its first ``depth`` layers: no hooks, nothing kept."""
    decoder = model.model
    layers = decoder.layers
    decoder.layers = layers[:depth]
    try:
        start, n = time.perf_counter(), 0
        contexts = iter_contexts(iter_texts("kjv", split="train"), tokenizer, context_size)
        with torch.no_grad():
            while n < tokens and (group := list(islice(contexts, batch))):
                ids = torch.stack(group)
                decoder(input_ids=ids, use_cache=False)
                n += int(content_mask(ids, tokenizer).sum())
        return n / (time.perf_counter() - start)
    finally:
        decoder.layers = layers


def bench_harvest(tokens: int, context_size: int, root: Path, layer: int = 1, batch: int = 16,
                  repeats: int = 3) -> float:
    site = f"blocks.{layer}.hook_resid_post"
    model, tokenizer = load_language_model("gs-lightning/tiny-gemma2-kjv")
    _bare_forward(model, tokenizer, batch * context_size, context_size, layer + 1, batch)  # warm-up
    start = time.perf_counter()
    load_language_model("gs-lightning/tiny-gemma2-kjv")
    load = time.perf_counter() - start

    def run(output: str, n: int) -> float:
        config = HarvestConfig(output=str(root / output), sites=[site], context_size=context_size,
                               model_batch_size=batch, max_tokens=n,
                               shuffle_bucket_tokens=max(n // 4, 1), shard_tokens=32768)
        start = time.perf_counter()
        harvest(config)
        return n / (time.perf_counter() - start - load)

    run("warm-up", batch * context_size)  # the same one-time warm-up the bare forward had
    # Alternate the two, three times each, and take medians: one run is ~7 s and the host's
    # load drifts on that scale.
    forwards, harvests = [], []
    for i in range(repeats):
        forwards.append(_bare_forward(model, tokenizer, tokens, context_size, layer + 1, batch))
        harvests.append(run(f"harvest_{i}", tokens))
    forward, harvested = statistics.median(forwards), statistics.median(harvests)
    print(f"\n{'embedded model, kjv, context ' + str(context_size):<50}{'tokens/s':>10}")
    print(f"{f'bare forward, layers 0..{layer} (no hooks), median of {repeats}':<50}{forward:>10.0f}")
    print(f"{f'harvest of {site}, bf16 shards, median':<50}{harvested:>10.0f}")
    print(f"{'harvest / bare forward':<50}{harvested / forward:>10.3f}")
    return harvested / forward


def main(tokens: int = 524288, d: int = 384, shard_tokens: int = 65536, batch_size: int = 4096,
         harvest_tokens: int = 524288, context_size: int = 128) -> None:
    """Print the read and harvest tables and the two ratios.

    Args:
        tokens: Synthetic tokens written as shards for the read benchmark.
        d: Width of the synthetic activations.
        shard_tokens: Tokens per synthetic shard.
        batch_size: DataModule batch size.
        harvest_tokens: Content tokens harvested (and forwarded) for the harvest benchmark.
        context_size: Context size of the harvest benchmark.
    """
    with tempfile.TemporaryDirectory() as tmp:
        stream_ratio = bench_stream(tokens, d, shard_tokens, batch_size, Path(tmp))
        harvest_ratio = bench_harvest(harvest_tokens, context_size, Path(tmp))
    print(f"\nresult: stream_vs_read {stream_ratio:.3f}")
    print(f"result: harvest_vs_forward {harvest_ratio:.3f}")


if __name__ == "__main__":
    CLI(main)
