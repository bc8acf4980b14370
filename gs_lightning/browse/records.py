"""Turn collected latent data and rebuilt context windows into what is shown and exported.

:func:`latent_records` gives the static site's records (see :mod:`gs_lightning.browse.site`);
:func:`neuronpedia_feature` the same latent in the JSON that SAEDashboard writes for
Neuronpedia uploads (one ``batch-N.json`` per group of features, with the field names of
its ``NeuronpediaDashboardBatch``/``Feature``/``Activation``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from gs_lightning.browse.collect import LatentData
from gs_lightning.browse.contexts import ContextWindow

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_strings(tokenizer: Any) -> list[str]:
    """How each token id reads in running text, for the whole vocabulary.

    Single-token ``decode`` drops a SentencePiece token's leading space, so the token
    pieces are mapped instead. SentencePiece vocabularies: ``▁`` is a space and
    ``<0x0A>``-style byte tokens are their byte. Byte-level BPE vocabularies (GPT-2's
    scheme, which spells every byte as a printable character: ``Ġ`` a space, ``âĢĻ`` the
    three bytes of a right quote): the characters are mapped back to bytes and decoded as
    UTF-8 (a token holding part of a character shows a replacement mark).
    """
    pieces = [piece or "" for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
    byte_level = any(piece.startswith("Ġ") for piece in pieces)
    to_byte = {char: byte for byte, char in _byte_alphabet().items()}
    out = []
    for piece in pieces:
        byte = _BYTE_TOKEN.match(piece)
        if byte:
            out.append(chr(int(byte.group(1), 16)))
        elif byte_level and all(c in to_byte for c in piece):
            out.append(bytes(to_byte[c] for c in piece).decode("utf-8", errors="replace"))
        else:
            out.append(piece.replace("▁", " "))
    return out


def _byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable spelling of each byte: printable Latin-1 bytes stand for
    themselves, the other 68 take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + i) for i, b in enumerate(others)})
    return alphabet


def example_keys(data: LatentData, latents: range) -> list[tuple[int, int, int]]:
    """``(latent, context_id, position)`` of every example shown for ``latents``: the top
    examples, then each interval's samples, in the order :func:`latent_records` reads them."""
    examples = []
    for i in latents:
        for e in data.examples(data.top_keys[i]):
            examples.append((i, e["context_id"], e["position"]))
        for j in range(data.interval_keys.shape[1]):
            for e in data.examples(data.interval_keys[i, j]):
                examples.append((i, e["context_id"], e["position"]))
    return examples


def _example(window: ContextWindow, strings: list[str]) -> dict[str, Any]:
    positions = window.positions.tolist()
    return {
        "tokens": [strings[t] if t < len(strings) else f"<{t}>" for t in window.token_ids.tolist()],
        "values": [round(v, 5) for v in window.activations.tolist()],
        "peak": positions.index(window.position),
        "context_id": window.context_id,
        "position": window.position,
    }


def latent_records(data: LatentData, latents: range, windows: list[ContextWindow],
                   strings: list[str]) -> Iterator[dict[str, Any]]:
    """The site's record of each latent in ``latents``; ``windows`` as returned by
    :func:`gs_lightning.browse.contexts.rebuild_windows` for :func:`example_keys`."""
    it = iter(windows)
    edges = data.hist_edges.tolist()
    for i in latents:
        top = [_example(next(it), strings) for _ in data.examples(data.top_keys[i])]
        groups = [{"kind": "top", "title": f"top activations (max {data.max[i]:.4g})", "bin_min": -1,
                   "bin_max": float(data.max[i]), "bin_contains": -1, "examples": top}]
        for j in range(data.interval_keys.shape[1]):
            examples = [_example(next(it), strings) for _ in data.examples(data.interval_keys[i, j])]
            low, high = _interval(data, i, j)
            groups.append({"kind": "interval", "title": f"interval {low:.3g} to {high:.3g}", "bin_min": low,
                           "bin_max": high, "bin_contains": _interval_share(data, i, low, high),
                           "examples": examples})
        hist = data.histogram[i].tolist()
        used = [b for b, c in enumerate(hist) if c]
        lo, hi = (used[0], used[-1] + 1) if used else (0, 0)
        record: dict[str, Any] = {
            "id": i, "count": int(data.count[i]), "frequency": float(data.frequency[i]),
            "mean": float(data.mean[i]), "max": float(data.max[i]),
            "histogram": {"edges": edges[lo : hi + 1] if used else [0.0, 0.0], "counts": hist[lo:hi]},
            "groups": [g for g in groups if g["kind"] == "top" or g["examples"]],
            "effects": [], "neighbours": [],
        }
        extras = data.extras
        if "promoted_ids" in extras:
            record["effects"].append({
                "title": "output logits (decoder direction through the unembedding)",
                "promoted": [[strings[t], round(v, 4)] for t, v in zip(extras["promoted_ids"][i].tolist(),
                                                                        extras["promoted_values"][i].tolist())],
                "suppressed": [[strings[t], round(v, 4)] for t, v in zip(extras["suppressed_ids"][i].tolist(),
                                                                          extras["suppressed_values"][i].tolist())],
            })
        if "neighbour_ids" in extras:
            record["neighbours"] = [[n, round(c, 4)] for n, c in zip(extras["neighbour_ids"][i].tolist(),
                                                                     extras["neighbour_cosines"][i].tolist())]
        if "input_neighbour_ids" in extras:  # a transcoder: what its encoder reads, compared
            record["input_neighbours"] = [[n, round(c, 4)] for n, c in zip(
                extras["input_neighbour_ids"][i].tolist(), extras["input_neighbour_cosines"][i].tolist())]
        yield record


def _interval(data: LatentData, i: int, j: int) -> tuple[float, float]:
    n, top = data.interval_keys.shape[1], float(data.max[i])
    return top * j / n, top * (j + 1) / n


def _interval_share(data: LatentData, i: int, low: float, high: float) -> float:
    """Fraction of the latent's firing tokens in ``(low, high]``, from the fixed-bin
    histogram (bins straddling an interval edge are split in proportion of their log width)."""
    count = int(data.count[i])
    if count == 0 or high <= 0:
        return 0.0
    edges, hist = data.hist_edges.tolist(), data.histogram[i].tolist()
    share = 0.0
    for b, c in enumerate(hist):
        if not c:
            continue
        a, z = edges[b], edges[b + 1]
        lo, hi = max(a, low, 1e-30), min(z, high)
        if hi > lo:
            share += c * (math.log(hi) - math.log(lo)) / (math.log(z) - math.log(a))
    return min(1.0, share / count)


def neuronpedia_feature(record: dict[str, Any], data: LatentData, dataset: str) -> dict[str, Any]:
    """One latent in SAEDashboard's Neuronpedia feature JSON (fields it does not compute here,
    neuron alignment and correlations, are empty lists, as SAEDashboard leaves them when off)."""
    effects = record["effects"][0] if record["effects"] else {"promoted": [], "suppressed": []}
    hist = record["histogram"]
    centres = [(a + b) / 2 for a, b in zip(hist["edges"], hist["edges"][1:])]
    activations = []
    for group in record["groups"]:
        for example in group["examples"]:
            activations.append({"bin_min": group["bin_min"], "bin_max": group["bin_max"],
                                "bin_contains": group["bin_contains"], "tokens": example["tokens"],
                                "values": [round(v, 3) for v in example["values"]]})
    empty: list[Any] = []
    return {
        "feature_index": record["id"],
        "neuron_alignment_indices": empty, "neuron_alignment_values": empty, "neuron_alignment_l1": empty,
        "correlated_neurons_indices": empty, "correlated_neurons_l1": empty, "correlated_neurons_pearson": empty,
        "correlated_features_indices": [n for n, _ in record["neighbours"]],
        "correlated_features_l1": [c for _, c in record["neighbours"]],
        "correlated_features_pearson": empty,
        "neg_str": [t for t, _ in effects["suppressed"]], "neg_values": [v for _, v in effects["suppressed"]],
        "pos_str": [t for t, _ in effects["promoted"]], "pos_values": [v for _, v in effects["promoted"]],
        "frac_nonzero": record["frequency"],
        "freq_hist_data_bar_values": [round(c, 4) for c in centres], "freq_hist_data_bar_heights": hist["counts"],
        "logits_hist_data_bar_heights": empty, "logits_hist_data_bar_values": empty,
        "n_prompts_total": data.tokens // max(1, data.context_size), "n_tokens_in_prompt": data.context_size,
        "dataset": dataset, "decoder_weights_dist": empty, "activations": activations,
    }
