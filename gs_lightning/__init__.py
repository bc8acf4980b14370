"""gs_lightning: Gemma-Scope-style sparse autoencoder training on PyTorch Lightning."""

from gs_lightning import _moved

_moved.install()

from gs_lightning.formats.io import load_sae, save_sae  # noqa: E402  (after the alias finder)
from gs_lightning.saes import SAE, JumpReLUSAE, ReLUSAE  # noqa: E402
from gs_lightning.train.module import SAETrainingModule  # noqa: E402

__version__ = "0.1.0"
__all__ = ["SAE", "JumpReLUSAE", "ReLUSAE", "SAETrainingModule", "load_sae", "save_sae", "__version__"]
