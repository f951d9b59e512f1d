#!/usr/bin/env bash
# Install the Debian packages named that are missing: `apt-install.sh [--no-recommends] PKG...`.
# Shared by install-chromium.sh, slurm/start.sh and install-test-system.sh. Needs root when
# something is missing; a no-op when everything is installed. Output goes to stderr.
set -euo pipefail

opts=()
if [[ ${1:-} == --no-recommends ]]; then
    opts+=(--no-install-recommends)
    shift
fi
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "apt-install.sh: ${missing[*]} missing; installing needs root and apt-get" >&2
    exit 1
fi
echo "apt-install.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# One index refresh per hour is plenty, and saves each caller its own.
if [[ -z $(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -60 2>/dev/null) ]]; then
    apt-get update -qq >&2
fi
apt-get install -y -qq "${opts[@]}" "${missing[@]}" >&2
