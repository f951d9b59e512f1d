"""What only the torch backends promise: clear errors on bad input, and Opacus' own epsilon.

Each backend's checks run in its own venv (one process per backend); the messages come back as
JSON and are asserted here.
"""

from __future__ import annotations

import json
import textwrap

import pytest

from tests import jobs
from tests.conftest import probe_job, run_probe

TORCH_BACKENDS = ["reference", "opacus"]

PROBE = textwrap.dedent(
    """
    import json, sys, tempfile
    import numpy as np
    from dpscale.backends import load
    from dpscale.backends.base import Batch, StepConfig
    from dpscale.models.resnet import ResNetSpec, init_weights

    name = sys.argv[1]
    Adapter = load(name)
    spec = ResNetSpec(num_classes=3, image_size=8, width=4, groups=2)
    out = {}

    def error(key, fn):
        try:
            fn()
        except Exception as err:
            out[key] = f"{type(err).__name__}: {err}"
        else:
            out[key] = None

    error("unknown_option", lambda: Adapter(spec, {"colour": 1}, 0, 1))
    if name == "opacus":
        error("bad_mode", lambda: Adapter(spec, {"grad_sample_mode": "magic"}, 0, 1))
        error("bad_fast", lambda: Adapter(spec, {"fast_samplers": "yes"}, 0, 1))
        stock_bk = {"grad_sample_mode": "bk", "fast_samplers": False}
        error("bk_stock", lambda: Adapter(spec, stock_bk, 0, 1))
    a = Adapter(spec, {}, 0, 1)
    w = init_weights(spec, 0)
    error("wrong_shape", lambda: a.set_weights({**w, "fc.bias": np.zeros(7, np.float32)}))
    error("missing", lambda: a.set_weights({k: v for k, v in w.items() if k != "fc.weight"}))
    x = np.zeros((2, 8, 8, 3), np.float32)
    batch = Batch(x, np.zeros(2, np.int64), np.ones(2, bool))
    error("no_setup", lambda: a.train_step([batch], 0.1))
    bad = Batch(x, np.zeros(2, np.int64), np.ones(3, bool))
    error("bad_mask", lambda: a.clipped_grad_sum(bad, 1.0))
    out["epsilon_nonprivate"] = a.backend_epsilon(0.01, 100, 1e-5)
    a.setup_training(StepConfig(True, 1.0, 1.1, 4.0, 0.9, 2))
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        import torch
        torch.save({"something": "else"}, f.name)
        error("bad_checkpoint", lambda: a.load_checkpoint(f.name))
    out["epsilon"] = a.backend_epsilon(256 / 50000, 2000, 1e-5)
    out["empty_loss"] = a.train_step([Batch(x, batch.y, np.zeros(2, bool))], 0.1)
    print(json.dumps(out))
    """
)


@jobs.source
def _probe_jobs(item):
    if item.module.__name__ != __name__:
        return
    if "probe" in item.fixturenames:
        name = item.callspec.params["probe"]
        yield probe_job(name, PROBE, name)
    if "freeze_probes" in item.fixturenames:
        for name, options in FREEZE_CASES:
            yield probe_job(name, FREEZE_PROBE, name, json.dumps(options))


@pytest.fixture(scope="module", params=TORCH_BACKENDS)
def probe(request):
    name = request.param
    return name, run_probe(name, PROBE, name)


def test_bad_input_gets_one_clear_line(probe):
    name, out = probe
    expected = {
        "unknown_option": ["colour", "expected"],
        "wrong_shape": ["fc.bias", "(7,)", "expected (3,)"],
        "missing": ["fc.weight", "canonical names"],
        "no_setup": ["setup_training"],
        "bad_mask": ["mask", "expected"],
        "bad_checkpoint": [name, "checkpoint", "expected"],
    }
    if name == "opacus":
        expected["bad_mode"] = ["grad_sample_mode", "magic", "hooks, functorch, ghost, bk"]
        expected["bad_fast"] = ["fast_samplers", "'yes'", "true or false"]
        expected["bk_stock"] = ["fast_samplers=false", "grad_sample_mode=bk", "expected"]
    for key, words in expected.items():
        message = out[key]
        assert message is not None, f"{key}: no error raised"
        assert "\n" not in message, f"{key}: message is not one line: {message!r}"
        for word in words:
            assert word in message, f"{key}: {word!r} not in {message!r}"


def test_empty_logical_batch_returns_zero_loss(probe):
    """Poisson sampling can draw nobody: the step runs (noise only) and the loss is 0, not NaN."""
    assert probe[1]["empty_loss"] == 0.0


def test_epsilon_is_opacus_rdp_after_a_private_setup(probe):
    """Its value is checked against dp_accounting in test_conformance.py, at several queries."""
    name, out = probe
    assert out["epsilon_nonprivate"] is None, "no privacy statement before a private setup"
    if name != "opacus":
        assert out["epsilon"] is None, "the reference has no accountant of its own"
        return
    eps = out["epsilon"]
    assert eps["accountant"] == "opacus.accountants.RDPAccountant"
    assert (eps["sampling"], eps["delta"], eps["noise_multiplier"]) == ("poisson", 1e-5, 1.1)


# Transfer learning (training.frozen_groups): frozen parameters get no gradient, no noise and no
# update; the DP machinery clips the norm over the trainable ones only.
FREEZE_PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from dpscale.backends import load
    from dpscale.backends.base import Batch, StepConfig
    from dpscale.models.resnet import ResNetSpec, frozen_names, init_weights

    name, options = sys.argv[1], json.loads(sys.argv[2])
    spec = ResNetSpec(num_classes=3, image_size=8, width=4, groups=2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    batch = Batch(x, rng.integers(0, 3, 6), np.array([1, 1, 1, 1, 1, 0], bool))
    a = load(name)(spec, options, 0, 1)
    frozen = frozen_names(spec, 3)
    a.freeze(frozen)
    grads = a.clipped_grad_sum(batch, 0.01)
    before = a.get_weights()
    a.setup_training(StepConfig(True, 1.0, 1.5, 4.0, 0.9, 6))
    a.train_step([batch], 0.5)
    after = a.get_weights()
    moved = sorted(n for n in before if not np.array_equal(before[n], after[n]))
    print(json.dumps({
        "frozen": frozen,
        "moved": moved,
        "grads": {n: g.ravel().tolist() for n, g in grads.items()},
    }))
    """
)
FREEZE_CASES = [("reference", {})] + [
    ("opacus", {"grad_sample_mode": m}) for m in ("hooks", "functorch", "ghost", "bk")
]


def _freeze_probe(name: str, options: dict) -> dict:
    return run_probe(name, FREEZE_PROBE, name, json.dumps(options))


@pytest.fixture(scope="module")
def freeze_probes() -> dict:
    return {
        f"{name}-{options.get('grad_sample_mode', '')}": _freeze_probe(name, options)
        for name, options in FREEZE_CASES
    }


def test_frozen_parameters_are_never_updated_and_the_rest_are(freeze_probes):
    for case, out in freeze_probes.items():
        frozen = set(out["frozen"])
        assert frozen and "fc.weight" not in frozen
        assert not frozen & set(out["moved"]), f"{case}: a frozen parameter moved"
        # Everything else moves (noise reaches every trainable parameter).
        assert set(out["moved"]) >= {"fc.weight", "fc.bias", "layer4.1.conv2.weight"}, case
        assert set(out["grads"]).isdisjoint(frozen), f"{case}: gradient of a frozen parameter"


def test_frozen_models_clip_the_same_in_every_torch_backend(freeze_probes):
    """Clipping at C=0.01 binds for every example, so the sums agree only if each backend takes
    the per-example norm over the same (trainable) parameters."""
    ref = freeze_probes["reference-"]["grads"]
    for case, out in freeze_probes.items():
        assert set(out["grads"]) == set(ref), case
        for n, g in out["grads"].items():
            assert g == pytest.approx(ref[n], rel=1e-3, abs=1e-6), f"{case}: {n}"
