"""SAE variants; each is one subclass of :class:`SAE`, chosen in YAML by ``class_path``."""

from gs_lightning.saes.base import SAE, TrainOutput
from gs_lightning.saes.batchtopk import BatchTopKSAE
from gs_lightning.saes.clt import CrossLayerTranscoder
from gs_lightning.saes.crosscoder import Crosscoder
from gs_lightning.saes.gated import GatedSAE
from gs_lightning.saes.jumprelu import JumpReLUSAE
from gs_lightning.saes.jumprelu_2025 import JumpReLU2025SAE
from gs_lightning.saes.matryoshka import MatryoshkaBatchTopKSAE, MatryoshkaJumpReLUSAE
from gs_lightning.saes.relu import ReLUSAE
from gs_lightning.saes.topk import TopKSAE

__all__ = [
    "SAE",
    "TrainOutput",
    "JumpReLUSAE",
    "JumpReLU2025SAE",
    "ReLUSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "GatedSAE",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaJumpReLUSAE",
    "CrossLayerTranscoder",
    "Crosscoder",
]
