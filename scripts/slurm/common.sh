# Shared by start.sh, stop.sh and status.sh: where the local cluster's daemons keep their pid files.
# Sourced, not run.
CLUSTER_NAME=${DPSCALE_SLURM_CLUSTER:-localcluster}
ACCOUNT=${DPSCALE_SLURM_ACCOUNT:-dpscale}
PARTITION=${DPSCALE_SLURM_PARTITION:-debug}
FAKE_GPUS=2
ETC=/etc/slurm
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Start order; stop.sh walks it backwards.
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

pidfile() {
    case $1 in
        munged) echo /run/munge/munged.pid ;;
        mariadbd) echo /run/mysqld/mysqld.pid ;;
        slurmdbd | slurmctld | slurmd) echo "/run/slurm/$1.pid" ;;
    esac
}

# The pid in the daemon's pid file, if that process is alive and is that daemon.
running_pid() {
    local file pid
    file=$(pidfile "$1")
    [[ -s $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -d /proc/$pid ]] || return 1
    grep -q "$1" "/proc/$pid/comm" 2>/dev/null || return 1
    echo "$pid"
}

log() { echo "slurm-local: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}
