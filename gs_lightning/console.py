"""Keep notices that are not ours to show out of a run's console, at their source.

Only these messages are dropped, each matched by its own text; every other warning and
log line still reaches the console.

* Lightning's adverts for its cloud products ("Tip: ... try installing litlogger /
  litmodels"), logged at INFO on every fit that does not use them;
* Lightning's notice that tensorboardX is no longer a dependency, shown whenever the
  default logger falls back to CSVLogger (which is what a run here wants);
* the deprecation of ``isinstance(treespec, LeafSpec)`` that Lightning's own pytree copy
  triggers in torch >= 2.10 (nothing a user of gs_lightning can change).
"""

from __future__ import annotations

import logging
import warnings

ADVERT_PREFIX = "💡 Tip:"
WARNING_PATTERNS = (
    r"Starting from v1\.9\.0, `tensorboardX` has been removed",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
_LIGHTNING_INFO_LOGGER = "lightning.pytorch.utilities.rank_zero"


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIX)


def quiet_third_party() -> None:
    """Install the filters (idempotent)."""
    logger = logging.getLogger(_LIGHTNING_INFO_LOGGER)
    if not any(isinstance(f, _DropAdverts) for f in logger.filters):
        logger.addFilter(_DropAdverts())
    for pattern in WARNING_PATTERNS:
        warnings.filterwarnings("ignore", message=pattern)
