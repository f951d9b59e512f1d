"""ResNet-18 with GroupNorm, as one framework-free spec: names, shapes and initialization.

Every backend builds exactly this network and converts to and from the canonical weights here
(PyTorch layouts: conv OIHW, linear (out, in)). Architecture, which each adapter must follow:

- stem "cifar" (images up to 64 px): conv1 3x3/1 pad 1 -> gn1 -> relu.
- stem "imagenet": conv1 7x7/2 pad 3 -> gn1 -> relu -> maxpool 3x3/2 pad 1 (pads with -inf).
- layer1..layer4 with width*(1, 2, 4, 8) channels, first block's stride (1, 2, 2, 2); two
  BasicBlocks each: relu(gn1(conv1 3x3/s pad 1)) -> gn2(conv2 3x3/1 pad 1) + shortcut -> relu.
  The shortcut is downsample.gn(downsample.conv 1x1/s) when stride or width changes, else x.
- global average pool -> fc.
Convs have no bias. GroupNorm: min(groups, C) groups, eps 1e-5, affine. Padding is explicit and
symmetric (TensorFlow's "SAME" would pad stride-2 convs asymmetrically and change the logits).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np

GN_EPS = 1e-5
STAGE_MULT = (1, 2, 4, 8)
STAGE_STRIDE = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


@dataclass(frozen=True)
class ResNetSpec:
    num_classes: int
    image_size: int
    width: int = 64
    groups: int = 32
    stem: str = "auto"
    in_channels: int = 3

    @property
    def stem_kind(self) -> str:
        if self.stem != "auto":
            return self.stem
        return "cifar" if self.image_size <= 64 else "imagenet"

    def widths(self) -> tuple[int, ...]:
        return tuple(self.width * m for m in STAGE_MULT)

    def gn_groups(self, channels: int) -> int:
        groups = min(self.groups, channels)
        if channels % groups:
            raise ValueError(f"model.groups={self.groups} does not divide {channels} channels")
        return groups

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ResNetSpec:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def blocks(spec: ResNetSpec):
    """Yield (prefix, in_channels, out_channels, stride, has_downsample) for every BasicBlock."""
    cin = spec.width
    for stage, (cout, stride) in enumerate(zip(spec.widths(), STAGE_STRIDE, strict=True), 1):
        for b in range(BLOCKS_PER_STAGE):
            s = stride if b == 0 else 1
            yield f"layer{stage}.{b}", cin, cout, s, (s != 1 or cin != cout)
            cin = cout


def param_shapes(spec: ResNetSpec) -> OrderedDict[str, tuple[int, ...]]:
    """Canonical parameter names and shapes, in the canonical order."""
    k = 3 if spec.stem_kind == "cifar" else 7
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    shapes["conv1.weight"] = (spec.width, spec.in_channels, k, k)
    shapes["gn1.weight"] = shapes["gn1.bias"] = (spec.width,)
    for prefix, cin, cout, _, down in blocks(spec):
        shapes[f"{prefix}.conv1.weight"] = (cout, cin, 3, 3)
        shapes[f"{prefix}.gn1.weight"] = shapes[f"{prefix}.gn1.bias"] = (cout,)
        shapes[f"{prefix}.conv2.weight"] = (cout, cout, 3, 3)
        shapes[f"{prefix}.gn2.weight"] = shapes[f"{prefix}.gn2.bias"] = (cout,)
        if down:
            shapes[f"{prefix}.downsample.conv.weight"] = (cout, cin, 1, 1)
            shapes[f"{prefix}.downsample.gn.weight"] = (cout,)
            shapes[f"{prefix}.downsample.gn.bias"] = (cout,)
    shapes["fc.weight"] = (spec.num_classes, spec.widths()[-1])
    shapes["fc.bias"] = (spec.num_classes,)
    return shapes


def frozen_names(spec: ResNetSpec, groups: int) -> list[str]:
    """Parameters kept fixed when the first `groups` block groups are frozen (transfer learning,
    Kurakin et al. 2022): the stem with group 1, then layer2.. in order; fc always trains."""
    if not 0 <= groups <= len(STAGE_MULT):
        raise ValueError(f"frozen_groups={groups}; expected 0..{len(STAGE_MULT)}")
    if groups == 0:
        return []
    prefixes = ("conv1.", "gn1.", *(f"layer{g}." for g in range(1, groups + 1)))
    return [name for name in param_shapes(spec) if name.startswith(prefixes)]


def num_params(spec: ResNetSpec) -> int:
    return sum(math.prod(s) for s in param_shapes(spec).values())


def init_weights(spec: ResNetSpec, seed: int) -> dict[str, np.ndarray]:
    """The one initialization every backend starts from (float32, canonical layouts).

    Kaiming-normal (fan_out, ReLU) convs as torchvision; GroupNorm weight 1, bias 0; fc uniform
    in +-1/sqrt(fan_in) as torch.nn.Linear. Drawn in canonical order from one seeded generator.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in param_shapes(spec).items():
        if name.endswith(".bias") and not name.startswith("fc"):
            w = np.zeros(shape)
        elif len(shape) == 1 and not name.startswith("fc"):
            w = np.ones(shape)
        elif len(shape) == 4:
            fan_out = shape[0] * shape[2] * shape[3]
            w = rng.normal(0.0, math.sqrt(2.0 / fan_out), size=shape)
        else:
            bound = 1.0 / math.sqrt(spec.widths()[-1])
            w = rng.uniform(-bound, bound, size=shape)
        weights[name] = w.astype(np.float32)
    return weights
