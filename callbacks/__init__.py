"""Lightning callbacks for gs_lightning runs, each chosen in YAML by ``class_path``.

Installed next to the ``gs_lightning`` package, so ``callbacks.SaveSAE`` resolves wherever
gs_lightning is installed, not only from the repository root.
"""

from callbacks.browser import BuildBrowser
from callbacks.delta_lm_loss import DeltaLMLoss
from callbacks.last_checkpoint import LastCheckpoint
from callbacks.plots import SavePlots
from callbacks.preemption import SaveOnSigterm
from callbacks.progress import StepProgressBar
from callbacks.run_summary import RunSummary
from callbacks.save_sae import SaveSAE
from callbacks.summary import FinalSummary
from callbacks.throughput import Throughput

__all__ = ["BuildBrowser", "DeltaLMLoss", "FinalSummary", "LastCheckpoint", "RunSummary", "SaveOnSigterm", "SavePlots", "SaveSAE",
           "StepProgressBar", "Throughput"]
