"""JAX Privacy backend: DeepMind's jax-privacy 2.0 (the successor of the code behind the
ImageNet-scale DP papers) on the jax backend's model and optimizer.

What JAX Privacy does here, through its own modules:
- per-example clipping: `jax_privacy.clipped_grad` (vmap over examples of the loss's gradient,
  each clipped to C by `clip_pytree`: factor min(1, C / ||g||), summed), with the runner's
  padding rows passed as its `is_padding_example` mask, so they contribute exactly zero;
- noise: `jax_privacy.noise_addition.gaussian_privatizer` (i.i.d. N(0, (sigma C)^2) per entry,
  its PRNG key split at each update), once per logical step on the summed clipped gradients;
- its own epsilon: `accounting.DpsgdTrainingAccountant` with its default RDP orders, Poisson
  sampling, add-or-remove-one adjacency.
Everything else (the ResNet-18 as pure JAX functions, optax SGD with momentum, the conv option,
the XLA cache, checkpoints) is the jax backend's (docs/backends/jax.md), so the two differ only
in the DP machinery. Mode label `jaxprivacy-clipped-grad`, `-xlaconv` with XLA's convolution.
"""

from __future__ import annotations

from fractions import Fraction
from functools import partial

import jax
import jax.numpy as jnp
import jax_privacy
from jax_privacy import accounting, noise_addition

from dpscale.backends import jax as jax_backend

# One rational q = batch / N for jax-privacy's accountant, exact for the runner's q = B / N.
MAX_DENOMINATOR = 10**9


@partial(jax.jit, static_argnames=("spec", "impl"))
def dp_chunk(params, x, y, mask, clip_norm, spec, impl):
    """(sum over real rows of clipped per-example gradients, sum of their losses)."""

    def loss(p, xi, yi):  # xi, yi: one example with a batch axis of 1
        logits = jax_backend.forward(p, xi, spec, impl)
        return jnp.sum(jax_backend.cross_entropy(logits, yi))

    clipped = jax_privacy.clipped_grad(
        loss, l2_clip_norm=clip_norm, batch_argnums=(1, 2), return_values=True
    )
    grads, aux = clipped(params, x, y, is_padding_example=mask == 0)
    return grads, jnp.sum(aux.values * mask)


def privatize(gsum, key, std):
    """gsum + N(0, std^2) by JAX Privacy's Gaussian privatizer, and the key it moved to."""
    privatizer = noise_addition.gaussian_privatizer(stddev=std, prng_key=key)
    noisy, (key, _) = privatizer.update(gsum, privatizer.init(gsum))
    return noisy, key


class Adapter(jax_backend.Adapter):
    dp_chunk = staticmethod(dp_chunk)
    add_noise = staticmethod(privatize)
    # Its DP step is jax_privacy's clipped_grad: the jax backend's `mode` does not apply.
    default_mode = "vmap"
    OPTIONS = {k: v for k, v in jax_backend.Adapter.OPTIONS.items() if k != "mode"}

    def _build(self) -> None:
        super()._build()
        self.mode = "jaxprivacy-clipped-grad" + ("" if self._conv_dp == "patches" else "-xlaconv")

    def backend_epsilon(self, sample_rate: float, steps: int, delta: float) -> dict | None:
        if self._step is None or not self._step.private:
            return None
        sigma = float(self._step.noise_multiplier)
        q = Fraction(sample_rate).limit_denominator(MAX_DENOMINATOR)
        config = accounting.RdpAccountantConfig()
        params = accounting.DpParams(
            noise_multipliers=sigma,
            num_samples=q.denominator,
            delta=float(delta),
            batch_size=q.numerator,
            sampling_method=accounting.SamplingMethod.POISSON,
        )
        eps = accounting.DpsgdTrainingAccountant(config).compute_epsilon(int(steps), params)
        return {
            "epsilon": float(eps),
            "accountant": "jax_privacy.accounting.DpsgdTrainingAccountant (RDP)",
            "rdp_orders": f"jax-privacy default: {len(config.orders)} orders "
            f"{config.orders[0]:g}..{config.orders[-1]:g}",
            "delta": float(delta),
            "sampling": "poisson",
            "sample_rate": float(sample_rate),
            "noise_multiplier": sigma,
            "steps": int(steps),
        }

    def versions(self) -> dict[str, str]:
        return {**super().versions(), "jax_privacy": jax_privacy.__version__}
