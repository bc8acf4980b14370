"""circuit-tracer's cross-layer transcoder folder; it lives in :mod:`gs_lightning.formats.circuit_tracer`
and is importable from here as it always was."""

from gs_lightning.formats.circuit_tracer import (
    CONFIG,
    INPUT_HOOK,
    OUTPUT_HOOK,
    SHAPE_ARGS,
    export_circuit_tracer,
    load_circuit_tracer,
)

__all__ = ["CONFIG", "INPUT_HOOK", "OUTPUT_HOOK", "SHAPE_ARGS", "export_circuit_tracer", "load_circuit_tracer"]
