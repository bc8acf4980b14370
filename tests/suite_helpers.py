"""A tiny suite YAML for the suite tests (``tests.suite_helpers``): seconds per group on CPU."""

from __future__ import annotations

from pathlib import Path

import yaml


def suite_yaml(output: Path, **overrides) -> dict:
    """2 layers x 2 site kinds, one width of 64 latents, 2 sparsity levels, 20 steps per group."""
    config = {
        "output": str(output), "model": "gs-lightning/tiny-gemma2-kjv", "context_size": 32,
        "sites": ["blocks.{L}.hook_resid_post", "blocks.{L}.attn.hook_z"], "layers": [0, 2],
        "widths": [{"d_sae": 64, "tokens": 5120, "sparsity": {"sparsity_coefficient": [0.001, 0.01]}}],
        # Gemma Scope's unit-norm decoder, full-lr thresholds and encoder reading x: 20 steps are a
        # pipeline check, too short for the default recipe to separate the two lambdas.
        "recipe": {"sae": {"class_path": "gs_lightning.saes.JumpReLUSAE",
                           "init_args": {"normalize_decoder": True, "bias_lr_scale": 1.0, "normalize_gradient": False,
                                         "subtract_decoder_bias": False}},
                   "lr": 0.001, "lr_warmup_steps": 2,
                   "sparsity_warmup_steps": 5},
        "batch_size": 256,
        "harvest": {"dtype": "float32", "train_tokens": 8192, "val_tokens": 1024, "shard_tokens": 1024,
                    "shuffle_bucket_tokens": 4096, "model_batch_size": 16},
        "trainer": {"accelerator": "cpu", "checkpoint_every_n_steps": 5, "log_every_n_steps": 5},
        "evaluate": {"n_contexts": 4, "batch_size": 4},
        "release_name": "tiny",
    }
    config.update(overrides)
    return config


def write(config: dict, path: Path) -> Path:
    """Write ``config`` as YAML to ``path``; return ``path``."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
