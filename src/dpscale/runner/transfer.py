"""Start a run from pre-trained weights with some block groups frozen (Kurakin et al. 2022).

The body (everything but `fc`, whose classes differ: the public pre-training classes are
disjoint from the private ones) comes from the pre-training run's weights.npz, in canonical
names, so any backend's pre-training serves any backend. Frozen parameters are constants of the
DP fine-tuning: no gradient, no clipping share, no noise, no update. Pre-training on public
data is outside the privacy guarantee by construction; the run's epsilon covers the fine-tuning.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpscale.backends import FREEZING
from dpscale.backends.base import Adapter
from dpscale.models.resnet import ResNetSpec, frozen_names, param_shapes


class TransferError(ValueError):
    pass


def pretrained_body(path: Path, spec: ResNetSpec) -> dict[str, np.ndarray]:
    """The pre-trained weights but the classifier, checked against this run's model."""
    try:
        with np.load(path) as f:
            weights = {k: f[k] for k in f.files}
    except (OSError, ValueError) as err:
        raise TransferError(f"--init {path}: cannot read pre-trained weights ({err})") from err
    shapes = {n: s for n, s in param_shapes(spec).items() if not n.startswith("fc.")}
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise TransferError(
            f"--init {path}: no {missing[0]} ({len(missing)} missing); expected the weights.npz "
            "of a dpscale run of the same ResNet-18"
        )
    for name, shape in shapes.items():
        if weights[name].shape != shape:
            raise TransferError(
                f"--init {path}: {name} has shape {weights[name].shape}, this model's is {shape}; "
                "expected pre-training with the same model (width, groups, stem)"
            )
    return {n: weights[n].astype(np.float32) for n in shapes}


def start_from(
    adapter: Adapter, backend: str, spec: ResNetSpec, init: Path | None, frozen_groups: int
) -> dict:
    """Load the body of `init` into `adapter` and freeze the first `frozen_groups` groups.

    Returns what metrics.json records about it.
    """
    if init is None:
        if frozen_groups:
            raise TransferError(
                f"training.frozen_groups={frozen_groups} without pre-trained weights; expected "
                "a `transfer:` block in the config (or --init) so that frozen layers are trained"
            )
        return {}
    adapter.set_weights({**adapter.get_weights(), **pretrained_body(Path(init), spec)})
    names = frozen_names(spec, frozen_groups)
    if names:
        try:
            adapter.freeze(names)
        except NotImplementedError as err:
            raise TransferError(
                f"backend {backend!r} cannot freeze block groups (training.frozen_groups="
                f"{frozen_groups}); expected one of {', '.join(FREEZING)}"
            ) from err
    shapes = param_shapes(spec)
    frozen = sum(int(np.prod(shapes[n])) for n in names)
    return {
        "pretrained_from": str(init),
        "frozen_groups": frozen_groups,
        "trainable_params": adapter.num_params() - frozen,
    }
