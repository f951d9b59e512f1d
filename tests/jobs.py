"""The suite's heavy work as jobs on a pool that keeps every core busy.

Most of the suite's time is subprocesses: a backend's venv running the conformance driver, a
probe or a training run (one core each), and Snakemake runs (all cores). Run one after another
from the test that needs it, a one-core subprocess leaves the other cores idle. Instead, a test
module declares the jobs its tests need with `@source` (a function from a collected test item
to its jobs); when the session starts, every selected item's jobs are queued in test order and
started strictly in that order, each taking the cores it declares, while they fit in the
machine's cores plus one: a Snakemake run does not keep all its cores busy through its whole
DAG, nor a training job through its imports, and one job more than cores fills those gaps
(docs/testing.md has the measured effect). A test then
waits for its job's result (`result(job)`), which usually finished while earlier tests ran.
The same job (by key) runs once per session however many tests use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dpscale.workflow import thread_env


@dataclass(frozen=True)
class Job:
    key: str  # what makes two jobs the same job
    run: Callable[[], Any]
    # Cores it keeps busy; None: all of them (a Snakemake run); 0: none, it mostly waits (for
    # SLURM's scheduler, say), so it starts at once, ahead of the queue.
    cores: int | None = 1


SOURCES: list[Callable[[pytest.Item], Iterable[Job]]] = []


def source(fn: Callable[[pytest.Item], Iterable[Job]]):
    """Register `fn(item) -> jobs that test item needs` (a decorator, at module level)."""
    SOURCES.append(fn)
    return fn


class Pool:
    """Runs jobs in submission order, as many at once as their cores fit in `cores` + 1."""

    def __init__(self, cores: int, root: Path) -> None:
        self.cores, self.root = max(1, cores), root
        self.slots = self.cores + 1
        self._free = self.slots
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._futures: dict[str, Future] = {}
        self._procs: set[subprocess.Popen] = set()
        self._closed = False
        self.created = time.monotonic()
        self.timings: dict[str, tuple[int, float, float]] = {}  # key -> (cores, start, end)
        threading.Thread(target=self._dispatch, name="jobs", daemon=True).start()

    def submit(self, job: Job, *, first: bool = False) -> Future:
        """Queue `job` (at the front if `first`) unless a job with its key already exists."""
        with self._cond:
            if job.key not in self._futures:
                self._futures[job.key] = Future()
                if job.cores == 0:
                    self._start(job, 0)
                else:
                    (self._queue.appendleft if first else self._queue.append)(job)
                    self._cond.notify_all()
            elif first:  # wanted now: if still queued, move it to the front
                queued = next((j for j in self._queue if j.key == job.key), None)
                if queued is not None:
                    self._queue.remove(queued)
                    self._queue.appendleft(queued)
            return self._futures[job.key]

    def _need(self, job: Job) -> int:
        return self.cores if job.cores is None else min(job.cores, self.cores)

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._closed or (self._queue and self._free >= self._need(self._queue[0]))
                    )
                )
                if self._closed:
                    return
                job = self._queue.popleft()
                need = self._need(job)
                self._free -= need
            self._start(job, need)

    def _start(self, job: Job, need: int) -> None:
        threading.Thread(target=self._run, args=(job, need), name=job.key, daemon=True).start()

    def _run(self, job: Job, need: int) -> None:
        future = self._futures[job.key]
        start = time.monotonic()
        try:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job.run())
                except BaseException as err:  # pytest.fail raises a BaseException
                    future.set_exception(err)
        finally:
            with self._cond:
                self.timings[job.key] = (
                    need,
                    start - self.created,
                    time.monotonic() - self.created,
                )
                self._free += need
                self._cond.notify_all()

    def report(self, top: int = 25) -> list[str]:
        """The slowest jobs (wall seconds, cores, when they started) and how busy the pool was."""
        rows = sorted(self.timings.items(), key=lambda kv: kv[1][1] - kv[1][2])
        lines = [f"{end - start:8.1f}s  {cores} core(s)  from {start:7.1f}s  {key}"
                 for key, (cores, start, end) in rows[:top]]  # fmt: skip
        if self.timings:
            span = max(end for _, _, end in self.timings.values())
            busy = sum(c * (e - s) for c, s, e in self.timings.values())
            lines.append(
                f"{len(self.timings)} jobs in {span:.0f} s: {busy:.0f} core-seconds, "
                f"{busy / (span * self.slots):.0%} of {self.slots} slots ({self.cores} cores)"
            )
        return lines

    def track(self, proc: subprocess.Popen, running: bool) -> None:
        with self._cond:
            (self._procs.add if running else self._procs.discard)(proc)

    def close(self) -> None:
        """Cancel what has not started and kill what still runs (an aborted session)."""
        with self._cond:
            self._closed = True
            for job in self._queue:
                self._futures[job.key].cancel()
            self._queue.clear()
            procs = list(self._procs)
            self._cond.notify_all()
        for proc in procs:
            _kill(proc)


_POOL: Pool | None = None
_LOCK = threading.Lock()


def start(root: Path, cores: int | None = None) -> Pool:
    global _POOL
    _POOL = Pool(cores or os.cpu_count() or 1, root)
    return _POOL


def started() -> bool:
    return _POOL is not None


def pool() -> Pool:
    if _POOL is None:
        raise RuntimeError("no job pool: tests/conftest.py's job_pool fixture starts it")
    return _POOL


def result(job: Job) -> Any:
    """The job's result, waiting for it (and running it next if nothing queued it)."""
    return pool().submit(job, first=True).result()


def workdir(name: str) -> Path:
    """A directory of this session for jobs of one kind."""
    path = pool().root / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def slug(key: str) -> str:
    """A short file-name-safe name for a job key."""
    words = re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-")[:40]
    return f"{words}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def write_once(path: Path, write: Callable[[Any], None]) -> None:
    """Write `path` with `write(file)` unless it exists; jobs in other threads wait for it."""
    with _LOCK:
        if path.exists():
            return
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)


def _kill(proc: subprocess.Popen) -> None:
    """The process and everything it started (its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(
    cmd: list[str], *, threads: int, timeout: float, cwd=None, env=None, stdout=None
) -> subprocess.CompletedProcess:
    """subprocess.run with `threads` threads per numeric library, killed (with its children)
    past `timeout` or when the session aborts. Output is captured unless `stdout` is a file."""
    env = {**thread_env(threads), **(env or {})}
    capture = stdout is None
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE if capture else stdout,
        stderr=subprocess.PIPE if capture else subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    pool().track(proc, True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        out, err = proc.communicate()
        pytest.fail(f"ran past {timeout} s: {' '.join(map(str, cmd))}\n{(err or '')[-3000:]}")
    finally:
        pool().track(proc, False)
    return subprocess.CompletedProcess(cmd, proc.returncode, out or "", err or "")


def check_run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`run`, failing the test that waits for it (with the output's tail) on a non-zero exit."""
    done = run(cmd, **kwargs)
    if done.returncode != 0:
        pytest.fail(
            f"exit {done.returncode}: {' '.join(map(str, cmd))}\n"
            f"{(done.stdout + done.stderr)[-3000:]}"
        )
    return done
