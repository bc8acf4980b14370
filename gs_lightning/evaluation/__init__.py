"""Evaluation beyond one site: the replacement model of a set of dictionaries."""

from gs_lightning.evaluation.replacement import ReplacementPart, check_causal, replacement_lm_loss, replacement_metrics

__all__ = ["ReplacementPart", "check_causal", "replacement_lm_loss", "replacement_metrics"]
