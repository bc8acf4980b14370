"""Synthetic worlds: activations made from known feature directions, to score SAEs against the truth.

SynthSAEBench (Chanin et al. 2026, arXiv 2602.14687) builds a world with SAELens'
``sae_lens.synthetic`` toolkit: a ``SyntheticModel`` draws sparse feature activations ``a``
(Zipfian firing probabilities, a hierarchy, low-rank correlations) and returns
``x = a @ features + bias``. A world is named by:

- ``synthsaebench-16k``: the paper's configuration (16,384 features, width 768);
- ``synthsaebench-cpu``: the same at 4,096 features, width 256 and 32 roots, for a CPU;
- a folder where ``SyntheticModel.save`` wrote a world;
- a YAML or JSON file holding a ``SyntheticModelConfig`` dict (``SyntheticModelConfig.to_dict()``).

SAELens is the optional ``bench`` extra, imported only when a world is built or sampled;
reading a world's harvest needs none of this module (:mod:`gs_lightning.data.ground_truth`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import torch
import yaml
from torch import Tensor

from gs_lightning.data.ground_truth import GroundTruth
from gs_lightning.errors import ConfigError

SITE = "world"
"""The one site folder of a world harvest: ``<output>/world``."""
MODEL_FOLDER = "model"
"""The world's own copy inside the site folder, as ``SyntheticModel.save`` writes it."""
NAMES = ("synthsaebench-16k", "synthsaebench-cpu")
_SIZES = {  # name -> (num_features, hidden_dim, total_root_nodes); the rest is the paper's
    "synthsaebench-16k": (16_384, 768, 128),
    "synthsaebench-cpu": (4_096, 256, 32),
}


class World(Protocol):
    """What a world harvest needs of a world (tests pass small fakes)."""

    n_features: int
    d: int
    record: dict[str, Any]
    """JSON-able description recorded in the manifest (``source`` and ``config``); resume requires equality."""

    def prepare(self, folder: Path, device: torch.device) -> None:
        """Make the world ready to sample, keeping what a rerun needs in ``folder``."""

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` rows ``[n, d]`` and their true feature activations ``[n, n_features]``, drawn
        from torch's global random generator."""

    def ground_truth(self) -> GroundTruth:
        """The true feature directions and bias, on the CPU."""


def _synthetic() -> ModuleType:
    """``sae_lens.synthetic``, or a ConfigError saying how to install it."""
    try:
        import sae_lens.synthetic as synthetic
    except ImportError as err:
        raise ConfigError(f"world: a synthetic world needs the bench extra: pip install -e '.[bench]' "
                          f"({err})") from err
    return synthetic


def named_config(name: str) -> Any:
    """The ``SyntheticModelConfig`` of a named world (:data:`NAMES`)."""
    s = _synthetic()
    num_features, hidden_dim, roots = _SIZES[name]
    return s.SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=hidden_dim,
        firing_probability=s.ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=s.HierarchyConfig(total_root_nodes=roots, branching_factor=4, max_depth=3,
                                    mutually_exclusive_portion=1.0, mutually_exclusive_min_depth=0,
                                    compensate_probabilities=True, scale_children_by_parent=True),
        orthogonalization=s.OrthogonalizationConfig(num_steps=100, lr=3e-4),
        correlation=s.LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=s.LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=s.FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )


def world_config(source: str) -> dict[str, Any]:
    """The ``SyntheticModelConfig`` dict of a world source (name, saved folder or config file),
    with every default filled in and JSON types (as a manifest stores it)."""
    path = Path(source)
    config_file = path.is_file() and path.suffix in (".yaml", ".yml", ".json")
    if source not in NAMES and not path.is_dir() and not config_file:
        raise ConfigError(f"world={source!r}: not one of {list(NAMES)}, a saved SyntheticModel folder, "
                          "or a YAML/JSON file of a SyntheticModelConfig dict")
    s = _synthetic()
    if source in NAMES:
        config = named_config(source)
    else:
        if path.is_dir():
            path = path / s.synthetic_model.SYNTHETIC_MODEL_CONFIG_FILENAME
            if not path.is_file():
                raise ConfigError(f"world={source!r}: a folder without {path.name}; is it a saved SyntheticModel?")
        config = _parse_config(path)
    return json.loads(json.dumps(config.to_dict()))


def _parse_config(path: Path) -> Any:
    """A ``SyntheticModelConfig`` from a YAML or JSON file; every problem names the file."""
    try:
        raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: unreadable world config ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a world config is a mapping (a SyntheticModelConfig dict), "
                          f"got {type(raw).__name__}")
    try:  # from_dict pops keys of nested dicts: give it a copy
        return _synthetic().SyntheticModelConfig.from_dict(copy.deepcopy(raw))
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{path}: not a SyntheticModelConfig dict ({type(err).__name__}: {err})") from err


class SyntheticWorld:
    """A world of ``sae_lens.synthetic`` as a harvest uses it.

    Creating it reads only the config (cheap, so a resume is checked before anything is
    built); :meth:`prepare` builds the world (or copies a saved one) into the site folder
    once, and every run, first or resumed, samples from that copy.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.config = world_config(source)
        self.n_features, self.d = int(self.config["num_features"]), int(self.config["hidden_dim"])
        self.record: dict[str, Any] = {"source": source, "config": self.config}
        self._model: Any = None

    def prepare(self, folder: Path, device: torch.device) -> None:
        """Save the world to ``folder/model`` unless a previous run did, then load it on ``device``."""
        s = _synthetic()
        target = folder / MODEL_FOLDER
        if not target.is_dir():
            _save_atomically(self._make(device), target)
        saved = json.loads((target / s.synthetic_model.SYNTHETIC_MODEL_CONFIG_FILENAME).read_text())
        if saved != self.config:
            raise ConfigError(f"{target}: holds another world than world={self.source!r}; choose another output")
        self._model = s.SyntheticModel.load_from_disk(target, device=str(device))

    def _make(self, device: torch.device) -> Any:
        s = _synthetic()
        if self.source not in NAMES and Path(self.source).is_dir():
            # Copied, so that the harvest depends on nothing outside its folder.
            return s.SyntheticModel.load_from_disk(self.source)
        # Built on the harvest's device: orthogonalizing 16k directions takes long on a CPU.
        return s.SyntheticModel(s.SyntheticModelConfig.from_dict(copy.deepcopy(self.config)), device=str(device))

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` rows and their true feature activations (torch's global generator)."""
        return self._model.sample_with_features(n)

    def ground_truth(self) -> GroundTruth:
        """The feature directions ``[n_features, d]`` and bias ``[d]``, float32 on the CPU."""
        features = self._model.feature_dict
        return GroundTruth(features.feature_vectors.detach().float().cpu(), features.bias.detach().float().cpu())


def _save_atomically(model: Any, target: Path) -> None:
    """``model.save`` into a temporary folder, synced and renamed: a killed run leaves no half world."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, target)
