#!/usr/bin/env bash
# Exit 0 if every daemon of the local cluster runs (by its pid file), else 1; prints each one.
set -uo pipefail
source "$(dirname "$0")/common.sh"

rc=0
for d in "${DAEMONS[@]}"; do
    if pid=$(running_pid "$d"); then
        echo "$d: running (pid $pid)"
    else
        echo "$d: stopped"
        rc=1
    fi
done
exit $rc
