"""Activations held in memory: a safetensors file, or synthetic sparse data with a known dictionary."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from gs_lightning.data.base import ActivationDataModule
from gs_lightning.data.scaling import ScalingScheme, estimate_input_scale
from gs_lightning.errors import ConfigError


class ShuffledBatches:
    """Seeded per-epoch permutation of the rows of ``data``, in batches of ``batch_size``.

    Partial batches at the end of an epoch are dropped, so every step sees a full batch.
    """

    def __init__(self, data: Tensor, batch_size: int, seed: int) -> None:
        if data.shape[0] < batch_size:
            raise ConfigError(f"batch_size={batch_size} is larger than the {data.shape[0]} training activations")
        self.data, self.batch_size, self.seed, self.epoch = data, batch_size, seed, 0

    def __len__(self) -> int:
        return self.data.shape[0] // self.batch_size

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = torch.randperm(self.data.shape[0], generator=generator)
        for i in range(len(self)):
            yield self.data[order[i * self.batch_size : (i + 1) * self.batch_size]]


class OrderedBatches:
    """The rows of ``data`` in order, in batches of ``batch_size`` (the last may be short).

    ``data`` may be a tuple of aligned tensors (input and target sites); batches are then tuples.
    A class rather than a list: Lightning reads a list of loaders as several val sets.
    """

    def __init__(self, data: Tensor | tuple[Tensor, ...], batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __len__(self) -> int:
        first = self.data[0] if isinstance(self.data, tuple) else self.data
        return math.ceil(first.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, ...]]:
        if isinstance(self.data, tuple):
            return iter(zip(*(t.split(self.batch_size) for t in self.data)))
        return iter(self.data.split(self.batch_size))


class InMemoryActivationDataModule(ActivationDataModule):
    """Base for sources whose activations fit in memory; subclasses implement :meth:`load`."""

    def __init__(self, batch_size: int, input_scaling: ScalingScheme, val_fraction: float, seed: int) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size, self.input_scaling, self.val_fraction, self.seed = batch_size, input_scaling, val_fraction, seed
        self._train: Tensor | None = None
        self._val: Tensor | None = None

    def load(self) -> Tensor:
        """All activations, ``[N, d_in]`` float32."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        if self._train is not None:
            return
        data = self.load()
        if not torch.isfinite(data).all():
            raise ConfigError(f"{self.describe()}: activations contain NaN or Inf")
        n_val = int(round(data.shape[0] * self.val_fraction))
        self._val, self._train = data[:n_val], data[n_val:]
        self._scales = [estimate_input_scale([self._train], self.input_scaling)]

    def describe(self) -> str:
        """Where the data comes from, for error messages."""
        return type(self).__name__

    def train_dataloader(self) -> ShuffledBatches:
        assert self._train is not None, "call setup() first"
        return ShuffledBatches(self._train, self.batch_size, self.seed)

    def val_dataloader(self) -> OrderedBatches:
        assert self._val is not None, "call setup() first"
        return OrderedBatches(self._val, self.batch_size)


class TensorActivationDataModule(InMemoryActivationDataModule):
    """Activations from a safetensors file (key ``acts``, shape ``[N, d_in]``).

    Args:
        path: The safetensors file.
        key: Tensor name inside the file.
        batch_size: Activations per batch.
        input_scaling: Scaling scheme estimated on the training rows.
        val_fraction: Leading fraction of rows kept for validation.
        seed: Seed of the per-epoch shuffle.
    """

    def __init__(
        self,
        path: str,
        key: str = "acts",
        batch_size: int = 4096,
        input_scaling: ScalingScheme = "unit_mean_squared_norm",
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, input_scaling, val_fraction, seed)
        if not Path(path).is_file():
            raise ConfigError(f"data.init_args.path: activation file {path!r} does not exist")
        self.path, self.key = path, key
        self._d_in: int | None = None

    def load(self) -> Tensor:
        try:
            tensors = load_file(self.path)
        except (SafetensorError, OSError) as err:
            raise ConfigError(f"{self.path}: not a readable safetensors file ({err})") from err
        if self.key not in tensors or tensors[self.key].dim() != 2:
            raise ConfigError(f"{self.path}: no 2-D tensor {self.key!r} (found {sorted(tensors)})")
        return tensors[self.key].float()

    def describe(self) -> str:
        return self.path

    @property
    def d_in(self) -> int:
        if self._d_in is None:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as handle:
                self._d_in = int(handle.get_slice(self.key).get_shape()[-1])
        return self._d_in

    @property
    def metadata(self) -> dict[str, Any]:
        return {"source": self.path, "input_scaling": self.input_scaling, "d_in": self.d_in}


class SyntheticActivationDataModule(InMemoryActivationDataModule):
    """Sparse combinations of a random unit-norm dictionary: data an SAE can recover.

    Each token activates ``active_features`` of ``n_features`` directions with magnitudes
    drawn from |N(0, 1)|, plus isotropic noise; a nonzero mean offset makes FVU about the
    mean differ from FVU about zero.

    Args:
        d_in: Width of an activation.
        n_features: Size of the true dictionary.
        active_features: Features active per token.
        n_tokens: Number of activations generated (training + validation).
        noise: Standard deviation of the added Gaussian noise.
        batch_size: Activations per batch.
        input_scaling: Scaling scheme estimated on the training rows.
        val_fraction: Leading fraction of rows kept for validation.
        seed: Seed of the data and of the per-epoch shuffle.
    """

    def __init__(
        self,
        d_in: int = 64,
        n_features: int = 256,
        active_features: int = 4,
        n_tokens: int = 65536,
        noise: float = 0.01,
        batch_size: int = 1024,
        input_scaling: ScalingScheme = "unit_mean_squared_norm",
        val_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, input_scaling, val_fraction, seed)
        if not 0 < active_features <= n_features:
            raise ConfigError(f"active_features must be in 1..n_features={n_features}, got {active_features}")
        self._d_in, self.n_features, self.active_features = d_in, n_features, active_features
        self.n_tokens, self.noise = n_tokens, noise

    def load(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        dictionary = torch.randn(self.n_features, self._d_in, generator=g)
        dictionary /= dictionary.norm(dim=1, keepdim=True)
        offset = torch.randn(self._d_in, generator=g) / math.sqrt(self._d_in)
        data = offset.expand(self.n_tokens, -1).clone()
        chunk = 65536  # bounded temporaries however many tokens are asked for
        for start in range(0, self.n_tokens, chunk):
            n = min(chunk, self.n_tokens - start)
            idx = torch.rand(n, self.n_features, generator=g).topk(self.active_features, dim=1).indices
            mags = torch.randn(n, self.active_features, generator=g).abs()
            codes = torch.zeros(n, self.n_features).scatter_(1, idx, mags)
            data[start : start + n] += codes @ dictionary
        data += self.noise * torch.randn(self.n_tokens, self._d_in, generator=g)
        return data

    @property
    def d_in(self) -> int:
        return self._d_in

    @property
    def metadata(self) -> dict[str, Any]:
        return {"source": "synthetic", "n_features": self.n_features, "active_features": self.active_features,
                "input_scaling": self.input_scaling, "d_in": self._d_in}
