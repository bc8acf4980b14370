"""Errors that the command line reports as one clear line instead of a traceback."""


class ConfigError(ValueError):
    """A user-facing configuration or input problem.

    The message must name the offending file, key or value; ``python -m gs_lightning``
    prints it as ``gs_lightning: error: <message>`` and exits with status 2.
    """
