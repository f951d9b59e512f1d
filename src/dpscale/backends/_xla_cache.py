"""Where XLA's persistent compilation caches live (jax, objax, tfprivacy); imports no framework.

Every training job of a grid compiles the same shapes: with a persistent cache only the first
job pays (Objax's PGV: ~1.5 CPU-minutes; TF Privacy's DP step: ~20 s). Compiled CPU code is
specific to the CPU it was compiled for, and neither JAX's nor TensorFlow's cache key says which
CPU that was, so the default folder is keyed by the host's CPU model and features: nodes of a
heterogeneous cluster that share a venv never load each other's code (TensorFlow would only log
"could lead to execution errors such as SIGILL" and run it).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path


def host_key() -> str:
    """A short name for this machine's CPU: architecture, model and feature flags."""
    seen: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags", "Features", "CPU part") and key not in seen:
                    seen[key] = value.strip()
    except OSError:  # not Linux: the architecture and processor name are what we have
        seen["processor"] = platform.processor()
    text = platform.machine() + "\n" + "\n".join(f"{k}={v}" for k, v in sorted(seen.items()))
    return f"{platform.machine()}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def cache_dir(option, env_var: str, folder: str) -> str | None:
    """The cache folder for backend option `compilation_cache`: None if false; the string if a
    path; if true, $<env_var> when set, else <venv>/<folder>/<host_key()> (the venv is keyed by
    its requirements' hash, so by the framework's version)."""
    if option is False or option is None:
        return None
    if isinstance(option, str):
        return option
    if option is not True:
        raise ValueError(f"option compilation_cache={option!r}; expected true, false or a path")
    return os.environ.get(env_var) or str(Path(sys.prefix) / folder / host_key())
