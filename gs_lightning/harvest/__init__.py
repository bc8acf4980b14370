"""Harvesting: activations stored once as shards, from a language model over a text
(:mod:`.model`) or sampled from a synthetic world with its ground truth (:mod:`.world`)."""

from gs_lightning.harvest.model import (
    HarvestConfig,
    build_parser,
    harvest,
    harvest_main,
    safe_name,
    site_folder,
)

__all__ = ["HarvestConfig", "build_parser", "harvest", "harvest_main", "safe_name", "site_folder"]
