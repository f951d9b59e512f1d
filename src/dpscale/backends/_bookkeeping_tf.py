"""TF Privacy registry functions for the ResNet's layers, and Book-Keeping from them.

Imported only by the tfprivacy adapter, after its environment flags (tf-keras, TF Privacy's
package import skipped). Both of its fast modes run TF Privacy's own norm pass,
`clip_grads.compute_gradient_norms`: one forward (`gradient_clipping_utils.model_forward_pass`)
in which each trainable layer's registry function returns (base_vars, outputs, sqr_norm_fn),
one backward to the base_vars (the layers' outputs, or per-example tiled parameters), then
sqr_norm_fn(output gradient) per layer. TF Privacy 0.9.0 ships Dense (and Embedding), not
Conv2D or GroupNormalization: those two are written here with its interface.

- mode ghost: TF Privacy's `compute_clipped_gradients_and_outputs` then takes the gradient of
  the clip-weighted loss, a second forward/backward through the Keras model.
- mode bk (Book-Keeping, Bu et al. 2022; the torch twin and its rule: _bookkeeping_torch): the
  registry functions also record, in a Book, how to form the layer's clip-weighted sum
  sum_i c_i grad_i from the same input a and output gradient g their norm used: Dense
  (c g)^T a (TF Privacy's function, wrapped), Conv2D sum_i c_i A_i^T G_i over the im2col
  patches A already formed for the norm (or c . the per-example gradients where those were
  formed), GroupNormalization c @ the per-example gamma/beta gradients. No second backward:
  what TF Privacy lacks (the sum from the first pass) is this module's.
"""

from __future__ import annotations

import functools

import tensorflow as tf
from tensorflow_privacy.privacy.fast_gradient_clipping import clip_grads, layer_registry
from tensorflow_privacy.privacy.fast_gradient_clipping.registry_functions import (
    dense,
    einsum_utils,
)


class Book:
    """One trace of the norm pass: per layer, its variables and c -> [sum_i c_i grad_i of each],
    and the per-example losses."""

    def __init__(self) -> None:
        self.shares: list[tuple[list, object]] = []
        self.losses: tf.Tensor | None = None

    def record(self, variables, share) -> None:
        self.shares.append((list(variables), share))

    def weighted_sums(self, c: tf.Tensor, variables) -> list[tf.Tensor]:
        """sum_i c_i grad_i for each of `variables` (in their order)."""
        sums = {v.ref(): s for vs, share in self.shares for v, s in zip(vs, share(c), strict=True)}
        missing = [v.name for v in variables if v.ref() not in sums]
        if missing:
            raise ValueError(f"book-keeping: no registry function recorded {missing}")
        return [sums[v.ref()] for v in variables]


def _no_microbatches(num_microbatches, layer) -> None:
    if num_microbatches is not None:
        raise NotImplementedError(f"book-keeping: {layer.name} has no microbatching")


def weighted_losses(y, logits, weights):
    """Per-example cross-entropies times the loss weights (0 for padding rows)."""
    ce = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return weights * ce


def conv2d_computation(
    layer_instance, input_args, input_kwargs, tape, num_microbatches=None, book=None
):
    """Conv2D (no bias, no activation, valid padding: _keras_resnet pads with ZeroPadding2D):
    per-example ||A_i^T G_i||^2 over im2col patches A_i.

    The convolution is a Dense map of its patches, so TF Privacy's einsum norm helper (which
    picks the cheaper of the ghost Gram trick and materializing per-example gradients) applies.
    """
    if input_kwargs or len(input_args) != 1:
        raise ValueError("Conv2D registry function expects one positional input")
    if layer_instance.use_bias or layer_instance.activation is not tf.keras.activations.linear:
        raise NotImplementedError("Conv2D registry function handles bias-free linear convs only")
    if layer_instance.data_format != "channels_last" or max(layer_instance.dilation_rate) != 1:
        raise NotImplementedError("Conv2D registry function handles NHWC, undilated convs only")
    if layer_instance.padding != "valid":
        raise NotImplementedError("Conv2D registry function handles padding='valid' only")
    if book is not None:
        _no_microbatches(num_microbatches, layer_instance)
    x = input_args[0]
    base_vars = layer_instance(x)
    tape.watch(base_vars)
    kernel = layer_instance.kernel

    def sqr_norm_fn(grads):
        kh, kw = layer_instance.kernel_size
        sh, sw = layer_instance.strides
        # The im2col patches as kh*kw strided slices: XLA fuses these; tf.image.extract_patches
        # was the costliest op of the DP step on CPU (DP/NP 3.0x -> 2.0x, same run settings).
        # Columns in (kh, kw, Cin) order: the HWIO kernel flattened, so sums reshape to it.
        ho, wo = grads.shape[1], grads.shape[2]
        patches = tf.stack(
            [
                x[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw, :]
                for i in range(kh)
                for j in range(kw)
            ],
            axis=3,
        )
        # Static sizes: the einsum helper inspects shapes to pick its algorithm.
        n, positions = tf.shape(x)[0], grads.shape[1] * grads.shape[2]
        fan_in, fan_out = kh * kw * x.shape[-1], grads.shape[-1]
        a = tf.reshape(patches, [n, positions, fan_in])
        g = tf.reshape(grads, [n, positions, fan_out])
        if num_microbatches is None and positions * (fan_in + fan_out) >= fan_in * fan_out:
            # Many positions (early layers): the Gram trick's T x T matrices cost more than
            # the per-example gradient itself, so form it (mixed ghost clipping, Bu et al.).
            per_example = tf.einsum("ntk,ntc->nkc", a, g)
            if book is not None:  # the clipped sum from the kept per-example gradients
                book.record(
                    [kernel],
                    lambda c: [tf.reshape(tf.einsum("n,nkc->kc", c, per_example), kernel.shape)],
                )
            return tf.reduce_sum(tf.square(per_example), axis=[1, 2])
        if book is not None:  # the layer's weight gradient with G_i scaled by c_i
            book.record(
                [kernel],
                lambda c: [
                    tf.reshape(tf.einsum("ntk,ntc->kc", a, g * c[:, None, None]), kernel.shape)
                ],
            )
        return einsum_utils.compute_fast_einsum_squared_gradient_norm(
            "...b,bc->...c", a, g, None, num_microbatches
        )

    return base_vars, base_vars, sqr_norm_fn


def group_norm_computation(
    layer_instance, input_args, input_kwargs, tape, num_microbatches=None, book=None
):
    """GroupNormalization: gamma and beta tiled per example (as TF Privacy's LayerNormalization
    function does), so their gradients are per-example; the norms are then direct."""
    del input_kwargs
    if num_microbatches is not None:
        raise NotImplementedError("GroupNormalization registry function has no microbatching")
    x = input_args[0]
    n, groups = tf.shape(x)[0], layer_instance.groups
    channels = x.shape[-1]
    gamma = tf.tile(layer_instance.gamma[None], [n, 1])
    beta = tf.tile(layer_instance.beta[None], [n, 1])
    tape.watch(gamma)
    tape.watch(beta)
    shape = tf.shape(x)
    grouped = tf.reshape(x, [n, shape[1], shape[2], groups, channels // groups])
    mean, var = tf.nn.moments(grouped, axes=[1, 2, 4], keepdims=True)
    xhat = tf.reshape((grouped - mean) * tf.math.rsqrt(var + layer_instance.epsilon), shape)
    outputs = xhat * gamma[:, None, None, :] + beta[:, None, None, :]

    def sqr_norm_fn(grads):
        if book is not None:
            book.record(
                [layer_instance.gamma, layer_instance.beta],
                lambda c: [tf.linalg.matvec(g, c, transpose_a=True) for g in grads],
            )
        return tf.add_n([tf.reduce_sum(tf.square(g), axis=1) for g in grads])

    return [gamma, beta], outputs, sqr_norm_fn


def dense_computation(layer_instance, input_args, input_kwargs, tape, num_microbatches, book):
    """TF Privacy's Dense function, recording (c g)^T a and c @ g (bias) for the Book."""
    _no_microbatches(num_microbatches, layer_instance)
    base_vars, outputs, sqr_norm_fn = dense.dense_layer_computation(
        layer_instance, input_args, input_kwargs, tape, num_microbatches
    )
    a = input_args[0]
    if a.shape.rank != 2:
        raise NotImplementedError(f"book-keeping: Dense input {a.shape}; expected (n, features)")

    def recording_sqr_norm_fn(grads):
        def share(c):
            sums = [tf.matmul(a, grads * c[:, None], transpose_a=True)]
            if layer_instance.use_bias:
                sums.append(tf.linalg.matvec(grads, c, transpose_a=True))
            return sums

        variables = [layer_instance.kernel]
        if layer_instance.use_bias:
            variables.append(layer_instance.bias)
        book.record(variables, share)
        return sqr_norm_fn(grads)

    return base_vars, outputs, recording_sqr_norm_fn


def make_layer_registry(book: Book | None = None) -> layer_registry.LayerRegistry:
    """TF Privacy's default registry plus Conv2D and GroupNormalization; with a Book, every
    function (Dense too) also records its layer's weighted sum in it."""
    registry = layer_registry.make_default_layer_registry()
    registry.insert(tf.keras.layers.Conv2D, functools.partial(conv2d_computation, book=book))
    registry.insert(
        tf.keras.layers.GroupNormalization, functools.partial(group_norm_computation, book=book)
    )
    if book is not None:
        registry.insert(tf.keras.layers.Dense, functools.partial(dense_computation, book=book))
    return registry


def clipped_sums(model, clip, x, y, w, variables) -> tuple[list[tf.Tensor], tf.Tensor]:
    """(sum_i w_i min(1, C/|g_i|) g_i for each of `variables`, the loss sum) in one forward and
    one backward: TF Privacy's norm pass with recording registry functions, then the Book's sums
    weighted by TF Privacy's clip factors C / max(C, norm) times the loss weights (0 for padding
    rows: exactly 0)."""
    book = Book()

    def per_example_loss(y_true, logits, weights):
        book.losses = weighted_losses(y_true, logits, weights)
        return book.losses

    norms = clip_grads.compute_gradient_norms(
        model,
        make_layer_registry(book),
        x,
        y,
        w,
        per_example_loss_fn=per_example_loss,
        trainable_vars=variables,
    )
    c = clip_grads.compute_clip_weights(clip, norms) * w
    return book.weighted_sums(c, variables), tf.reduce_sum(book.losses)
