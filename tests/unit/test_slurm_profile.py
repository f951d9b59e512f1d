"""The SLURM profile gives every registered backend's training rule a GPU, with no list to edit."""

from __future__ import annotations

import yte

from dpscale import backends, envs


def test_every_backend_trains_on_a_gpu_node():
    with open(envs.PROJECT / "profiles/slurm/config.yaml") as f:
        profile = yte.process_yaml(f, require_use_yte=True)
    resources = profile["set-resources"]
    for name in backends.available():
        train = resources[f"train_{name}"]
        assert train["gpu"] == 1 and train["slurm_partition"] == "debug", name
    assert profile["set-threads"]["prepare"] > 1 and "gpu" not in resources["prepare"]
