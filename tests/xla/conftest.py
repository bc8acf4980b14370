"""The XLA tier: runs only where torch_xla imports (see scripts/setup_xla.sh)."""

import os

# torch_xla reads the runtime at import: on a host without TPUs run on the XLA CPU device.
os.environ.setdefault("PJRT_DEVICE", "CPU")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "xla: needs torch_xla (scripts/setup_xla.sh); skipped elsewhere")
