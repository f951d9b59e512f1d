"""What only the torch backends promise: clear errors on bad input, and Opacus' own epsilon.

Each backend's checks run in its own venv (one process per backend); the messages come back as
JSON and are asserted here.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from dpscale import backends, envs
from dpscale.workflow import thread_env
from tests.conftest import venv_python

TORCH_BACKENDS = [b for b in ("reference", "opacus") if b in backends.available()]
TORCH_BACKENDS = [b for b in TORCH_BACKENDS if b in envs.names()]
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

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
    a = Adapter(spec, {}, 0, 1)
    w = init_weights(spec, 0)
    error("wrong_shape", lambda: a.set_weights({**w, "fc.bias": np.zeros(7, np.float32)}))
    error("missing", lambda: a.set_weights({k: v for k, v in w.items() if k != "fc.weight"}))
    x = np.zeros((2, 8, 8, 3), np.float32)
    batch = Batch(x, np.zeros(2, np.int64), np.ones(2, bool))
    error("no_setup", lambda: a.train_step([batch], 0.1))
    bad = Batch(x, np.zeros(2, np.int64), np.ones(3, bool))
    error("bad_mask", lambda: a.clipped_grad_sum(bad, 1.0))
    with tempfile.NamedTemporaryFile(suffix=".pt") as f:
        import torch
        torch.save({"something": "else"}, f.name)
        error("bad_checkpoint", lambda: a.load_checkpoint(f.name))
    out["epsilon_nonprivate"] = a.backend_epsilon(0.01, 100, 1e-5)
    a.setup_training(StepConfig(True, 1.0, 1.1, 4.0, 0.9, 2))
    out["epsilon"] = a.backend_epsilon(256 / 50000, 2000, 1e-5)
    out["empty_loss"] = a.train_step([Batch(x, batch.y, np.zeros(2, bool))], 0.1)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module", params=TORCH_BACKENDS)
def probe(request):
    name = request.param
    proc = subprocess.run(
        [str(venv_python(name)), "-c", PROBE, name],
        capture_output=True,
        text=True,
        env=thread_env(1),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return name, json.loads(proc.stdout.strip().splitlines()[-1])


def test_bad_input_gets_one_clear_line(probe):
    name, out = probe
    expected = {
        "unknown_option": ["colour", "expected"],
        "wrong_shape": ["fc.bias", "(7,)", "expected (3,)"],
        "missing": ["fc.weight", "canonical names"],
        "no_setup": ["setup_training"],
        "bad_mask": ["mask", "expected"],
        "bad_checkpoint": [name, "checkpoint"],
    }
    if name == "opacus":
        expected["bad_mode"] = ["grad_sample_mode", "magic", "hooks, functorch, ghost"]
    for key, words in expected.items():
        message = out[key]
        assert message is not None, f"{key}: no error raised"
        assert "\n" not in message, f"{key}: message is not one line: {message!r}"
        for word in words:
            assert word in message, f"{key}: {word!r} not in {message!r}"


def test_empty_logical_batch_returns_zero_loss(probe):
    """Poisson sampling can draw nobody: the step runs (noise only) and the loss is 0, not NaN."""
    assert probe[1]["empty_loss"] == 0.0


def test_epsilon_is_opacus_rdp_with_its_orders(probe):
    name, out = probe
    assert out["epsilon_nonprivate"] is None, "no privacy statement before a private setup"
    if name != "opacus":
        assert out["epsilon"] is None, "the reference has no accountant of its own"
        return
    eps = out["epsilon"]
    assert eps["accountant"] == "opacus.accountants.RDPAccountant"
    assert (eps["sampling"], eps["delta"], eps["noise_multiplier"]) == ("poisson", 1e-5, 1.1)
    rdp = rdp_privacy_accountant.RdpAccountant(orders=OPACUS_ORDERS)
    rdp.compose(
        dp_accounting.PoissonSampledDpEvent(256 / 50000, dp_accounting.GaussianDpEvent(1.1)), 2000
    )
    # Same RDP bound and the same order list: equal up to float rounding (environments.md).
    assert eps["epsilon"] == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
