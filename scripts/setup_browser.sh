#!/usr/bin/env bash
# Chromium for the feature browser's tests (tests/test_browse_site.py, marked `browser`),
# from Debian's packages; Playwright (the test extra) drives it. Does nothing when a
# Chromium is already on PATH. Needs root or sudo for apt-get.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null; then
  exit 0
fi
SUDO=""
[[ $(id -u) -eq 0 ]] || SUDO="sudo"
$SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends chromium
