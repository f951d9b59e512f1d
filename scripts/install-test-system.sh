#!/usr/bin/env bash
# The system packages the test suite needs: Debian's chromium (the report's browser test) and
# SLURM with munge and MariaDB (the local cluster of tests/slurm). `make test` runs this beside
# the venv builds, so the downloads overlap them. Without root or apt-get it installs nothing
# and says so; the tests then name what is missing (a failure under CI, a skip elsewhere).
set -uo pipefail
here=$(dirname "$0")
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "install-test-system.sh: not root or no apt-get: the browser and SLURM tests need" \
        "chromium and SLURM installed by hand" >&2
    exit 0
fi
set -e
"$here/install-chromium.sh" >/dev/null
"$here/slurm/start.sh" --install-only
