"""Transfer learning's pure parts: which parameters freeze, and reading pre-trained weights."""

from __future__ import annotations

import numpy as np
import pytest

from dpscale.models.resnet import ResNetSpec, frozen_names, init_weights, param_shapes
from dpscale.runner.transfer import TransferError, pretrained_body

SPEC = ResNetSpec(num_classes=5, image_size=8, width=4, groups=2)


def test_frozen_groups_count_from_the_stem_and_never_reach_the_head():
    names = list(param_shapes(SPEC))
    assert frozen_names(SPEC, 0) == []
    one = frozen_names(SPEC, 1)
    assert one[:3] == ["conv1.weight", "gn1.weight", "gn1.bias"]
    assert all(n.startswith(("conv1.", "gn1.", "layer1.")) for n in one)
    three, four = frozen_names(SPEC, 3), frozen_names(SPEC, 4)
    assert set(one) < set(three) < set(four)
    assert not any(n.startswith("layer4.") for n in three)
    assert set(names) - set(four) == {"fc.weight", "fc.bias"}
    with pytest.raises(ValueError, match="frozen_groups=5; expected 0..4"):
        frozen_names(SPEC, 5)


def test_pretrained_body_drops_the_head_and_checks_the_model(tmp_path):
    public = ResNetSpec(num_classes=3, image_size=8, width=4, groups=2)  # other classes
    np.savez(tmp_path / "w.npz", **init_weights(public, 1))
    body = pretrained_body(tmp_path / "w.npz", SPEC)
    assert set(body) == set(param_shapes(SPEC)) - {"fc.weight", "fc.bias"}
    assert np.array_equal(
        body["layer2.0.conv1.weight"], init_weights(public, 1)["layer2.0.conv1.weight"]
    )

    wider = ResNetSpec(num_classes=3, image_size=8, width=8, groups=2)
    np.savez(tmp_path / "wide.npz", **init_weights(wider, 1))
    with pytest.raises(TransferError, match=r"conv1.weight has shape \(8, 3, 3, 3\), this model's"):
        pretrained_body(tmp_path / "wide.npz", SPEC)
    with pytest.raises(TransferError, match="cannot read pre-trained weights"):
        pretrained_body(tmp_path / "missing.npz", SPEC)
