"""The shared ResNet-18 (dpscale.models.resnet) as a tf-keras functional model.

Imported only by the tfprivacy adapter, after it has set TF_USE_LEGACY_KERAS=1 (Keras 3 breaks
TensorFlow Privacy), so `tf.keras` here is tf-keras 2. Layouts: canonical conv OIHW <-> Keras
HWIO, canonical linear (out, in) <-> Keras Dense kernel (in, out); GroupNorm weight/bias <->
gamma/beta. Padding is explicit and symmetric (ZeroPadding2D + "valid" conv) because "SAME"
pads stride-2 convs asymmetrically; the imagenet stem's maxpool pads with -inf as torch does.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dpscale.models.resnet import GN_EPS, ResNetSpec, blocks, param_shapes

layers = tf.keras.layers


def _keras_name(canonical_prefix: str) -> str:
    # Keras scopes variables by layer name; dots would read like attribute paths.
    return canonical_prefix.replace(".", "_")


class _Builder:
    """Builds layers named after the canonical prefixes and records name -> variable slots."""

    def __init__(self, spec: ResNetSpec) -> None:
        self.spec = spec
        self.slots: dict[str, tuple[layers.Layer, str]] = {}

    def conv(self, x, prefix: str, filters: int, kernel: int, stride: int):
        pad = kernel // 2
        if pad:
            x = layers.ZeroPadding2D(pad, name=_keras_name(prefix) + "_pad")(x)
        conv = layers.Conv2D(
            filters, kernel, strides=stride, padding="valid", use_bias=False,
            name=_keras_name(prefix),
        )  # fmt: skip
        x = conv(x)
        self.slots[f"{prefix}.weight"] = (conv, "kernel")
        return x

    def gn(self, x, prefix: str, channels: int):
        norm = layers.GroupNormalization(
            groups=self.spec.gn_groups(channels), epsilon=GN_EPS, name=_keras_name(prefix)
        )
        x = norm(x)
        self.slots[f"{prefix}.weight"] = (norm, "gamma")
        self.slots[f"{prefix}.bias"] = (norm, "beta")
        return x

    def block(self, x, prefix: str, cin: int, cout: int, stride: int, down: bool):
        shortcut = x
        y = self.conv(x, f"{prefix}.conv1", cout, 3, stride)
        y = layers.ReLU(name=_keras_name(prefix) + "_relu1")(self.gn(y, f"{prefix}.gn1", cout))
        y = self.gn(self.conv(y, f"{prefix}.conv2", cout, 3, 1), f"{prefix}.gn2", cout)
        if down:
            shortcut = self.conv(x, f"{prefix}.downsample.conv", cout, 1, stride)
            shortcut = self.gn(shortcut, f"{prefix}.downsample.gn", cout)
        y = layers.Add(name=_keras_name(prefix) + "_add")([y, shortcut])
        return layers.ReLU(name=_keras_name(prefix) + "_relu2")(y)


def _pad_neg_inf(x):
    return tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], constant_values=-np.inf)


def build(spec: ResNetSpec, model_class=None):
    """(model, slots): the Keras ResNet-18 and canonical name -> (layer, attribute)."""
    model_class = model_class or tf.keras.Model
    b = _Builder(spec)
    size = spec.image_size
    inputs = tf.keras.Input((size, size, spec.in_channels), name="images")
    if spec.stem_kind == "cifar":
        x = b.conv(inputs, "conv1", spec.width, 3, 1)
        x = layers.ReLU(name="relu")(b.gn(x, "gn1", spec.width))
    else:
        x = b.conv(inputs, "conv1", spec.width, 7, 2)
        x = layers.ReLU(name="relu")(b.gn(x, "gn1", spec.width))
        # Torch's maxpool pads with -inf: a zero pad could win a tie and take the gradient.
        x = layers.Lambda(_pad_neg_inf, name="maxpool_pad")(x)
        x = layers.MaxPool2D(3, strides=2, padding="valid", name="maxpool")(x)
    for prefix, cin, cout, stride, down in blocks(spec):
        x = b.block(x, prefix, cin, cout, stride, down)
    x = layers.GlobalAveragePooling2D(name="avgpool")(x)
    dense = layers.Dense(spec.num_classes, name="fc")
    outputs = dense(x)
    b.slots["fc.weight"] = (dense, "kernel")
    b.slots["fc.bias"] = (dense, "bias")
    model = model_class(inputs=inputs, outputs=outputs, name="resnet18_gn")
    expected = list(param_shapes(spec))
    if sorted(b.slots) != sorted(expected):
        raise AssertionError("Keras ResNet does not cover the canonical parameters")
    slots = {name: b.slots[name] for name in expected}
    return model, slots


def variables(slots) -> dict[str, tf.Variable]:
    """Canonical name -> the Keras variable holding it, in canonical order."""
    return {name: getattr(layer, attr) for name, (layer, attr) in slots.items()}


def to_keras(name: str, w: np.ndarray) -> np.ndarray:
    """A canonical (PyTorch-layout) array in the layout of its Keras variable."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 4:  # conv OIHW -> HWIO
        return np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    if w.ndim == 2:  # linear (out, in) -> (in, out)
        return np.ascontiguousarray(w.T)
    return w


def to_canonical(name: str, w: np.ndarray) -> np.ndarray:
    """A Keras variable's array in the canonical (PyTorch) layout."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 4:  # HWIO -> OIHW
        return np.ascontiguousarray(w.transpose(3, 2, 0, 1))
    if w.ndim == 2:
        return np.ascontiguousarray(w.T)
    return w
