"""One runner process per device for backends that train data-parallel over processes
(dpscale.backends.PROCESS_PER_DEVICE: torch.distributed).

The launcher re-executes `python -m dpscale.runner` (or a benchmark worker) with the same
arguments N times, each with
torch.distributed's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
threads // N threads; rank r computes on cuda:r of the GPUs the job was given. It waits for all;
if one fails, it stops the others and exits with that failure. A rank dies with the launcher
(Linux' parent-death signal), so a killed job leaves no rank training on: the rerun resumes from
rank 0's checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# Set in the ranks it starts: a RANK inherited from elsewhere (torchrun, a site's wrapper) must
# not make a runner believe it is one of them.
LAUNCHED = "DPSCALE_LAUNCHED"
# A run's secret root (privacy.secure_randomness) must be one for all its ranks: the launcher
# draws it and hands it down in the ranks' environment only (never an argument, file or log).
SECRET_ROOT = "DPSCALE_SECRET_ROOT"


def is_rank() -> bool:
    """Whether this process is a rank started by run_ranks (else it launches them)."""
    return os.environ.get(LAUNCHED) == "1"


def quiet_rank() -> bool:
    """Whether this process is a rank other than 0: rank 0 logs and writes for the run."""
    return is_rank() and os.environ.get("RANK") != "0"


def secret_root() -> int:
    """A fresh run's secret root: the launcher's (one for every rank), else 128 new bits."""
    inherited = os.environ.get(SECRET_ROOT) if is_rank() else None
    return int(inherited) if inherited else secrets.randbits(128)


def rank_env(rank: int, n: int, port: int, threads: int, root: int) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank))
    env[LAUNCHED], env[SECRET_ROOT] = "1", str(root)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DPSCALE_THREADS=str(threads))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    return env


def run_ranks(cmd: list[str], n: int, threads: int) -> int:
    """Run `cmd` (the runner, or a benchmark worker, taking --threads) as ranks 0..n-1 of one
    process group; the first failure's exit code."""
    per_rank = max(1, int(threads) // n)
    port = free_port()
    cmd = [*cmd, "--threads", str(per_rank)]
    print(f"launching {n} ranks (torch.distributed, {per_rank} thread(s) each)", flush=True)
    root = secrets.randbits(128)  # used only under secure_randomness, by every rank alike
    procs = [
        subprocess.Popen(cmd, env=rank_env(r, n, port, per_rank, root), preexec_fn=_die_with_parent)
        for r in range(n)
    ]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
