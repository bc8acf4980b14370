"""Release formats: kept for the import paths of before; the formats live in :mod:`gs_lightning.formats`."""
