#!/usr/bin/env bash
# Stop the local cluster started by start.sh: each daemon by its pid file, in reverse start order.
# Stopping a cluster that is not running is a no-op.
set -euo pipefail
source "$(dirname "$0")/common.sh"

for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    d=${DAEMONS[i]}
    pid=$(running_pid "$d") || continue
    log "stopping $d (pid $pid)"
    kill -TERM "$pid"
    for ((t = 0; t < 60 && ${#pid} > 0; t++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.5
    done
    if [[ -d /proc/$pid ]]; then
        log "$d (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$(pidfile "$d")"
done
