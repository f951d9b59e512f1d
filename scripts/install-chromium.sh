#!/usr/bin/env bash
# Debian's chromium for the report's browser test (tests/report/test_browser.py).
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (CI starts as root on a
# clean Debian machine); apt's output goes to stderr so callers can keep stdout for the path.
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
    echo "$CHROMIUM"
    exit 0
fi
"$(dirname "$0")/apt-install.sh" --no-recommends chromium fonts-dejavu-core
if [ ! -x "$CHROMIUM" ]; then
    echo "install-chromium.sh: apt-get installed chromium but $CHROMIUM is still missing" >&2
    exit 1
fi
echo "$CHROMIUM"
