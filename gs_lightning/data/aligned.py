"""Stream aligned rows of several sites of one harvest, stacked: the data of a cross-layer
transcoder (every layer's residual stream in, every layer's MLP output out) or a crosscoder.

A harvest writes every site with the same row order (row i is the same token at every
site), so the sites share one shard permutation and one window shuffle: the stream is
:class:`~gs_lightning.data.shards.ShardedActivationDataModule`'s, with its exact resume,
and only the batch's shape changes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gs_lightning.data.reader import Batch
from gs_lightning.data.scaling import ScalingScheme
from gs_lightning.data.shards import ShardedActivationDataModule
from gs_lightning.errors import ConfigError
from gs_lightning.lm.sites import site_span


class AlignedShardsDataModule(ShardedActivationDataModule):
    """Batches of several aligned sites: ``(inputs [batch, n_in, d_in], targets [batch, n_out,
    d_out])``, or ``inputs`` alone without ``target_paths``. Site j of a stack is the j-th
    folder of its list; each site has its own scale (``input_scale`` and ``target_scale``
    are lists), computed by ``input_scaling`` from its manifest's statistics.

    Validation holds out the last ``val_shards`` shards of every site (the same tokens).

    Args:
        input_paths: Site folders of one harvest that the dictionary reads, in order (e.g.
            ``blocks.{l}.hook_resid_mid`` for l = 0..L-1); all of one width.
        target_paths: Site folders of the same harvest that it reconstructs, in order (e.g.
            ``blocks.{l}.hook_mlp_out``); all of one width. None: batches are inputs only.
        batch_size: Tokens per batch (per rank); every site contributes its row of each token.
        input_scaling: Scaling scheme, applied to each site with its own scale.
        seed: Seed of the shard permutation and of the window shuffle.
        val_shards: Trailing shards of every site held out for validation.
        window_tokens: Rows shuffled together in memory (whole shards, at least one); each
            window holds these rows of every site.
        verify_checksums: Check each shard's sha256 (and NaN/Inf) the first time it is read.
        model: If set, every manifest must name this model.
        num_workers: DataLoader worker processes (the order does not depend on them).
        pin_memory: Gather batches into pinned host memory; default: when training on CUDA.
    """

    def __init__(
        self,
        input_paths: list[str],
        target_paths: list[str] | None = None,
        batch_size: int = 4096,
        input_scaling: ScalingScheme = "unit_mean_squared_norm",
        seed: int = 0,
        val_shards: int = 1,
        window_tokens: int = 1_048_576,
        verify_checksums: bool = True,
        model: str | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
    ) -> None:
        if not input_paths:
            raise ConfigError("data.init_args.input_paths is empty: list the site folders the dictionary reads")
        # Set before the parent's constructor, which opens every site of _site_paths().
        self.input_paths = [str(p) for p in input_paths]
        self.target_site_paths = [str(p) for p in target_paths or []]
        super().__init__(self.input_paths[0], batch_size=batch_size, input_scaling=input_scaling, seed=seed,
                         val_shards=val_shards, window_tokens=window_tokens, verify_checksums=verify_checksums,
                         model=model, num_workers=num_workers, pin_memory=pin_memory)
        for paths, kind in ((self.input_paths, "input"), (self.target_site_paths, "target")):
            widths = {int(self._manifest_of(p)["d"]) for p in paths}
            if len(widths) > 1:
                raise ConfigError(f"data.init_args.{kind}_paths: the sites have widths {sorted(widths)}; "
                                  "sites stacked together must have one width")

    def _site_paths(self) -> list[list[str]]:
        return [[p] for p in self.input_paths + self.target_site_paths]

    def _manifest_of(self, path: str) -> dict[str, Any]:
        site = (self.input_paths + self.target_site_paths).index(path)
        return self.reader.sites[site][0][2]

    # -- the interface -------------------------------------------------------------

    @property
    def stacked_sites(self) -> int:
        """Number of input sites stacked in a batch."""
        return len(self.input_paths)

    @property
    def n_targets(self) -> int:
        """Number of target sites stacked in a batch (0 without ``target_paths``)."""
        return len(self.target_site_paths)

    @property
    def paired(self) -> bool:
        """Whether batches are ``(inputs, targets)`` pairs."""
        return bool(self.target_site_paths)

    @property
    def input_scale(self) -> list[float]:  # type: ignore[override]
        """Each input site's scale, in order (valid after ``setup``)."""
        return self._known_scales("input_scale")[: self.stacked_sites]

    @property
    def target_scale(self) -> list[float]:  # type: ignore[override]
        """Each target site's scale, in order (the inputs' without targets)."""
        return self._known_scales("target_scale")[self.stacked_sites :] or self.input_scale

    @property
    def metadata(self) -> dict[str, Any]:
        """Model, sites and text of the harvest, and each site's scale."""
        meta = super().metadata
        sites = [self._manifest_of(p)["site"] for p in self.input_paths + self.target_site_paths]
        n = self.stacked_sites
        meta.update(site=site_span(sites[:n]), input_sites=sites[:n], source=self.input_paths, input_scale=None,
                    input_scales=None if self._scales is None else self.input_scale)
        if self.target_site_paths:
            meta.update(target_site=site_span(sites[n:]), target_sites=sites[n:], target_source=self.target_site_paths, d_out=self.d_out,
                        target_scales=None if self._scales is None else self.target_scale)
        return meta

    def finish_batch(self, batch: Batch) -> Tensor | tuple[Tensor, Tensor]:
        """Float32 and stacked: ``(inputs [batch, n_in, d_in], targets [batch, n_out, d_out])``."""
        parts = batch if isinstance(batch, (tuple, list)) else (batch,)
        n = self.stacked_sites
        inputs = torch.stack([p.float() for p in parts[:n]], dim=1)
        if not self.target_site_paths:
            return inputs
        return inputs, torch.stack([p.float() for p in parts[n:]], dim=1)

