"""Every backend against the from-scratch reference, each in its own venv.

Parametrized over every backend with an adapter module and a requirements file (later backends
join by existing), and over the DP mechanisms a backend offers (VARIANTS_OF). Each variant runs
`python -m dpscale.conformance` once in its venv on all CASES (tiny models: the arrays are
compared here, in the base env, against the reference backend's).

Tolerances (float32 throughout; torch backends agree to ~1e-6 relative, see the report):
- logits: max abs difference <= 1e-4 * max |reference logits|;
- gradient sums and updates: max abs difference <= 1e-4 * max |reference| over all parameters,
  and relative L2 error <= 1e-4;
- noise: empirical std of the all-padding update within 3% of sigma*C/B (~44k parameters give
  a standard error of ~0.35%), mean within 6 standard errors of 0;
- determinism, weights round trip: exact; resume from a checkpoint: <= 1e-6 abs.
"""

from __future__ import annotations

import json
import math
import subprocess

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from dpscale import backends, conformance, envs
from dpscale.models.resnet import ResNetSpec, init_weights, num_params
from dpscale.workflow import thread_env
from tests.conftest import venv_python

BACKENDS = sorted(set(backends.available()) & set(envs.names()))
# Option sets selecting each DP mechanism a backend offers; others run with their defaults.
VARIANTS_OF = {"opacus": [{"grad_sample_mode": m} for m in ("hooks", "functorch", "ghost")]}
VARIANTS = [(b, opts) for b in BACKENDS for opts in VARIANTS_OF.get(b, [{}])]
VARIANT_IDS = ["-".join([b, *map(str, o.values())]) for b, o in VARIANTS]

CLIP, SIGMA, B = 0.5, 1.3, 5.5  # B not an integer: a backend that rounds it is caught
CASES = {
    # CIFAR stem at 16 px; 2 groups < 4..32 channels
    "cifar16": (ResNetSpec(num_classes=10, image_size=16, width=4, groups=2), 8, [2, 6]),
    # ImageNet stem (7x7/2 + max pool) forced at 40 px; 8 groups: = channels in stage 1, < later
    "imagenet40": (
        ResNetSpec(num_classes=5, image_size=40, width=4, groups=8, stem="imagenet"),
        6,
        [0],
    ),
}
TIMEOUT_S = 1800


def make_case_arrays(name: str) -> dict:
    spec, size, padding = CASES[name]
    rng = np.random.default_rng(list(CASES).index(name))
    weights = init_weights(spec, seed=11)
    for k, w in weights.items():
        # Non-trivial GroupNorm and bias values, so a swapped or misplaced vector shows.
        if k.endswith(".weight") and w.ndim == 1:
            weights[k] = (1 + 0.2 * rng.standard_normal(w.shape)).astype(np.float32)
        elif k.endswith(".bias"):
            weights[k] = (0.1 * rng.standard_normal(w.shape)).astype(np.float32)
    shape = (size, spec.image_size, spec.image_size, spec.in_channels)
    x = rng.standard_normal(shape).astype(np.float32)
    mask = np.ones(size, bool)
    mask[padding] = False
    # Padding rows hold junk: if they leaked into a gradient, the sums would differ.
    x[~mask] = 30 * rng.standard_normal((len(padding), *shape[1:]))
    y = rng.integers(0, spec.num_classes, size)
    return conformance.make_case(
        spec, weights, x, y, mask, clip_norm=CLIP, sigma=SIGMA, expected_batch_size=B, seed=5
    )


@pytest.fixture(scope="session")
def case_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance_cases")
    paths = {}
    for name in CASES:
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], **make_case_arrays(name))
    return paths


@pytest.fixture(scope="session")
def run_variant(case_files, tmp_path_factory):
    """(backend, options) -> {case: outputs}, computed once per session in the backend's venv."""
    cache: dict[str, dict] = {}
    root = tmp_path_factory.mktemp("conformance_out")

    def run(backend: str, options: dict) -> dict:
        key = json.dumps([backend, options], sort_keys=True)
        if key not in cache:
            tag = f"{backend}-{len(cache)}"
            cmd = [str(venv_python(backend)), "-m", "dpscale.conformance", "--backend", backend]
            cmd += ["--options", json.dumps(options), "--threads", "1"]
            outs = {name: root / f"{tag}-{name}.npz" for name in CASES}
            for name in CASES:
                cmd += ["--case", str(case_files[name]), "--out", str(outs[name])]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=thread_env(1), timeout=TIMEOUT_S
            )
            if proc.returncode != 0:
                pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            result = {}
            for name, path in outs.items():
                with np.load(path) as z:
                    result[name] = {k: z[k] for k in z.files}
            cache[key] = result
        return cache[key]

    return run


@pytest.fixture(scope="session")
def reference(run_variant):
    if "reference" not in BACKENDS:
        pytest.fail("the reference backend (the oracle) has no adapter or no env file")
    return run_variant("reference", {})


@pytest.fixture(params=VARIANTS, ids=VARIANT_IDS)
def variant(request, run_variant):
    backend, options = request.param
    return run_variant(backend, options)


def tree(out: dict, prefix: str) -> dict[str, np.ndarray]:
    return {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith(prefix + "/")}


def flat(t: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([t[k].ravel().astype(np.float64) for k in sorted(t)])


def assert_tree_close(got: dict, want: dict, what: str, rtol: float = 1e-4) -> None:
    assert sorted(got) == sorted(want), f"{what}: parameter names differ from the reference's"
    scale = max(float(np.abs(w).max()) for w in want.values())
    worst = max(want, key=lambda k: float(np.abs(got[k] - want[k]).max()))
    err = float(np.abs(got[worst] - want[worst]).max())
    assert err <= rtol * scale, f"{what}: {worst} off by {err:.3g} (tolerance {rtol * scale:.3g})"
    g, w = flat(got), flat(want)
    rel = np.linalg.norm(g - w) / np.linalg.norm(w)
    assert rel <= rtol, f"{what}: relative L2 error {rel:.3g} > {rtol}"


@pytest.mark.parametrize("case", CASES)
def test_parameter_count_is_the_spec(variant, case):
    assert int(variant[case]["num_params"]) == num_params(CASES[case][0])


@pytest.mark.parametrize("case", CASES)
def test_weights_round_trip_exactly(variant, case):
    assert float(variant[case]["roundtrip_max_abs"]) == 0.0


@pytest.mark.parametrize("case", CASES)
def test_logits_match_oracle(variant, reference, case):
    got, want = variant[case]["logits"], reference[case]["logits"]
    assert got.shape == want.shape == (len(want), CASES[case][0].num_classes)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("case", CASES)
def test_clipped_gradient_sum_matches_oracle(variant, reference, case):
    assert_tree_close(tree(variant[case], "grad"), tree(reference[case], "grad"), "clipped sum")
    assert_tree_close(
        tree(variant[case], "grad_unclipped"),
        tree(reference[case], "grad_unclipped"),
        "unclipped sum",
    )


@pytest.mark.parametrize("case", CASES)
def test_clipping_bounds_each_example(variant, case):
    n_real = int(CASES[case][1] - len(CASES[case][2]))
    clipped = np.linalg.norm(flat(tree(variant[case], "grad")))
    unclipped = np.linalg.norm(flat(tree(variant[case], "grad_unclipped")))
    assert clipped <= n_real * CLIP * (1 + 1e-5)
    assert unclipped > n_real * CLIP, "case too weak: clipping would not change the sum"


@pytest.mark.parametrize("case", CASES)
def test_per_example_sum_equals_batch_gradient(variant, case):
    """Unclipped per-example sum / n == mean gradient of the non-private step (two paths)."""
    n_real = CASES[case][1] - len(CASES[case][2])
    per_example = {k: v / n_real for k, v in tree(variant[case], "grad_unclipped").items()}
    minus_step = {k: -v for k, v in tree(variant[case], "nonprivate_update").items()}
    assert_tree_close(per_example, minus_step, "unclipped sum / n vs non-private gradient")


@pytest.mark.parametrize("case", CASES)
def test_noise_free_dp_step_over_two_chunks_is_minus_sum_over_B(variant, reference, case):
    got = tree(variant[case], "dp_update")
    assert_tree_close(got, {k: -v / B for k, v in tree(variant[case], "grad").items()}, "own")
    assert_tree_close(got, tree(reference[case], "dp_update"), "DP update vs reference")
    padded = tree(variant[case], "dp_update_padding_chunk")
    assert_tree_close(padded, got, "an all-padding chunk inside a logical batch", rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_nonprivate_step_and_losses_match_oracle(variant, reference, case):
    assert_tree_close(
        tree(variant[case], "nonprivate_update"),
        tree(reference[case], "nonprivate_update"),
        "non-private update",
    )
    for key in ("dp_loss", "nonprivate_loss"):
        assert float(variant[case][key]) == pytest.approx(float(reference[case][key]), rel=1e-4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("key", ["noise_update", "noise_update_2chunks"])
def test_noise_only_step_has_std_sigma_c_over_b(variant, case, key):
    noise = flat(tree(variant[case], key))
    expected = SIGMA * CLIP / B
    assert noise.std() == pytest.approx(expected, rel=0.03), f"{key}: one noise draw per step"
    assert abs(noise.mean()) < 6 * expected / math.sqrt(noise.size)


@pytest.mark.parametrize("case", CASES)
def test_noise_is_deterministic_given_the_seed(variant, case):
    first, again = (
        flat(tree(variant[case], "noise_update")),
        flat(tree(variant[case], "noise_update_again")),
    )
    other = flat(tree(variant[case], "noise_update_other"))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.1 * SIGMA * CLIP / B, "reseed(seed + 1) changed nothing"


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_resume_continues_exactly(variant, case):
    assert float(variant[case]["resume_max_abs"]) <= 1e-6, "setup_training then load_checkpoint"
    assert float(variant[case]["resume_preload_max_abs"]) <= 1e-6, "load_checkpoint then setup"


def test_backend_epsilon_names_its_accountant(variant):
    meta = json.loads(str(variant["cifar16"]["meta"]))
    assert meta["mode"], "adapters set `mode` to the DP mechanism they use"
    eps = meta["backend_epsilon"]
    if eps is None:
        pytest.skip(f"{meta['backend']} reports no epsilon of its own")
    for key in ("epsilon", "accountant", "delta", "sampling"):
        assert key in eps, f"backend_epsilon lacks {key!r}"
    query = meta["epsilon_query"]
    event = dp_accounting.PoissonSampledDpEvent(
        query["sample_rate"], dp_accounting.GaussianDpEvent(SIGMA)
    )
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(event, query["steps"])
    # Accountants differ by their order lists (environments.md): same ballpark, not equal.
    assert 0.8 < eps["epsilon"] / rdp.get_epsilon(query["delta"]) < 1.25
