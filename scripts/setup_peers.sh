#!/usr/bin/env bash
# A separate virtualenv for the peer tier (tests marked `peer`): the package with its `test`
# and `bench` extras (SAELens, pinned), plus circuit-tracer beside it without its
# dependencies: circuit-tracer 0.5.0 pins transformers<=4.57.3, which would replace the
# transformers this package runs on, and its load_clt needs none of what it pins.
#
#   bash scripts/setup_peers.sh          # creates .venv-bench (git-ignored)
#   .venv-bench/bin/python -m pytest -m peer
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-bench}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints-cpu.txt -e ".[test,bench]"
SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --target "$SITE/../circuit_tracer_pkgs" \
    circuit-tracer==0.5.0
# A .pth file puts the --target folder on the venv's path after its own packages.
echo "$(cd "$SITE/../circuit_tracer_pkgs" && pwd)" > "$SITE/circuit_tracer_pkgs.pth"
