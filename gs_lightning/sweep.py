"""W&B sweep specifications, and ``python -m gs_lightning sweep``: the same files run offline.

A spec in ``configs/sweeps/`` is what ``wandb sweep`` takes: ``method`` (grid, random or
bayes), ``parameters`` keyed by LightningCLI's dotted options (``model.sae.init_args.
sparsity_coefficient``, ``model.lr``, ...) and a ``command`` that runs
``python -m gs_lightning fit --config <base>.yaml ${args}``. Offline, grid and random
sweeps need no server: the suggestions are computed here, and when every swept option
is one a packed sweep can vary (an SAE constructor argument other than the shape, or
the learning rate) the whole sweep trains as ONE packed run (``model.sweep``) that reads
the data once. Otherwise each suggestion is its own run. Either way the saved SAEs are
evaluated into one table and frontier plot.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import CLI

from gs_lightning.errors import ConfigError, parse_file

METHODS = ("grid", "random", "bayes")
SAE_ARG = "model.sae.init_args."
SHAPE_ARGS = ("d_in", "d_sae", "d_out")
"""SAE arguments that change parameter shapes: packed members must share them."""
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform", "categorical", "constant")


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read and check a W&B sweep spec; every problem names the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such sweep file")
    spec = parse_file(path, yaml.safe_load)
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep spec is a mapping with method, parameters and command")
    if spec.get("method") not in METHODS:
        raise ConfigError(f"{path}: method={spec.get('method')!r} is not one of {list(METHODS)}")
    if spec["method"] == "bayes" and not isinstance(spec.get("metric"), dict):
        raise ConfigError(f"{path}: a bayes sweep needs metric: {{name: ..., goal: minimize|maximize}}")
    metric = spec.get("metric")
    if metric is not None and (metric.get("goal") not in ("minimize", "maximize") or not metric.get("name")):
        raise ConfigError(f"{path}: metric needs a name and goal: minimize or maximize, got {metric}")
    parameters = spec.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{path}: parameters must map option names to value specs")
    for key, value in parameters.items():
        _check_parameter(path, spec["method"], key, value)
    base_args(spec, path)
    return spec


def _check_parameter(path: Path, method: str, key: str, value: Any) -> None:
    where = f"{path}: parameters.{key}"
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping (values:, value:, or distribution: with min/max)")
    if "values" in value:
        if not isinstance(value["values"], list) or not value["values"]:
            raise ConfigError(f"{where}.values must be a non-empty list")
    elif "value" not in value:
        distribution = value.get("distribution", "uniform" if "min" in value else None)
        if distribution not in DISTRIBUTIONS or not {"min", "max"} <= set(value):
            raise ConfigError(f"{where}: give values:, value:, or min/max with a distribution in {DISTRIBUTIONS}")
        if not value["min"] < value["max"]:
            raise ConfigError(f"{where}: min {value['min']} must be below max {value['max']}")
        if method == "grid":
            raise ConfigError(f"{where}: a grid sweep needs values:, not a distribution")


def base_args(spec: dict[str, Any], path: str | Path = "sweep") -> list[str]:
    """The ``fit`` arguments of the spec's command, without W&B's macros."""
    command = spec.get("command")
    if not isinstance(command, list) or "fit" not in command or "${args}" not in command:
        raise ConfigError(f"{path}: command must run 'python -m gs_lightning fit ... ${{args}}', got {command}")
    tail = command[command.index("fit") + 1 :]
    return [arg for arg in tail if not (arg.startswith("${") and arg.endswith("}"))]


def suggestions(spec: dict[str, Any], count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The runs of a grid sweep (every combination) or ``count`` draws of a random sweep."""
    parameters = spec["parameters"]
    if spec["method"] == "bayes":
        raise ConfigError("a bayes sweep needs a W&B server (its suggestions depend on results): "
                          "run it with `wandb sweep` and `wandb agent`")
    if spec["method"] == "grid":
        keys = list(parameters)
        grids = [parameters[k]["values"] if "values" in parameters[k] else [parameters[k]["value"]] for k in keys]
        runs = [dict(zip(keys, combo)) for combo in itertools.product(*grids)]
        return runs[:count] if count else runs
    count = count or spec.get("run_cap")
    if not count:
        raise ConfigError("a random sweep runs forever on W&B: give --count (or run_cap: in the spec)")
    rng = random.Random(seed)
    return [{k: _draw(v, rng) for k, v in parameters.items()} for _ in range(count)]


def _draw(value: dict[str, Any], rng: random.Random) -> Any:
    if "values" in value:
        return rng.choice(value["values"])
    if "value" in value:
        return value["value"]
    low, high = value["min"], value["max"]
    distribution = value.get("distribution", "uniform")
    if distribution == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution == "int_uniform":
        return rng.randint(int(low), int(high))
    if distribution == "q_uniform":
        q = value.get("q", 1)
        return round(rng.uniform(low, high) / q) * q
    return rng.uniform(low, high)


def packed_name(key: str) -> str | None:
    """The ``model.sweep`` name of a swept option, or None when packing cannot vary it."""
    if key.startswith(SAE_ARG) and key[len(SAE_ARG) :] not in SHAPE_ARGS and "." not in key[len(SAE_ARG) :]:
        return key[len(SAE_ARG) :]
    return "lr" if key == "model.lr" else None


def run_args(values: dict[str, Any]) -> list[str]:
    """``--key=value`` arguments, as a W&B agent passes them."""
    return [f"--{key}={json.dumps(value) if not isinstance(value, str) else value}" for key, value in values.items()]


def sweep(spec: str, output: str = "runs/sweep", count: int | None = None, seed: int = 0,
          pack: bool = True, evaluate: bool = True, n_contexts: int = 64) -> list[dict[str, Any]]:
    """Run a grid or random W&B sweep spec locally, with no server, and tabulate the results.

    Args:
        spec: A sweep file, e.g. ``configs/sweeps/quickstart_lambda.yaml``.
        output: Folder of the runs and of ``results.csv`` / ``results.json`` / ``results_frontier.png``.
        count: Runs of a random sweep (default: the spec's ``run_cap``); at most this many of a grid.
        seed: Seed of a random sweep's draws.
        pack: Train packable sweeps (only SAE arguments and lr vary) as one packed run.
        evaluate: Evaluate the saved SAEs (L0, FVU, delta LM loss) into the table; without
            it (or when the data has no language model) the table holds each SAE's final metrics.
        n_contexts: Held-out contexts per SAE for the evaluation.
    """
    from gs_lightning.cli import main

    # No server here: runs that log to W&B keep their records locally (`wandb sync` later).
    os.environ.setdefault("WANDB_MODE", "offline")
    parsed = load_spec(spec)
    runs = suggestions(parsed, count, seed)
    base = base_args(parsed, spec)
    root = Path(output)
    if root.is_dir() and any(root.iterdir()):
        # Its runs would be mixed into this sweep's table: never overwrite, never mix.
        raise ConfigError(f"--output {root} already holds a sweep; choose another folder or remove it")
    names = {key: packed_name(key) for key in parsed["parameters"]}
    if pack and len(runs) > 1 and all(names.values()):
        members = {names[k]: [run[k] for run in runs] for k in parsed["parameters"]}
        print(f"sweep: {len(runs)} runs differ only in {sorted(members)}: training them as one packed run "
              f"(model.sweep), which reads the data once", flush=True)
        plan = [("packed", base + [f"--model.sweep={json.dumps(members)}"])]
    else:
        why = "" if not pack else " (a swept option changes more than SAE arguments or lr: no packing)"
        print(f"sweep: {len(runs)} separate runs{why}", flush=True)
        plan = [(f"run_{i:03d}", base + run_args(run)) for i, run in enumerate(runs)]
    for name, args in plan:
        print(f"sweep: {name}: python -m gs_lightning fit {' '.join(args)}", flush=True)
        with warnings.catch_warnings():  # LightningCLI warns when called with args under another command
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            main(["fit", *args, f"--trainer.default_root_dir={root / name}"])
        _finish_wandb_run()
    saved = sorted(str(p.parent) for p in root.glob("**/sae.safetensors"))
    return _table(saved, root, evaluate, n_contexts)


def _finish_wandb_run() -> None:
    """Close the W&B run a fit opened, if any: runs in one process would share it otherwise."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def _table(saved: list[str], root: Path, evaluate: bool, n_contexts: int) -> list[dict[str, Any]]:
    from gs_lightning.evaluation.evaluate import evaluate as evaluate_saes
    from gs_lightning.evaluation.plots import plot_frontier
    from gs_lightning.formats.io import load_sae_config

    metas = [load_sae_config(path).get("metadata", {}) for path in saved]
    if evaluate and all(m.get("model") and m.get("text") for m in metas):
        return evaluate_saes(saved, output=str(root / "results"), n_contexts=n_contexts)
    rows = []
    for path, meta in zip(saved, metas):
        final = meta.get("final_metrics", {})
        rows.append({"sae": path, "l0": final.get("val/l0", float("nan")), "fvu": final.get("val/fvu", float("nan")),
                     **{k: v for k, v in final.items() if k.startswith("val/")}})
    (root / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_frontier(rows, root / "results_frontier.png")
    print(f"wrote {root / 'results.json'} and {root / 'results_frontier.png'}")
    return rows


def sweep_main(args: list[str]) -> None:
    """Entry point of ``python -m gs_lightning sweep``."""
    CLI(sweep, args=args, as_positional=True, prog="python -m gs_lightning sweep")
