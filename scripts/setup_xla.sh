#!/usr/bin/env bash
# Create a separate virtualenv for the XLA test tier (tests/xla/): torch 2.9 + torch-xla 2.9
# from PyPI, this package installed editable with --no-deps, then its dependencies with
# torch held at 2.9 so that nothing replaces it.
#
#   bash scripts/setup_xla.sh            # creates .venv-xla (git-ignored)
#   VENV=/path/to/env bash scripts/setup_xla.sh
#   PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest tests/xla -m xla
#
# Cost: about 4 GB of downloads. torch 2.9 on PyPI is the CUDA build; it imports only with
# the nvidia-* libraries it links (about 3 GB), even on a CPU host where CUDA is never used
# (without them: "ValueError: libcublas.so.*[0-9] not found"). The CPU-only torch 2.9 wheel
# is not on PyPI.
# On a TPU VM add libtpu: `.venv-xla/bin/pip install "torch-xla[tpu]==2.9.0"`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-xla}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.9.0

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# packaging evaluates requirement markers below; tomli reads pyproject.toml before 3.11.
"${PIP[@]}" packaging 'tomli; python_version < "3.11"'
# torch and torch-xla without their dependencies, then theirs.
"${PIP[@]}" --no-deps "torch==$TORCH_VERSION" "torch-xla==$TORCH_VERSION"
mapfile -t DEPS < <("$VENV/bin/python" - <<'PY'
from importlib.metadata import requires
from packaging.requirements import Requirement

for name in ("torch", "torch-xla"):
    for line in requires(name) or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            print(str(req).split(";")[0])
PY
)
"${PIP[@]}" "${DEPS[@]}"

# This package without its dependencies (they would ask for the newest torch), then the
# dependencies listed in pyproject.toml and the test runner, with torch pinned.
"${PIP[@]}" --no-deps -e .
PIN="$(mktemp)"
trap 'rm -f "$PIN"' EXIT
echo "torch==$TORCH_VERSION" > "$PIN"
mapfile -t PROJECT_DEPS < <("$VENV/bin/python" -c '
try:
    import tomllib
except ImportError:
    import tomli as tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
"${PIP[@]}" -c "$PIN" "${PROJECT_DEPS[@]}" "pytest>=8"

PJRT_DEVICE=CPU "$VENV/bin/python" -c 'import torch, torch_xla, lightning
print(f"torch {torch.__version__}, torch_xla {torch_xla.__version__}, lightning {lightning.__version__}")'
