"""dpscale's Opacus speed-ups (_opacus_fast, and mode bk's _opacus_bk) give Opacus' own numbers,
on the paths they take.

The conformance models are too small for the grouped-convolution sampler (and Book-Keeping's
grouped per-example path) to engage (it needs >= 256 output positions and >= 64 inputs per
position), so these cases are sized for it. Runs in the opacus venv; results come back as JSON.
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
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.conv import compute_conv_grad_sample
    from dpscale.backends import _bookkeeping_torch, _opacus_bk, _opacus_fast, load
    from dpscale.backends.base import Batch
    from dpscale.models.resnet import ResNetSpec

    torch.manual_seed(0)
    out = {"conv": {}, "adapter": {}, "tied": {}, "bk": {}}
    # (in, out, kernel, stride, padding, dilation, groups, bias, input size): each on the grouped
    # path, with what a ResNet does not use (bias, groups, dilation) included.
    convs = {
        "resnet-3x3": (16, 16, 3, 1, 1, 1, 1, False, 16),
        "stride2-bias": (8, 12, 3, 2, 1, 1, 1, True, 32),
        "groups2": (16, 8, 3, 1, 1, 1, 2, True, 16),
        "dilation2-rect": (8, 4, (3, 5), 1, (2, 4), 2, 1, False, 20),
        "small-map": (16, 16, 3, 2, 1, 1, 1, False, 8),  # 16 positions: Opacus' own sampler
    }
    for name, (cin, cout, k, s, p, d, g, bias, size) in convs.items():
        layer = nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias)
        x = torch.randn(5, cin, size, size)
        grad_out = torch.randn_like(layer(x))
        mine = _opacus_fast.grouped_conv_grad_sample(layer, [x], grad_out)
        theirs = compute_conv_grad_sample(layer, [x], grad_out)
        out["conv"][name] = {
            "positions": grad_out.shape[-2] * grad_out.shape[-1],
            "same_params": sorted(map(id, mine)) == sorted(map(id, theirs)),
            "max_abs_diff": max(float((mine[q] - theirs[q]).abs().max()) for q in theirs),
            "scale": max(float(t.abs().max()) for t in theirs.values()),
        }

    # The whole DP machinery, fast vs stock, on a ResNet whose stage 1 takes the grouped path.
    spec = ResNetSpec(num_classes=3, image_size=16, width=8, groups=2)
    rng = np.random.default_rng(1)
    batch = Batch(rng.normal(size=(6, 16, 16, 3)).astype(np.float32), rng.integers(0, 3, 6),
                  np.array([1, 1, 1, 1, 1, 0], bool))
    opacus_store, copies = _opacus_fast._opacus_store, []
    def counted(**kw):
        copies.append(1)
        opacus_store(**kw)
    _opacus_fast._opacus_store = counted
    for mode in ("hooks", "ghost"):
        for fast in (True, False):
            a = load("opacus")(spec, {"grad_sample_mode": mode, "fast_samplers": fast}, 0, 1)
            copies.clear()
            grads = a.clipped_grad_sum(batch, 0.05)
            out["adapter"][f"{mode}-{fast}"] = {
                "mode": a.mode, "grads": {n: g.ravel().tolist() for n, g in grads.items()},
                "opacus_copies": len(copies)}
    a = load("opacus")(spec, {"grad_sample_mode": "bk"}, 0, 1)
    copies.clear()
    grads = a.clipped_grad_sum(batch, 0.05)
    out["adapter"]["bk-True"] = {
        "mode": a.mode, "grads": {n: g.ravel().tolist() for n, g in grads.items()},
        "opacus_copies": len(copies)}
    _opacus_fast._opacus_store = opacus_store

    # Mode bk's backward: Opacus' hooks fire on a backward to the layers' outputs only, hand
    # every layer to its Book-Keeping norm sampler, and no weight gradient is formed.
    model = a.model
    for p in model.parameters():
        p.grad = None
        del p._norm_sample  # left by clipped_grad_sum: the norms below must be this backward's
    gsm = a._gsm  # the adapter's BookKeepingModule, built by clipped_grad_sum
    x, y = torch.randn(4, 16, 16, 3).permute(0, 3, 1, 2), torch.tensor([0, 1, 2, 0])
    _bookkeeping_torch.forward_backward(gsm, gsm.bk_layers, x, y)
    out["bk"]["weight_grads"] = sum(p.grad is not None for p in model.parameters())
    out["bk"]["layers"] = len(gsm.bk_layers)
    out["bk"]["sampled"] = sum(hasattr(m, "bk_weighted_sum") for _, m in gsm.bk_layers)
    out["bk"]["norms"] = sum(p._norm_sample.shape == (4,) for p in model.parameters())
    out["bk"]["params"] = len(list(model.parameters()))
    class Conv(nn.Conv2d):
        pass
    try:
        _opacus_bk.BookKeepingModule(nn.Sequential(Conv(3, 4, 3), nn.Flatten()), 1.0)
    except ValueError as err:
        out["bk"]["subclass_error"] = str(err)

    # Tied weights: the second use of a layer accumulates into the stored per-sample gradient.
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))
    x = torch.randn(3, 4)
    for fast in (True, False):
        _opacus_fast.install(fast)
        torch.manual_seed(2)
        m = GradSampleModule(Tied(), loss_reduction="sum")
        m(x).sum().backward()
        out["tied"][str(fast)] = [p.grad_sample.ravel().tolist() for p in m.parameters()]
        out["tied"][f"{fast}-summed"] = [p.grad.ravel().tolist() for p in m.parameters()]
    print(json.dumps(out))
    """
)


@jobs.source
def _probe_jobs(item):
    if item.module.__name__ == __name__ and "probe" in item.fixturenames:
        yield probe_job("opacus", PROBE)


@pytest.fixture(scope="module")
def probe() -> dict:
    return run_probe("opacus", PROBE)


def test_grouped_conv_sampler_equals_opacus_unfold_einsum(probe):
    for name, case in probe["conv"].items():
        assert case["same_params"], name
        assert case["max_abs_diff"] <= 1e-4 * case["scale"], (name, case)
    assert probe["conv"]["resnet-3x3"]["positions"] >= 256  # the grouped path, not a fallback
    assert probe["conv"]["small-map"]["positions"] < 256


def assert_close(got, want, what: str, rel: float = 1e-4, abs_: float = 1e-7) -> None:
    """pytest.approx's criterion, |got - want| <= max(rel |want|, abs), vectorized (approx on
    long lists took seconds)."""
    got, want = np.asarray(got), np.asarray(want)
    bad = np.abs(got - want) > np.maximum(rel * np.abs(want), abs_)
    assert not bad.any(), f"{what}: {bad.sum()} of {bad.size} entries differ beyond tolerance"


def test_fast_and_stock_opacus_clip_to_the_same_sum(probe):
    runs = probe["adapter"]
    for mode in ("hooks", "ghost"):
        fast, stock = runs[f"{mode}-True"], runs[f"{mode}-False"]
        assert fast["mode"] == f"opacus-{mode}"
        assert stock["mode"] == f"opacus-{mode}-stock"
        assert fast["opacus_copies"] == 0, f"{mode}: a per-sample gradient was still copied"
        assert set(fast["grads"]) == set(stock["grads"])
        for n, g in fast["grads"].items():
            assert any(v != 0 for v in g), f"{mode}: {n} got no gradient"
            assert_close(g, stock["grads"][n], f"{mode}: {n}")


def test_tied_weights_still_accumulate_per_sample_gradients(probe):
    tied = probe["tied"]
    for key in ("True", "True-summed"):
        stock = tied[key.replace("True", "False")]
        for mine, theirs in zip(tied[key], stock, strict=True):
            assert mine == pytest.approx(theirs, rel=1e-5, abs=1e-7), key
    # Per-sample gradients sum to the ordinary gradient: the accumulation kept both uses.
    per_sample = tied["True"][0]
    summed = tied["True-summed"][0]
    rows = [per_sample[i * 16 : (i + 1) * 16] for i in range(3)]
    assert [sum(c) for c in zip(*rows, strict=True)] == pytest.approx(summed, rel=1e-4, abs=1e-6)


def test_bk_clips_to_stock_opacus_sum_without_a_weight_gradient(probe):
    """Mode bk (Opacus' hooks and optimizer, Book-Keeping's norms and sums): stock Opacus'
    clipped sum with grouped per-example convs engaged; its backward forms no weight gradient,
    yet Opacus' hooks hand every layer to its norm sampler."""
    bk, stock = probe["adapter"]["bk-True"], probe["adapter"]["hooks-False"]
    assert bk["mode"] == "opacus-bk"
    assert bk["opacus_copies"] == 0, "mode bk stored a per-sample gradient"
    assert set(bk["grads"]) == set(stock["grads"])
    for n, g in bk["grads"].items():
        assert any(v != 0 for v in g), n
        assert_close(g, stock["grads"][n], n)
    hooks = probe["bk"]
    assert hooks["weight_grads"] == 0
    assert hooks["sampled"] == hooks["layers"] > 0
    assert hooks["norms"] == hooks["params"]
    assert "Conv" in hooks["subclass_error"] and "expected exact" in hooks["subclass_error"]
