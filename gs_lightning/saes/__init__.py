"""SAE variants; each is one subclass of :class:`SAE`, chosen in YAML by ``class_path``."""

from gs_lightning.saes.base import SAE, TrainOutput
from gs_lightning.saes.jumprelu import JumpReLUSAE
from gs_lightning.saes.relu import ReLUSAE

__all__ = ["SAE", "TrainOutput", "JumpReLUSAE", "ReLUSAE"]
