"""Book-Keeping DP-SGD in JAX: per-example norms and the clipped sum from one backward pass.

The jax backend's mode bk (the torch twin, with the rule and the math: _bookkeeping_torch).
A zero "probe" is added to each parameterized layer's output (jax.forward's tap), so the
gradient of the summed loss w.r.t. the probes is every example's output gradient g, from one
backward pass in which no weight gradient is formed; the layers' inputs a come back as aux.
Per layer, with A_i the shifted patches of a_i (T output positions x D = kh*kw*Cin) and G_i
the output gradient (T x Cout): the conv's squared norm is the ghost norm
sum_{t,t'} (A_i A_i^T)_{tt'} (G_i G_i^T)_{tt'} when 2 T^2 <= p (p = Cout*D), else that of the
per-example gradient A_i^T G_i (kept); Linear ||a_i||^2 ||g_i||^2 + ||g_i||^2; GroupNorm its
per-example scale and offset gradients. The clipped sum: sum_i c_i A_i^T G_i as one einsum
(or over the kept per-example gradients), with c_i = clip factor x mask.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from dpscale.backends import _jax_common as jc
from dpscale.backends import jax as jb


def use_ghost_norm(positions: int, params: int) -> bool:
    """fastDP's per-layer rule: the ghost norm when 2 T^2 <= p, the per-example gradient else."""
    return 2 * positions * positions <= params


def _conv_share(w, a, g, stride: int, pad: int):
    """(squared norms (n,), weights -> sum in OIHW) of a conv with OIHW kernel w."""
    cout, cin, kh, kw = w.shape
    n, ho, wo, _ = g.shape
    patches = jc.shifted_patches(jnp, a, kh, kw, stride, pad, "NHWC")  # (n, k, ho, wo, cin)
    cols = patches.transpose(0, 2, 3, 1, 4).reshape(n, ho * wo, kh * kw * cin)
    grads = g.reshape(n, ho * wo, cout)

    def to_oihw(m):  # (..., cout, kh*kw*cin) -> (..., cout, cin, kh, kw)
        return jnp.moveaxis(m.reshape(*m.shape[:-1], kh, kw, cin), -1, -3)

    if use_ghost_norm(ho * wo, w.size):
        gram_a = jnp.einsum("ntd,nsd->nts", cols, cols)
        gram_g = jnp.einsum("nto,nso->nts", grads, grads)
        sq = jnp.sum(gram_a * gram_g, axis=(1, 2))
        return sq, lambda c: to_oihw(jnp.einsum("ntd,nto->od", cols, grads * c[:, None, None]))
    per_example = jnp.einsum("ntd,nto->nod", cols, grads)
    sq = jnp.sum(per_example**2, axis=(1, 2))
    return sq, lambda c: to_oihw(jnp.tensordot(c, per_example, axes=1))


def _shares(params, inputs, grads, spec):
    """{parameter name: (squared norms, weights -> sum)} for every layer."""
    shares = {}
    for name, (a, stride, pad) in inputs.items():
        g = grads[name]
        if name == "fc":
            shares["fc.weight"] = (
                jnp.sum(a**2, axis=1) * jnp.sum(g**2, axis=1),
                lambda c, a=a, g=g: (g * c[:, None]).T @ a,
            )
            per_example = {"fc.bias": g}
        elif stride is not None:
            w = params[f"{name}.weight"]
            shares[f"{name}.weight"] = _conv_share(w, a, g, stride, pad)
            continue
        else:
            ones = jnp.ones(a.shape[-1], a.dtype)
            xhat = jb.group_norm(a, ones, jnp.zeros_like(ones), spec.gn_groups(a.shape[-1]))
            per_example = {
                f"{name}.weight": jnp.sum(xhat * g, axis=(1, 2)),
                f"{name}.bias": jnp.sum(g, axis=(1, 2)),
            }
        for k, v in per_example.items():
            shares[k] = (jnp.sum(v**2, axis=1), partial(jnp.tensordot, b=v, axes=1))
    return shares


def book_keeping(params, x, y, mask, spec, impl):
    """(per-example losses x mask, {name: (squared norms, weights -> sum)}) of one chunk."""
    shapes = {}

    def shape_of(name, a, out, stride, pad):
        shapes[name] = jax.ShapeDtypeStruct(out.shape, out.dtype)
        return out

    jax.eval_shape(lambda p, x: jb.forward(p, x, spec, impl, shape_of), params, x)
    probes = {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}

    def loss(probes):
        inputs = {}

        def tap(name, a, out, stride, pad):
            inputs[name] = (a, stride, pad)
            return out + probes[name]

        losses = jb.cross_entropy(jb.forward(params, x, spec, impl, tap), y) * mask
        return jnp.sum(losses), (losses, inputs)

    grads, (losses, inputs) = jax.grad(loss, has_aux=True)(probes)
    return losses, _shares(params, inputs, grads, spec)


@partial(jax.jit, static_argnames=("spec", "impl"))
def dp_chunk(params, x, y, mask, clip_norm, spec, impl):
    """(sum over real rows of clipped per-example gradients, sum of their losses): the jax
    backend's dp_chunk contract."""
    losses, shares = book_keeping(params, x, y, mask, spec, impl)
    norms = jnp.sqrt(sum(sq for sq, _ in shares.values()))
    weights = jb.clip_factors(norms, clip_norm) * mask
    return {name: fn(weights) for name, (_, fn) in shares.items()}, jnp.sum(losses)
