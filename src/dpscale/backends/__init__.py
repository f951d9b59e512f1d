"""Backends: one adapter module per framework, found by name.

A backend `<name>` is the module `dpscale.backends.<name>` (defining `Adapter`) plus the
requirements file `workflow/envs/<name>.txt` of the venv it runs in. Modules here import their
framework at top level, so only import a backend inside its own environment.
"""

from __future__ import annotations

import importlib
from pathlib import Path

_HERE = Path(__file__).parent
_NOT_BACKENDS = {"base"}
# Backends whose adapter implements `freeze` (training.frozen_groups, transfer learning).
FREEZING = ("opacus", "reference")
# Backends that share a logical step over training.devices > 1 (base.Adapter.multi_device).
MULTI_DEVICE = ("jax", "jaxprivacy", "opacus", "reference")
# Of those, the ones that run one process per device (torch.distributed; the runner starts
# them): jax and jaxprivacy shard over the local devices of one process instead.
PROCESS_PER_DEVICE = ("opacus", "reference")


def available() -> list[str]:
    """Names of the backends that have an adapter module (no framework is imported)."""
    return sorted(
        p.stem
        for p in _HERE.glob("*.py")
        if not p.stem.startswith("_") and p.stem not in _NOT_BACKENDS
    )


def load(name: str):
    """The Adapter class of backend `name` (imports its framework)."""
    if name not in available():
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(available())}")
    return importlib.import_module(f"dpscale.backends.{name}").Adapter
