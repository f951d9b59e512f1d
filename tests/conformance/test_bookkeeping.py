"""The reference backend's Book-Keeping (mode bk) against its vmap oracle, on every conv path.

The conformance models (width 4) never reach the grouped-convolution per-example path (>= 256
output positions and >= 64 inputs per position, on CPU), so this case (width 8, 16 px) is
sized to take all three: grouped per-example gradients (stage 1), unfold + bmm (the stem,
stage 2) and ghost norms (stages 3 and 4); also with the stem and stage 1 frozen. Runs in the
reference venv; results come back as JSON.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from tests import jobs
from tests.conftest import probe_job, run_probe

PROBE = textwrap.dedent(
    """
    import json
    import numpy as np
    import torch
    from torch import nn
    from dpscale.backends import _bookkeeping_torch as bk, load
    from dpscale.backends.base import Batch
    from dpscale.models.resnet import ResNetSpec, frozen_names

    spec = ResNetSpec(num_classes=3, image_size=16, width=8, groups=2)
    rng = np.random.default_rng(1)
    batch = Batch(rng.normal(size=(7, 16, 16, 3)).astype(np.float32), rng.integers(0, 3, 7),
                  np.array([1, 1, 0, 1, 1, 1, 1], bool))
    out = {"sums": {}, "paths": {}}
    for frozen in (0, 1):
        for mode in ("vmap", "bk"):
            a = load("reference")(spec, {"mode": mode}, 0, 1)
            a.freeze(frozen_names(spec, frozen))
            for clip in (0.05, 1e9):
                grads = a.clipped_grad_sum(batch, clip)
                out["sums"][f"{mode}-{frozen}-{clip:g}"] = {
                    n: g.ravel().tolist() for n, g in grads.items()}
            out[f"mode-{mode}"] = a.mode

    # Which path each conv of the model takes, from its shapes (the rule's own functions).
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0], o)))
             for m in a.model.modules() if isinstance(m, nn.Conv2d)]
    a.model(torch.zeros(1, 3, 16, 16))
    for m, x, y in seen:
        if bk.use_ghost_norm(y.shape[2] * y.shape[3], m.weight.numel()):
            path = "ghost"
        else:
            path = "grouped" if bk.grouped_wins(m, x, y) else "unfold"
        out["paths"][path] = out["paths"].get(path, 0) + 1

    errors = []
    try:
        bk.tracked_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    except ValueError as err:
        errors.append(str(err))
    try:
        load("reference")(spec, {"mode": "ghost"}, 0, 1)
    except ValueError as err:
        errors.append(str(err))
    out["errors"] = errors
    print(json.dumps(out))
    """
)


@jobs.source
def _probe_jobs(item):
    if item.module.__name__ == __name__ and "probe" in item.fixturenames:
        yield probe_job("reference", PROBE)


@pytest.fixture(scope="module")
def probe() -> dict:
    return run_probe("reference", PROBE)


def test_every_conv_path_is_taken(probe):
    assert probe["mode-bk"] == "reference-bk" and probe["mode-vmap"] == "reference-torch.func"
    assert set(probe["paths"]) == {"ghost", "grouped", "unfold"}, probe["paths"]


@pytest.mark.parametrize("frozen", [0, 1])
@pytest.mark.parametrize("clip", ["0.05", "1e+09"])
def test_bookkeeping_sums_equal_the_vmap_oracle(probe, frozen, clip):
    bk, oracle = probe["sums"][f"bk-{frozen}-{clip}"], probe["sums"][f"vmap-{frozen}-{clip}"]
    assert sorted(bk) == sorted(oracle)
    scale = max(np.abs(g).max() for g in oracle.values())
    for name, g in oracle.items():
        err = np.abs(np.subtract(bk[name], g)).max()
        assert err <= 1e-4 * scale, f"{name} off by {err:.3g} (scale {scale:.3g})"
    # Frozen parameters get no gradient (the sums hold the trainable ones only).
    assert any(n.startswith(("conv1.", "gn1.", "layer1.")) for n in bk) == (not frozen)


def test_bad_layers_and_modes_are_one_line_errors(probe):
    layer, mode = probe["errors"]
    assert "BatchNorm2d" in layer and "expected only Conv2d, Linear and GroupNorm" in layer
    assert "mode='ghost'" in mode and "vmap, bk" in mode
    assert "\n" not in layer + mode
