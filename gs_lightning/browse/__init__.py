"""Feature browser data: what each latent of an SAE responds to and writes, from a harvest."""

from gs_lightning.browse.collect import LatentData, collect
from gs_lightning.browse.contexts import ContextWindow, rebuild_windows
from gs_lightning.browse.decoder import (
           decoder_data,
           logit_effects,
           nearest_latents,
           residual_directions,
           unembedding,
)
from gs_lightning.browse.source import HarvestSource, split_keys

__all__ = ["ContextWindow", "HarvestSource", "LatentData", "collect", "decoder_data", "logit_effects",
           "nearest_latents", "rebuild_windows", "residual_directions", "split_keys", "unembedding"]
