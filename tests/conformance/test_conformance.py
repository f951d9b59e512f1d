"""Every backend against the from-scratch reference, each in its own venv.

Parametrized over every backend with an adapter module or a requirements file (a backend with
one and not the other fails, it is not dropped), and over every DP mode a backend offers
(VARIANTS_OF, each with the `mode` label its options must select). Each variant runs
`python -m dpscale.conformance` once in its venv on its CASES (tiny models: the arrays are
compared here, in the base env, against the reference backend's and against numpy).

Tolerances (float32 throughout; torch backends agree to ~1e-6 relative, see the report):
- logits: max abs difference <= 1e-4 * max |reference logits|;
- gradient sums and updates: max abs difference <= 1e-4 * max |reference| over all parameters,
  and relative L2 error <= 1e-4; the per-example clipping recomputed in numpy from the
  backend's own per-example gradients: the same;
- noise-free trajectories (5 steps, momentum, a changing lr): <= 2e-4 relative;
- noise: every parameter tensor's noise (pooled over six independent draws) passes a
  chi-square test of std sigma*C/B and a mean test, each at a false-alarm rate of 1e-9; the
  whole update's std within 6 standard errors (~2%) of sigma*C/B for every chunk count;
- a backend's own epsilon: its framework's RDP accountant recomputed with dp_accounting and the
  same orders, <= 1e-6 relative, at several step counts and rates;
- determinism, weights round trip: exact; resume from a checkpoint: <= 1e-6 abs.
"""

from __future__ import annotations

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from dpscale import backends, conformance, envs
from dpscale.models.resnet import ResNetSpec, init_weights, num_params, param_shapes
from tests import jobs
from tests.conftest import venv_python

SIGMA, B = 1.3, 5.5  # B not an integer: a backend that rounds it is caught
# (spec, rows, padding rows, clip norm): each clip norm lies inside the spread of the case's
# per-example gradient norms, so some examples are clipped and some are not.
CASES = {
    # CIFAR stem at 16 px; 2 groups < 4..32 channels
    "cifar16": (ResNetSpec(num_classes=10, image_size=16, width=4, groups=2), 8, [2, 6], 8.8),
    # ImageNet stem (7x7/2 + max pool) forced at 40 px; 8 groups: = channels in stage 1, < later
    "imagenet40": (
        ResNetSpec(num_classes=5, image_size=40, width=4, groups=8, stem="imagenet"),
        6,
        [0],
        12.0,
    ),
}
BOTH, CIFAR = tuple(CASES), ("cifar16",)
# Every DP mode each backend offers: (options, the mode label they must select, the cases it
# runs). A registered backend or an env file without an entry here fails
# test_every_backend_has_conformance_entries. Each backend's default, the oracle (reference
# vmap), jax vmap and Opacus' per-sample modes run both cases (the model's two stems); the
# other modes change how the DP step is computed, not the model, and run the CIFAR case:
# every check, one model (their convolution variants are checked on the ImageNet stem's shapes
# in test_jax_conv.py). Listed costliest compiles first, so that the job pool's last jobs are
# short ones.
VARIANTS_OF = {
    "objax": [
        ({}, "objax-pgv", BOTH),
        ({"use_norm_accumulation": True}, "objax-pgv-normacc", CIFAR),
        ({"conv": "patches"}, "objax-pgv-patches", CIFAR),
    ],
    "tfprivacy": [
        # mode bk (the default) forms the sums itself from each layer's input and output
        # gradient (no second pass through the Keras model).
        ({}, "bk-xla", BOTH),
        ({"mode": "ghost"}, "fast-clipping-ghost-xla", CIFAR),
        ({"mode": "ghost", "xla": False}, "fast-clipping-ghost", CIFAR),
        ({"mode": "vmap"}, "dpmodel-vmap-xla", CIFAR),
        ({"mode": "vmap", "xla": False}, "dpmodel-vmap", CIFAR),
    ],
    # mode vmap: conv auto = patches in the DP step on CPU; on a GPU the DP step takes XLA's
    # convolution, which conv=xla selects here. Both modes run both stems: bk's per-layer
    # norms and sums take each conv's geometry (the ImageNet stem's 7x7/2) apart.
    "jax": [
        ({}, "jax-bk", BOTH),
        ({"mode": "vmap"}, "jax-vmap", BOTH),
        ({"mode": "vmap", "conv": "xla"}, "jax-vmap-xlaconv", CIFAR),
    ],
    "jaxprivacy": [
        ({}, "jaxprivacy-clipped-grad", BOTH),
        ({"conv": "xla"}, "jaxprivacy-clipped-grad-xlaconv", CIFAR),
    ],
    "opacus": [
        (
            {"grad_sample_mode": m, "fast_samplers": fast},
            f"opacus-{m}" + ("" if fast else "-stock"),
            BOTH if fast else CIFAR,
        )
        for m in ("hooks", "functorch", "ghost")
        for fast in (True, False)
    ]
    # Book-Keeping through Opacus' fast-gradient-clipping hooks (_opacus_bk): no per-sample
    # sampler of Opacus', so no stock variant; both stems, as reference-bk and jax-bk.
    + [({"grad_sample_mode": "bk"}, "opacus-bk", BOTH)],
    "reference": [({"mode": "vmap"}, "reference-torch.func", BOTH), ({}, "reference-bk", BOTH)],
}
# The oracle every variant is compared with: the reference backend's vmap mode (nothing hidden;
# its default, Book-Keeping, is a variant like any other).
ORACLE = {"mode": "vmap"}
BACKENDS = [
    *VARIANTS_OF,
    *sorted((set(backends.available()) | set(envs.names())) - set(VARIANTS_OF)),
]
VARIANTS = [
    (b, opts, mode, cases) for b in BACKENDS for opts, mode, cases in VARIANTS_OF.get(b, [])
]
TIMEOUT_S = 1800
# A chi-square or normal test at this false-alarm rate: ~1e3 such tests per session.
ALARM = 1e-9
# Frameworks with an accountant of their own, and the RDP orders it uses (None: dp_accounting's
# default list); the other backends must report none.
OWN_ACCOUNTANT_ORDERS = {
    "opacus": [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)),
    "objax": [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] + list(range(5, 21)),
    "tfprivacy": None,
    "jaxprivacy": [
        *np.linspace(1.01, 8, num=50),
        *np.arange(8, 64),
        *np.linspace(65, 512, num=10, dtype=int),
    ],
}


def make_case_arrays(name: str) -> dict:
    spec, size, padding, clip = CASES[name]
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
        spec, weights, x, y, mask, clip_norm=clip, sigma=SIGMA, expected_batch_size=B, seed=5
    )


def variant_job(backend: str, options: dict, cases=BOTH) -> jobs.Job:
    """One variant's `python -m dpscale.conformance` run over its cases, on one core."""
    key = "conformance " + json.dumps([backend, options, cases], sort_keys=True)

    def run() -> dict:
        root = jobs.workdir("conformance")
        tag = jobs.slug(key)
        cmd = [str(venv_python(backend)), "-m", "dpscale.conformance", "--backend", backend]
        cmd += ["--options", json.dumps(options), "--threads", "1"]
        outs = {name: root / f"{tag}-{name}.npz" for name in cases}
        for name in cases:
            case = root / f"case-{name}.npz"
            jobs.write_once(case, lambda f, n=name: np.savez(f, **make_case_arrays(n)))
            cmd += ["--case", str(case), "--out", str(outs[name])]
        jobs.check_run(cmd, threads=1, timeout=TIMEOUT_S)
        result = {}
        for name, path in outs.items():
            with np.load(path) as z:
                result[name] = {k: z[k] for k in z.files}
        return result

    return jobs.Job(key, run)


@jobs.source
def _variant_jobs(item):
    if "variant" in item.fixturenames:
        yield variant_job("reference", ORACLE)
        backend, options, _, cases = item.callspec.params["variant"]
        yield variant_job(backend, options, cases)


@pytest.fixture(scope="session")
def reference():
    if "reference" not in backends.available() or "reference" not in envs.names():
        pytest.fail("the reference backend (the oracle) has no adapter or no env file")
    return jobs.result(variant_job("reference", ORACLE))


def pytest_generate_tests(metafunc):
    """Every variant, and with a `case` argument every case the variant runs."""
    if "variant" not in metafunc.fixturenames:
        return
    if "case" in metafunc.fixturenames:
        pairs = [(v, case) for v in VARIANTS for case in v[3]]
        ids = [f"{v[2]}-{case}" for v, case in pairs]
        metafunc.parametrize(("variant", "case"), pairs, ids=ids, indirect=["variant"])
    else:
        metafunc.parametrize("variant", VARIANTS, ids=[v[2] for v in VARIANTS], indirect=True)


@pytest.fixture
def variant(request):
    """The variant's outputs per case (request.param: backend, options, mode, cases)."""
    backend, options, _, cases = request.param
    return jobs.result(variant_job(backend, options, cases))


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


def test_parameter_count_is_the_spec(variant, case):
    assert int(variant[case]["num_params"]) == num_params(CASES[case][0])


def test_weights_round_trip_exactly(variant, case):
    assert float(variant[case]["roundtrip_max_abs"]) == 0.0


def test_logits_match_oracle(variant, reference, case):
    got, want = variant[case]["logits"], reference[case]["logits"]
    assert got.shape == want.shape == (len(want), CASES[case][0].num_classes)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


def test_clipped_gradient_sum_matches_oracle(variant, reference, case):
    assert_tree_close(tree(variant[case], "grad"), tree(reference[case], "grad"), "clipped sum")
    assert_tree_close(
        tree(variant[case], "grad_unclipped"),
        tree(reference[case], "grad_unclipped"),
        "unclipped sum",
    )


def examples(out: dict) -> list[dict[str, np.ndarray]]:
    """The per-example unclipped gradients (`example<i>/*`), in row order."""
    rows = sorted({int(k.split("/")[0][len("example") :]) for k in out if k.startswith("example")})
    return [tree(out, f"example{i}") for i in rows]


def numpy_clipped_sum(grads: list[dict[str, np.ndarray]], clip: float) -> dict[str, np.ndarray]:
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i, in float64: DP-SGD's clipping, per example."""
    total = {k: np.zeros(v.shape) for k, v in grads[0].items()}
    for g in grads:
        norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g.values()))
        factor = min(1.0, clip / (norm + 1e-6))
        for k, v in g.items():
            total[k] += factor * v.astype(np.float64)
    return total


def test_clipping_is_per_example(variant, reference, case):
    """The clipped sum (and the noise-free DP step) is each example's gradient clipped alone,
    recomputed here in numpy from the backend's own per-example gradients."""
    clip = CASES[case][3]
    grads = examples(variant[case])
    assert len(grads) == CASES[case][1] - len(CASES[case][2]), "one gradient per real row"
    norms = [np.linalg.norm(flat(g)) for g in grads]
    assert min(norms) < clip < max(norms), f"case too weak: norms {norms} all on one side of C"
    want = numpy_clipped_sum(grads, clip)
    assert_tree_close(tree(variant[case], "grad"), want, "clipped sum vs numpy per-example clip")
    step = {k: -v / B for k, v in want.items()}
    assert_tree_close(tree(variant[case], "dp_update"), step, "DP step vs numpy per-example clip")
    for got, ref in zip(grads, examples(reference[case]), strict=True):
        assert_tree_close(got, ref, "an example's gradient vs the reference's")


def test_per_example_sum_equals_batch_gradient(variant, case):
    """Unclipped per-example sum / n == mean gradient of the non-private step (two paths)."""
    n_real = CASES[case][1] - len(CASES[case][2])
    per_example = {k: v / n_real for k, v in tree(variant[case], "grad_unclipped").items()}
    minus_step = {k: -v for k, v in tree(variant[case], "nonprivate_update").items()}
    assert_tree_close(per_example, minus_step, "unclipped sum / n vs non-private gradient")


def test_noise_free_dp_step_over_two_chunks_is_minus_sum_over_B(variant, reference, case):
    got = tree(variant[case], "dp_update")
    assert_tree_close(got, {k: -v / B for k, v in tree(variant[case], "grad").items()}, "own")
    assert_tree_close(got, tree(reference[case], "dp_update"), "DP update vs reference")
    padded = tree(variant[case], "dp_update_padding_chunk")
    assert_tree_close(padded, got, "an all-padding chunk inside a logical batch", rtol=1e-5)


def test_nonprivate_step_and_losses_match_oracle(variant, reference, case):
    assert_tree_close(
        tree(variant[case], "nonprivate_update"),
        tree(reference[case], "nonprivate_update"),
        "non-private update",
    )
    for key in ("dp_loss", "nonprivate_loss"):
        assert float(variant[case][key]) == pytest.approx(float(reference[case][key]), rel=1e-4)


NOISE_DRAWS = (
    "noise_update",
    "noise_update_other",
    "noise_update_2chunks",
    *(f"noise_real_{k}" for k in conformance.NOISE_CHUNKS),
)


def noise_std(case: str) -> float:
    return SIGMA * CASES[case][3] / B


@pytest.mark.parametrize("key", NOISE_DRAWS)
def test_one_noise_draw_of_std_sigma_c_over_b_per_logical_step(variant, case, key):
    """All-padding steps (one or two chunks) and steps whose real rows come in 1, 2 or 3 chunks
    (the noisy step minus the same step without noise): the same std whatever the chunking."""
    noise = flat(tree(variant[case], key))
    expected = noise_std(case)
    # 6 standard errors of a std estimate from n normal draws (~2% here): a second draw per
    # chunk (41% more) or one missing over 6% of the parameters (3% less) is far outside.
    assert noise.std() == pytest.approx(expected, rel=6 / math.sqrt(2 * noise.size)), key
    assert abs(noise.mean()) < 6 * expected / math.sqrt(noise.size)


def test_noise_reaches_every_parameter_with_its_std(variant, case):
    """Per parameter tensor (each conv, GroupNorm scale and offset, fc, downsample), pooled over
    the independent draws: sum of squares / (sigma*C/B)^2 is chi-square with n degrees of
    freedom, the mean normal with std sigma*C/B/sqrt(n)."""
    expected = noise_std(case)
    draws = [tree(variant[case], key) for key in NOISE_DRAWS]
    names = sorted(draws[0])
    assert names == sorted(param_shapes(CASES[case][0])), "noise on every canonical parameter"
    for name in names:
        values = np.concatenate([d[name].ravel().astype(np.float64) for d in draws])
        n = values.size
        chi2 = float(np.sum(values**2)) / expected**2
        low, high = stats.chi2.ppf(ALARM, n), stats.chi2.isf(ALARM, n)
        assert low < chi2 < high, (
            f"{name}: noise std {math.sqrt(chi2 / n) * expected:.4g}, expected {expected:.4g} "
            f"(chi-square {chi2:.4g} outside [{low:.4g}, {high:.4g}] for {n} values)"
        )
        z = abs(values.mean()) / (expected / math.sqrt(n))
        assert z < stats.norm.isf(ALARM / 2), f"{name}: noise mean {values.mean():.3g} != 0"


def test_noise_is_deterministic_given_the_seed(variant, case):
    first, again = (
        flat(tree(variant[case], "noise_update")),
        flat(tree(variant[case], "noise_update_again")),
    )
    other = flat(tree(variant[case], "noise_update_other"))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.1 * noise_std(case), "reseed(seed + 1) changed nothing"


def test_checkpoint_resume_continues_exactly(variant, case):
    """Weights, momentum and the noise state come back: the next noisy step is the same."""
    assert float(variant[case]["resume_max_abs"]) <= 1e-6
    error = json.loads(str(variant[case]["meta"]))["load_before_setup"]
    assert error and "setup_training" in error, "a checkpoint loads into setup_training's state"


def test_noise_free_step_is_the_same_for_any_chunking(variant, case):
    got = tree(variant[case], "dp_update")
    for k in conformance.NOISE_CHUNKS:
        chunked = tree(variant[case], f"dp_update_{k}chunks")
        assert_tree_close(chunked, got, f"real rows in {k} chunks", rtol=1e-5)


@pytest.mark.parametrize("kind", ["dp", "nonprivate"])
def test_trajectory_with_momentum_and_schedule_matches_oracle(variant, reference, case, kind):
    """Five noise-free steps, momentum 0.9, the runner's warm-up + cosine learning rates: the
    weights move as the reference's (lr, momentum and their order all matter here)."""
    key = f"trajectory_{kind}"
    got, want = tree(variant[case], key), tree(reference[case], key)
    assert_tree_close(got, want, f"{kind} trajectory vs reference", rtol=2e-4)
    np.testing.assert_allclose(variant[case][f"{key}_losses"], reference[case][f"{key}_losses"],
                               rtol=2e-4)  # fmt: skip
    lrs = conformance.trajectory_lrs(1.0)
    assert len(set(lrs)) > 2, "the schedule must change the learning rate"


def test_every_backend_has_conformance_entries():
    """An adapter without an env file, an env file without an adapter (e.g. after a rename), or
    a backend without VARIANTS_OF entries would otherwise drop out of this suite silently."""
    adapters, env_files = set(backends.available()), set(envs.names())
    assert adapters == env_files, (
        f"adapters without an env file: {sorted(adapters - env_files)}; env files without an "
        f"adapter: {sorted(env_files - adapters)}"
    )
    assert set(VARIANTS_OF) == adapters, f"VARIANTS_OF lacks {sorted(adapters - set(VARIANTS_OF))}"
    modes = [mode for _, _, mode, _ in VARIANTS]
    assert len(modes) == len(set(modes)), "two variants claim one mode"


def test_options_select_their_mode(variant, request):
    backend, options, mode, cases = request.node.callspec.params["variant"]
    meta = json.loads(str(variant["cifar16"]["meta"]))
    assert (meta["backend"], meta["options"], meta["mode"]) == (backend, options, mode)
    assert sorted(variant) == sorted(cases)


def test_backend_epsilon_is_its_frameworks_accountant_exactly(variant):
    """Its own epsilon, recomputed with dp_accounting's RDP accountant on the framework's own
    orders, at several step counts and rates (so an accountant that composes the wrong number
    of steps, or ignores q, is caught); None from backends without an accountant."""
    meta = json.loads(str(variant["cifar16"]["meta"]))
    own = meta["backend_epsilons"]
    assert len(own) == len(meta["epsilon_queries"]) == len(conformance.EPS_QUERIES)
    if meta["backend"] not in OWN_ACCOUNTANT_ORDERS:
        assert own == [None] * len(own), f"{meta['backend']}: an epsilon of its own, untested"
        return
    orders = OWN_ACCOUNTANT_ORDERS[meta["backend"]]
    for query, eps in zip(meta["epsilon_queries"], own, strict=True):
        for key in ("epsilon", "accountant", "delta", "sampling"):
            assert key in eps, f"backend_epsilon lacks {key!r}"
        assert (eps["delta"], eps["sampling"]) == (query["delta"], "poisson")
        event = dp_accounting.PoissonSampledDpEvent(
            query["sample_rate"], dp_accounting.GaussianDpEvent(SIGMA)
        )
        rdp = rdp_privacy_accountant.RdpAccountant(orders=orders)
        rdp.compose(event, query["steps"])
        want = rdp.get_epsilon(query["delta"])
        assert eps["epsilon"] == pytest.approx(want, rel=1e-6), query
