"""gs_lightning: Gemma-Scope-style sparse autoencoder training on PyTorch Lightning."""

from gs_lightning.io import load_sae, save_sae
from gs_lightning.module import SAETrainingModule
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE

__version__ = "0.1.0"
__all__ = ["SAE", "JumpReLUSAE", "ReLUSAE", "SAETrainingModule", "load_sae", "save_sae", "__version__"]
