#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (as root): munged, MariaDB, slurmdbd,
# slurmctld and slurmd, with accounting on (so `sacct` answers) and 2 fake GPUs.
# Installs Debian's packages if missing (`--install-only`: that, and start nothing). Idempotent:
# daemons already running (by their pid files) are left alone, so a second start is a no-op.
# Stop with scripts/slurm/stop.sh.
set -euo pipefail
source "$(dirname "$0")/common.sh"

[[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons); got uid $(id -u)"

all_running() {
    local d
    for d in "${DAEMONS[@]}"; do running_pid "$d" >/dev/null || return 1; done
}
if all_running && sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    log "already running (cluster $CLUSTER_NAME)"
    exit 0
fi

# Poll `$@` every 0.5 s for up to $1 seconds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local i
    for ((i = 0; i < secs * 2; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.5
    done
    die "$what did not come up in ${secs} s; see its log under /var/log"
}

# --- packages ----------------------------------------------------------------------------------
"$HERE/../apt-install.sh" munge slurmctld slurmd slurm-client slurmdbd mariadb-server
[[ ${1:-} == --install-only ]] && exit 0

mkdir -p /run/munge /run/slurm /run/mysqld /var/lib/slurm/slurmctld /var/lib/slurm/slurmd \
    /var/log/slurm /var/log/munge "$ETC"
chown munge:munge /run/munge /var/log/munge
chown slurm:slurm /run/slurm /var/lib/slurm /var/lib/slurm/slurmctld /var/log/slurm
chown mysql:mysql /run/mysqld

# --- munge -------------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating the munge key"
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
if ! running_pid munged >/dev/null; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 munged munge -n
fi

# --- MariaDB (accounting storage) ---------------------------------------------------------------
if [[ ! -d /var/lib/mysql/mysql ]]; then
    log "initialising the MariaDB data directory"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
fi
if ! running_pid mariadbd >/dev/null; then
    log "starting mariadbd"
    rm -f /run/mysqld/mysqld.pid
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
        --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 \
        </dev/null >>/var/log/slurm/mariadbd.log 2>&1 &
    wait_for 60 mariadbd mariadb -e 'SELECT 1'
fi

# The database password only needs to stay on this machine: keep it beside the config.
DBPASS_FILE=$ETC/.dbpass
[[ -s $DBPASS_FILE ]] || (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DBPASS_FILE")
DBPASS=$(cat "$DBPASS_FILE")
mariadb <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL

# --- configuration -----------------------------------------------------------------------------
HOST=$(hostname -s)
# CPUs/Boards/Sockets/Cores/Threads as slurmd sees them; RealMemory from MemAvailable instead,
# so the node never claims memory that is not there (a claim over the real total makes it INVAL).
HARDWARE=$(slurmd -C | head -1 | tr ' ' '\n' |
    grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
[[ $HARDWARE == *CPUs=* ]] || die "slurmd -C printed no hardware line; expected 'NodeName=... CPUs=...'"
avail_mb=$(awk '/^MemAvailable:/ {print int($2 / 1024)}' /proc/meminfo)
REALMEM=$((avail_mb * 85 / 100))

render() {
    sed -e "s|@CLUSTER@|$CLUSTER_NAME|g" -e "s|@HOST@|$HOST|g" -e "s|@HARDWARE@|$HARDWARE|g" \
        -e "s|@REALMEM@|$REALMEM|g" -e "s|@GPUS@|$FAKE_GPUS|g" -e "s|@LASTGPU@|$((FAKE_GPUS - 1))|g" \
        -e "s|@PARTITION@|$PARTITION|g" -e "s|@DBPASS@|$DBPASS|g" "$HERE/$1.in" >"$ETC/$1"
}
render slurm.conf
render gres.conf
render slurmdbd.conf
chown slurm:slurm "$ETC/slurmdbd.conf"
chmod 600 "$ETC/slurmdbd.conf"
chmod 644 "$ETC/slurm.conf" "$ETC/gres.conf"

for ((i = 0; i < FAKE_GPUS; i++)); do
    [[ -e /dev/fakegpu$i ]] || mknod -m 0666 "/dev/fakegpu$i" c 1 3
done

# --- slurmdbd, cluster/account/user ------------------------------------------------------------
if ! running_pid slurmdbd >/dev/null; then
    log "starting slurmdbd"
    /usr/sbin/slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
fi
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME" ||
    sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null
sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" ||
    sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER_NAME" Description=dpscale Organization=dpscale >/dev/null
sacctmgr -n -P list user format=user | grep -qx root ||
    sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER_NAME" >/dev/null
sacctmgr -n -P list assoc where user=root account="$ACCOUNT" format=account | grep -qx "$ACCOUNT" ||
    sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER_NAME" >/dev/null

# --- slurmctld, slurmd ---------------------------------------------------------------------------
if ! running_pid slurmctld >/dev/null; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
    wait_for 60 slurmctld scontrol ping
fi
if ! running_pid slurmd >/dev/null; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

node_ready() { sinfo -h -n "$HOST" -o %T | grep -qE '^(idle|mixed|allocated)$'; }
for ((i = 0; i < 120; i++)); do
    node_ready && break
    # A node left down/drained by an earlier run comes back once resumed.
    if sinfo -h -n "$HOST" -o %T | grep -qE '^(down|drained|drain)'; then
        scontrol update nodename="$HOST" state=resume 2>/dev/null || true
    fi
    sleep 0.5
done
node_ready || die "node $HOST is $(sinfo -h -n "$HOST" -o %T); expected idle (see /var/log/slurm/slurmd.log)"
log "up: cluster $CLUSTER_NAME, node $HOST ($HARDWARE RealMemory=$REALMEM, $FAKE_GPUS fake GPUs), account $ACCOUNT"
