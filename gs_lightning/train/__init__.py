"""Training: the LightningModule (:mod:`.module`), packed sweeps (:mod:`.packed`), latent-sharded
model parallelism (:mod:`.parallel`), optimizers, schedules and run records."""
