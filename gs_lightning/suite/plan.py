"""``suite --plan``: what a suite will cost, printed before anything runs.

Everything here is arithmetic on the suite YAML and the model's config (no weights, no
text): activation storage per site, the harvest's forward FLOPs, each group's training
FLOPs, the hours these take on a few machine profiles, and the activation rate one
accelerator would have to be fed. Storage is in binary units (1 TiB = 2^40 bytes); rates
are in decimal GB/s (1e9 bytes/s), as ``benchmarks/stream.py`` reports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig

from gs_lightning.errors import ConfigError
from gs_lightning.lm.load import load_model_config
from gs_lightning.lm.sites import decoder_layers, parse_site, site_dim_from_config
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import (
    Group,
    SuiteSite,
    expand_groups,
    sparsity_levels,
    suite_steps,
)
from gs_lightning.suite.harvesting import needed_sites

BYTES_PER_VALUE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Machine:
    """A machine profile: a peak FLOP rate and the fraction of it each kind of work reaches."""

    name: str
    peak_flops: float  # FLOP/s
    sae_utilisation: float  # of the peak, in a training step
    forward_utilisation: float  # of the peak, in the harvest's model forward


MACHINES = (
    # Measured here (2-core AVX2 host, fp32, 2026-12-03): GEMM peak 165 GFLOP/s and the fused
    # JumpReLU step at 0.869 of it, from `benchmarks/step.py --bf16 false --autograd false`.
    # The forward's 0.2: a 2-layer stack of Gemma 2 2B's shape (fp32, eager attention,
    # 4 x 1,024 tokens) ran at 33-40 GFLOP/s counted as 2 x parameters per token.
    Machine("this CPU", 165e9, 0.869, 0.2),
    # Data-sheet bf16 dense peaks. Utilisation is assumed, not measured: 0.5 for SAE steps
    # (Gemma Scope reports ~50% model FLOP utilisation for a 131k SAE on 8 TPUv3 chips) and
    # 0.4 for the model forward of the harvest.
    Machine("H100 SXM", 989e12, 0.5, 0.4),
    Machine("A100", 312e12, 0.5, 0.4),
    Machine("TPU v3 chip", 123e12, 0.5, 0.4),
)

STREAM_BYTES_PER_S = 1.08e9
"""What the shard stream delivered on this machine: ``benchmarks/stream.py --harvest_tokens
32768`` (2026-12-03; its default read set, 524,288 x 384 bf16 rows, page cache warm), row
"DataModule, epoch 2". Three runs on the shared host gave 1.08, 0.76 and 0.47 GB/s as its
load rose; the least contended one is taken."""

_SUMMARY_MACHINE = {"cuda": "H100 SXM", "gpu": "H100 SXM", "tpu": "TPU v3 chip"}
_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def plan_model_config(config: SuiteConfig) -> tuple[PretrainedConfig, str]:
    """The model's config and where it came from: the model itself, else ``config.model_config``."""
    try:
        return load_model_config(config.model, config.revision), config.model
    except ConfigError as err:
        if config.model_config is None:
            raise ConfigError(f"{err} (to plan without the model, set model_config: <its config.json>)") from err
    path = Path(config.model_config).expanduser()
    try:
        return AutoConfig.from_pretrained(str(path)), f"{config.model_config} (the model itself was unreachable)"
    except (OSError, ValueError) as err:
        raise ConfigError(f"model_config={config.model_config!r}: not a loadable config.json: {err}") from err


def forward_params(model_config: PretrainedConfig, last_layer: int) -> int:
    """Parameters the harvest runs per token: decoder layers 0..``last_layer``.

    The embedding is a lookup, and the harvest stops after the last layer it needs, so
    neither the embedding, the final norm nor the LM head is counted. The model is built
    on the meta device: shapes only, no memory.
    """
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(model_config)
        except ValueError:  # an encoder without a causal-LM class
            model = AutoModel.from_config(model_config)
    layers = decoder_layers(model)[: last_layer + 1]
    return sum(p.numel() for p in layers.parameters())


def group_flops(group: Group, batch_size: int) -> int:
    """FLOPs of one packed group: ``6 * d_in * d_sae + 6 * d_sae * d_out`` per token and level.

    Encode and decode each cost 2 FLOPs per weight forward and 4 backward (docs/tutorials/suites.md,
    "What a suite costs": a step costs ``12 * d * d_sae`` per token; an SAE has ``d_out = d_in``).
    Tokens are the ones actually trained, ``steps * batch_size``.
    """
    site = group.site
    per_token = 6 * site.d_in * group.width.d_sae + 6 * group.width.d_sae * (site.d_out or site.d_in)
    return per_token * group.steps * batch_size * len(sparsity_levels(group.width)[1])


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``33.5 TiB``."""
    i = 0
    while n >= 1024 and i < len(_UNITS) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} {_UNITS[i]}" if i == 0 else f"{n:.3g} {_UNITS[i]}"


def human_rate(bytes_per_s: float) -> str:
    """A data rate in decimal units: ``1.01 GB/s``, ``292 kB/s``."""
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.3g} {unit}"
    return f"{bytes_per_s:.3g} B/s"


def human_hours(hours: float) -> str:
    """A duration given in hours, in hours, minutes or seconds: ``3,480 h``, ``11 min``."""
    if hours >= 1:
        return f"{hours:,.0f} h" if hours >= 100 else f"{hours:.3g} h"
    return f"{hours * 60:.3g} min" if hours * 60 >= 1 else f"{hours * 3600:.2g} s"


def _hours(flops: float, machine: Machine, utilisation: float) -> float:
    return flops / (machine.peak_flops * utilisation) / 3600


def _site_rows(config: SuiteConfig, model_config: PretrainedConfig, sites: list[SuiteSite],
               train_tokens: int) -> list[dict[str, Any]]:
    size = BYTES_PER_VALUE[config.harvest.dtype]
    rows = []
    for site in needed_sites(sites):
        d = int(site_dim_from_config(model_config, site) or 0)
        train, val = train_tokens * d * size, config.harvest.val_tokens * d * size
        rows.append({"site": site, "d": d, "train_bytes": train, "val_bytes": val, "bytes": train + val})
    return rows


def _print_storage(config: SuiteConfig, rows: list[dict[str, Any]], train_tokens: int, estimated: bool) -> None:
    spec = config.harvest
    print(f"\nactivation storage ({spec.dtype}, {BYTES_PER_VALUE[spec.dtype]} bytes per value; "
          f"binary units): train {train_tokens:,} + val {spec.val_tokens:,} tokens per site")
    if estimated:
        print("  harvest.train_tokens is null: the train split's size is unknown until it is harvested; "
              "estimated here as the largest width's tokens")
    width = max(len(r["site"]) for r in rows)
    print(f"  {'site':<{width}} {'d':>6} {'train':>10} {'val':>10} {'total':>10}")
    for r in rows:
        print(f"  {r['site']:<{width}} {r['d']:>6} {human_bytes(r['train_bytes']):>10} "
              f"{human_bytes(r['val_bytes']):>10} {human_bytes(r['bytes']):>10}")
    print(f"  {f'{len(rows)} sites':<{width}} {'':>6} {'':>10} {'':>10} "
          f"{human_bytes(sum(r['bytes'] for r in rows)):>10}")


def _harvest(config: SuiteConfig, model_config: PretrainedConfig, sites: list[SuiteSite],
             train_tokens: int) -> dict[str, Any]:
    last = max(parse_site(s).layer or 0 for s in needed_sites(sites))
    params = forward_params(model_config, last)
    tokens = train_tokens + config.harvest.val_tokens
    # Forward FLOPs ~ 2 x (non-embedding parameters of layers 0..last) x tokens: one
    # multiply-add per weight per token. Attention scores (~4 x layers x context x d_attn
    # per token, a few % at context 1,024) and BOS/padding positions are left out.
    flops = 2 * params * tokens
    hours = {m.name: _hours(flops, m, m.forward_utilisation) for m in MACHINES}
    print(f"\nharvest: layers 0..{last}, {params:,} non-embedding parameters, {tokens:,} tokens (train + val)")
    print(f"  forward ~ 2 x parameters x tokens = {flops:.3g} FLOP")
    print("  " + ", ".join(f"{name} {human_hours(h)}" for name, h in hours.items()))
    return {"last_layer": last, "params": params, "tokens": tokens, "flops": flops, "hours": hours}


def _training(config: SuiteConfig, groups: list[Group], flops: list[int], train_tokens: int) -> dict[str, Any]:
    print("\ntraining (FLOPs = 12 x d x d_sae x tokens x levels; transcoders 6 x d_sae x (d_in + d_out)):")
    for w in config.widths:
        mine = [f for g, f in zip(groups, flops) if g.width.d_sae == w.d_sae]
        steps, (key, levels) = suite_steps(config, w), sparsity_levels(w)
        tokens = steps * config.batch_size
        print(f"  width {w.d_sae:,}: {tokens:,} tokens ({steps:,} steps of {config.batch_size:,}; "
              f"{tokens / train_tokens:.2f} passes over the harvest), {len(levels)} levels of {key}, "
              f"{len(mine)} groups, {sum(mine):.3g} FLOP")
    total = sum(flops)
    hours = {m.name: _hours(total, m, m.sae_utilisation) for m in MACHINES}
    print(f"  total {total:.3g} FLOP: " + ", ".join(f"{name} {human_hours(h)}" for name, h in hours.items()))
    return {"flops": total, "hours": hours}


def _data_rates(config: SuiteConfig, groups: list[Group], flops: list[int]) -> dict[str, dict[int, float]]:
    """Bytes/s one device reads training each width's hungriest group (a transcoder reads its target too)."""
    size = BYTES_PER_VALUE[config.harvest.dtype]
    rates: dict[str, dict[int, float]] = {}
    print(f"\nactivations one device consumes (tokens/s x d x {size} bytes; this machine's shard stream "
          f"reached {STREAM_BYTES_PER_S / 1e9:.2f} GB/s):")
    for m in MACHINES:
        rates[m.name] = {}
        for g, f in zip(groups, flops):
            tokens_per_s = m.peak_flops * m.sae_utilisation / (f / (g.steps * config.batch_size))
            rate = tokens_per_s * (g.site.d_in + (g.site.d_out or 0)) * size
            rates[m.name][g.width.d_sae] = max(rate, rates[m.name].get(g.width.d_sae, 0.0))
        cells = [f"width {w:,} {human_rate(r)} ({r / STREAM_BYTES_PER_S:.2g}x the stream"
                 f"{', exceeds it' if r > STREAM_BYTES_PER_S else ''})" for w, r in rates[m.name].items()]
        print(f"  {m.name}: " + ", ".join(cells))
    return rates


def _print_groups(groups: list[Group], flops: list[int]) -> None:
    width = max(len(g.id) for g in groups)
    print(f"\ngroups ({len(groups)}):\n  {'id':<{width}} {'steps':>10} {'levels':>6} {'FLOP':>10}")
    for g, f in zip(groups, flops):
        print(f"  {g.id:<{width}} {g.steps:>10,} {len(sparsity_levels(g.width)[1]):>6} {f:>10.3g}")


def print_plan(config: SuiteConfig) -> dict[str, Any]:
    """Print what ``config`` will cost (storage, FLOPs, hours, data rate) and return the figures."""
    config.validate()
    model_config, source = plan_model_config(config)
    groups = expand_groups(config, model_config)
    sites = list(dict.fromkeys(g.site for g in groups))
    estimated = config.harvest.train_tokens is None
    train_tokens = max(w.tokens for w in config.widths) if estimated else int(config.harvest.train_tokens)
    print(f"suite plan: {config.model}, model config from {source}")
    rows = _site_rows(config, model_config, sites, train_tokens)
    _print_storage(config, rows, train_tokens, estimated)
    harvest = _harvest(config, model_config, sites, train_tokens)
    flops = [group_flops(g, config.batch_size) for g in groups]
    training = _training(config, groups, flops, train_tokens)
    rates = _data_rates(config, groups, flops)
    _print_groups(groups, flops)
    n_saes = sum(len(sparsity_levels(g.width)[1]) for g in groups)
    storage = sum(r["bytes"] for r in rows)
    machine = _SUMMARY_MACHINE.get(config.trainer.accelerator, "this CPU")
    hours = harvest["hours"][machine] + training["hours"][machine]
    print(f"\ndevice time on {machine} (one device; trainer.accelerator: {config.trainer.accelerator}): harvest "
          f"{human_hours(harvest['hours'][machine])} + training {human_hours(training['hours'][machine])}; "
          "divide by the devices that share the work")
    print(f"plan: {n_saes} SAEs in {len(groups)} groups, storage {human_bytes(storage)}, "
          f"training {training['flops']:.3g} FLOP, {human_hours(hours)} on {machine}")
    return {
        "model_config_source": source, "sites": rows, "storage_bytes": storage,
        "train_tokens": train_tokens, "train_tokens_estimated": estimated, "harvest": harvest,
        "groups": [{"id": g.id, "steps": g.steps, "levels": len(sparsity_levels(g.width)[1]), "flops": f}
                   for g, f in zip(groups, flops)],
        "training_flops": training["flops"], "training_hours": training["hours"], "data_rates": rates,
        "stream_bytes_per_s": STREAM_BYTES_PER_S, "n_saes": n_saes, "n_groups": len(groups),
        "summary_machine": machine, "summary_hours": hours,
    }
