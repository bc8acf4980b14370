"""The suite's harvest: every site it needs, train and held-out splits, one pass each.

A site whose shards are complete and were harvested with the suite's options is reused;
only missing sites are harvested (in one pass), so adding a site kind to a suite harvests
that kind alone. A site folder harvested with other options (another model, dtype,
context size, ...) is an error naming the differing key: the suite never mixes harvests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gs_lightning.data.shard_format import MANIFEST, read_manifest
from gs_lightning.errors import ConfigError
from gs_lightning.harvest.model import HarvestConfig, harvest
from gs_lightning.suite.config import SuiteConfig
from gs_lightning.suite.groups import SuiteSite
from gs_lightning.suite.layout import harvest_root, harvest_site

SPLITS = ("train", "val")


def harvest_config(config: SuiteConfig, split: str, sites: list[str]) -> HarvestConfig:
    """The HarvestConfig of one split for ``sites``."""
    spec = config.harvest
    val = split == "val"
    max_tokens = spec.val_tokens if val else spec.train_tokens
    return HarvestConfig(
        output=str(harvest_root(config, split)), model=config.model, revision=config.revision,
        model_dtype=config.model_dtype, sites=sites, text=config.text,  # type: ignore[arg-type]
        text_split=config.val_split if val else config.train_split, text_column=config.text_column,
        context_size=config.context_size, model_batch_size=spec.model_batch_size, max_tokens=max_tokens,
        dtype=spec.dtype,  # type: ignore[arg-type]
        shuffle_bucket_tokens=min(spec.shuffle_bucket_tokens, max_tokens) if max_tokens else spec.shuffle_bucket_tokens,
        shard_tokens=spec.shard_tokens, seed=spec.seed,
        device="cpu" if config.trainer.accelerator == "cpu" else "auto",  # the model runs where the SAEs train
    )


def site_identity(harvest: HarvestConfig) -> dict[str, Any]:
    """The harvest options that decide one site's shards: all but ``output`` and the site list
    (the shuffle is the same for every site, so a site's shards do not depend on the others)."""
    identity = harvest.identity()
    identity.pop("sites")
    return identity


def needed_sites(sites: list[SuiteSite]) -> list[str]:
    """Every site read by the suite: inputs and transcoder targets, in first-use order."""
    return list(dict.fromkeys(s for site in sites for s in (site.site, site.target) if s))


def missing_sites(config: SuiteConfig, split: str, sites: list[str]) -> list[str]:
    """Sites of ``split`` without a complete harvest; a folder from another harvest is a ConfigError."""
    expected = site_identity(harvest_config(config, split, sites))
    missing = []
    for site in sites:
        folder = harvest_site(config, split, site)
        if not (folder / MANIFEST).is_file():
            missing.append(site)
            continue
        manifest = read_manifest(folder)
        found = dict(manifest.get("harvest") or {})
        found.pop("sites", None)
        _check_same(folder, found, expected)
        if not manifest.get("complete"):
            missing.append(site)
    return missing


def _check_same(folder: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if differ:
        key = differ[0]
        raise ConfigError(
            f"{folder / MANIFEST}: this harvest has {key}={found.get(key)!r} but the suite asks for "
            f"{expected.get(key)!r} (differing: {', '.join(differ)}); point output at a new folder "
            f"or delete {folder}"
        )


def ensure_harvest(config: SuiteConfig, sites: list[SuiteSite]) -> dict[str, int]:
    """Harvest what is missing (resuming a killed harvest); return each train site's token count."""
    names = needed_sites(sites)
    for split in SPLITS:
        missing = missing_sites(config, split, names)
        if missing:
            print(f"suite: harvesting {len(missing)} site(s) of the {split} split in one pass", flush=True)
            harvest(harvest_config(config, split, missing))
        else:
            print(f"suite: reusing the {split} harvest of {len(names)} site(s)", flush=True)
    return {site: int(read_manifest(harvest_site(config, "train", site))["tokens"]) for site in names}


def check_harvest(config: SuiteConfig, sites: list[SuiteSite]) -> None:
    """Raise before anything runs if an existing site folder disagrees with the suite."""
    names = needed_sites(sites)
    for split in SPLITS:
        missing_sites(config, split, names)
