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
if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium.sh: $CHROMIUM is missing and installing it needs root (apt-get)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >&2
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >&2
if [ ! -x "$CHROMIUM" ]; then
    echo "install-chromium.sh: apt-get installed chromium but $CHROMIUM is still missing" >&2
    exit 1
fi
echo "$CHROMIUM"
