"""conv_patches (the DP step's convolution on CPU in the jax and objax backends) is XLA's
convolution, in both layouts and under both JAX releases; and so are its per-example gradients.
"""

from __future__ import annotations

import textwrap

import pytest

from tests import jobs
from tests.conftest import probe_job, run_probe

JAX_BACKENDS = ["jax", "objax"]

PROBE = textwrap.dedent(
    """
    import json
    import numpy as np
    import jax
    import jax.numpy as jnp
    from jax import lax
    from dpscale.backends import _jax_common as jc

    rng = np.random.default_rng(0)
    out = {}
    # (in, out, kernel, stride, pad, size): the ResNet's 3x3 / 1x1 / 7x7 stem, odd sizes.
    for cin, cout, k, stride, pad, size in [(3, 4, 3, 1, 1, 8), (4, 6, 3, 2, 1, 9),
                                            (4, 6, 1, 2, 0, 8), (3, 4, 7, 2, 3, 12)]:
        w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))  # HWIO
        for layout in ("NHWC", "NCHW"):
            shape = (5, size, size, cin) if layout == "NHWC" else (5, cin, size, size)
            x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
            def xla(w, x):
                return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
                                                dimension_numbers=(layout, "HWIO", layout))
            def mine(w, x):
                return jc.conv_patches(jnp, x, w, stride, pad, layout)
            def per_example_grads(f):
                loss = lambda w, xi: jnp.sum(jnp.tanh(f(w, xi[None])))
                return jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, x)
            a, b = xla(w, x), mine(w, x)
            ga, gb = per_example_grads(xla), per_example_grads(mine)
            out[f"{layout}-{cin}-{cout}-k{k}-s{stride}"] = {
                "shapes": [list(a.shape), list(b.shape)],
                "diff": float(jnp.abs(a - b).max()), "scale": float(jnp.abs(a).max()),
                "grad_diff": float(jnp.abs(ga - gb).max()), "grad_scale": float(jnp.abs(ga).max()),
            }
    print(json.dumps(out))
    """
)


@jobs.source
def _probe_jobs(item):
    if item.module.__name__ == __name__:
        yield probe_job(item.callspec.params["backend"], PROBE)


@pytest.mark.parametrize("backend", JAX_BACKENDS)
def test_conv_patches_is_xla_convolution_and_so_are_its_gradients(backend):
    cases = run_probe(backend, PROBE)
    assert len(cases) == 8
    for name, case in cases.items():
        assert case["shapes"][0] == case["shapes"][1], name
        assert case["diff"] <= 1e-5 * case["scale"], (name, case)
        assert case["grad_diff"] <= 1e-5 * case["grad_scale"], (name, case)
