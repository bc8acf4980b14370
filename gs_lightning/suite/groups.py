"""A suite expanded: its concrete sites and its groups, one packed run per (site, width).

Site patterns expand here against the model's config (no weights): ``{L}`` becomes every
layer in ``layers``, ``"A -> B"`` a transcoder from site A to site B; a pattern that
matches no site of the model is a ConfigError naming the entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from gs_lightning.errors import ConfigError
from gs_lightning.harvest.model import safe_name
from gs_lightning.lm.sites import (
    SITE_KINDS,
    TRANSCODER,
    num_layers,
    parse_site,
    site_dim_from_config,
)
from gs_lightning.suite.config import SuiteConfig, WidthSpec

LAYER = "{L}"
"""Placeholder in a site pattern: replaced by every layer in ``layers``."""

TRANSCODER_ARROW = "->"
"""``"<input site> -> <target site>"`` asks for transcoders from one site to another."""

KIND_NAMES = {kind.name: kind.release for kind in SITE_KINDS.values()}
"""Site kind -> release suffix, as Gemma Scope names its repositories (``...-2b-pt-res``)."""


@dataclass(frozen=True)
class SuiteSite:
    """One concrete site of the suite (a pattern expanded for one layer)."""

    site: str
    target: str | None  # a transcoder's target site
    kind: str  # release suffix (SiteKind.release: res, mlp, att, ...) or transcoder
    layer: int | None
    d_in: int
    d_out: int | None

    @property
    def label(self) -> str:
        """The site as evaluate names it: ``site`` or ``site -> target``."""
        return self.site if self.target is None else f"{self.site} {TRANSCODER_ARROW} {self.target}"


@dataclass
class Group:
    """One packed run: every sparsity level of one width at one site, for ``steps`` steps."""

    site: SuiteSite
    width: WidthSpec
    steps: int

    @property
    def id(self) -> str:
        """Folder-safe, unique within a suite: ``<site>[__to__<target>]__w<d_sae>``."""
        name = self.site.site if self.site.target is None else f"{self.site.site}__to__{self.site.target}"
        return f"{safe_name(name)}__w{self.width.d_sae}"


def suite_steps(config: SuiteConfig, width: WidthSpec) -> int:
    """Steps that spend ``width.tokens`` at ``config.batch_size`` per step (at least one)."""
    return max(1, width.tokens // config.batch_size)


def expand_sites(config: SuiteConfig, model_config: PretrainedConfig) -> list[SuiteSite]:
    """Every concrete site of ``config.sites``, widths from ``model_config``; a pattern that
    matches no layer, a bad site or a duplicate is a ConfigError naming the entry."""
    n = num_layers(model_config)
    layers = config.layers if config.layers is not None else (list(range(n)) if n is not None else None)
    for layer in config.layers or []:
        if n is not None and not 0 <= layer < n:
            raise ConfigError(f"layers: {layer} is not a layer of {config.model!r} (it has {n}: 0..{n - 1})")
    sites: list[SuiteSite] = []
    for i, entry in enumerate(config.sites):
        source, _, target = (part.strip() for part in entry.partition(TRANSCODER_ARROW))
        if LAYER in entry and layers is None:
            raise ConfigError(f"sites[{i}]={entry!r}: the model's config does not say how many layers it has; "
                              "set layers")
        for layer in layers if LAYER in entry else [None]:
            sub = (lambda s: s if layer is None else s.replace(LAYER, str(layer)))
            sites.append(_suite_site(i, entry, sub(source), sub(target) or None, model_config))
    seen: dict[str, int] = {}
    for site in sites:
        if site.label in seen:
            raise ConfigError(f"sites: {site.label!r} appears twice (from sites[{seen[site.label]}] and again)")
        seen[site.label] = 0
    return sites


def _suite_site(i: int, entry: str, source: str, target: str | None, model_config: PretrainedConfig) -> SuiteSite:
    where = f"sites[{i}]={entry!r}"
    try:
        spec = parse_site(source)
        n = num_layers(model_config)
        for site in filter(None, (source, target)):
            layer = parse_site(site).layer
            if layer is not None and n is not None and layer >= n:
                raise ConfigError(f"layer {layer} does not exist; the model has {n} layers")
        d_in = site_dim_from_config(model_config, source)
        d_out = site_dim_from_config(model_config, target) if target else None
    except ConfigError as err:
        raise ConfigError(f"{where}: matches no site of the model: {err}") from None
    if d_in is None or (target and d_out is None):
        raise ConfigError(f"{where}: suites take TransformerLens site names ({LAYER} patterns of blocks.{{L}}...); "
                          "module-path sites need their width, which the config alone does not give")
    kind = TRANSCODER if target else spec.kind.release
    return SuiteSite(source, target, kind, spec.layer, d_in, d_out)


def expand_groups(config: SuiteConfig, model_config: PretrainedConfig) -> list[Group]:
    """Every (site, width) group, sites in YAML order, widths inner."""
    return [Group(site, width, suite_steps(config, width))
            for site in expand_sites(config, model_config) for width in config.widths]


def sparsity_levels(width: WidthSpec) -> tuple[str, list[int | float]]:
    """The swept argument and its levels."""
    key, levels = next(iter(width.sparsity.items()))
    return key, list(levels)
