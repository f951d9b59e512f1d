"""Modern JAX backend: pure jax model, Book-Keeping or vmap(grad) DP steps, optax SGD momentum.

The path for JAX releases that no longer run Objax (workflow/envs/jax.txt: current jax + optax).
This module is dpscale.backends.jax; `import jax` below is the real package (absolute imports).

- The model is dpscale.models.resnet written as pure functions over a dict of canonical names ->
  arrays in the canonical (PyTorch) layouts: convs take OIHW kernels through
  lax.conv_general_dilated's dimension numbers, so weights cross the contract unconverted.
- DP step (base.py), option `mode`: "bk" (default; label `jax-bk`): Book-Keeping
  (_bookkeeping_jax: per-example norms from each layer's inputs and output gradients, the
  clipped sum from the same, one backward pass); "vmap": per-example gradients by vmap(grad)
  over a fixed-size padded chunk. Either way each example is scaled by min(1, C / (||g_i|| +
  1e-6)) (the reference's factor) times the row's mask, and summed; chunk sums accumulate
  over the logical batch; one Gaussian draw N(0, (sigma*C)^2) per parameter per logical step
  from this adapter's key; divided by the expected batch size B.
- optax.inject_hyperparams(optax.sgd)(momentum=mu): optax's trace is t = mu*t + g and the update
  -lr*t, PyTorch's convention; the runner's lr enters as a hyperparameter, not a recompile.
- Each step function is jitted once per physical shape (clip norm, sigma, B, lr are traced).
- training.devices N > 1 (base.py's data parallelism, in one process): the logical batch's
  chunks go N at a time, one per device of a Mesh of N local devices (chunk i on device i % N),
  as one (N*P)-row batch sharded by rows; the same jitted chunk function then computes each
  device's clipped sum and XLA sums them across the devices (GSPMD). Weights, momentum and the
  key are replicated, so the one noise draw and the update are the same on every device. On a
  CPU the host is split into N XLA devices (jax.config jax_num_cpu_devices).

Options: `eval_batch_size` (prediction chunk, default 128), `compilation_cache` (true: XLA's
persistent cache in the venv; false; or a folder), `conv`: "patches" computes convolutions as
shifted slices x kernel, whose per-example gradients vmap into batched matmuls instead of XLA
CPU's slow batch-grouped convolutions; "xla" uses XLA's convolution; "auto" (default): patches
in the DP step of mode vmap on CPU, XLA's everywhere else (non-private steps, prediction, mode
bk, GPUs). Mode vmap's label is `jax-vmap`, or `jax-vmap-xlaconv` when its DP step uses XLA's
convolution.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dpscale.backends import _jax_common as jc
from dpscale.backends.base import Adapter as BaseAdapter
from dpscale.backends.base import Batch, StepConfig, check_weights
from dpscale.models.resnet import GN_EPS, ResNetSpec, blocks, init_weights, param_shapes

BATCH_FIELDS = ("x", "y", "mask")
CLIP_EPS = 1e-6  # as the reference: guards 0/0 for an all-zero gradient


# -- the model: pure functions, NHWC activations -------------------------------------------
def _conv(x, w, stride: int, pad: int, impl: str = "xla"):
    """Convolution with explicit symmetric padding and a canonical OIHW kernel, no bias.

    impl "xla": XLA's convolution; "patches": the same sum as shifted slices x kernel, whose
    per-example gradient vmaps into batched matmuls (_jax_common.conv_patches).
    """
    if impl == "patches":
        return jc.conv_patches(jnp, x, w.transpose(2, 3, 1, 0), stride, pad, "NHWC")
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "OIHW", "NHWC")
    )


def group_norm(x, gamma, beta, groups: int, eps: float = GN_EPS):
    """GroupNorm over (H, W, channels of the group) per example, biased variance, as PyTorch."""
    n, h, w, c = x.shape
    xg = x.reshape(n, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    xg = (xg - mean) * lax.rsqrt(var + eps)
    return xg.reshape(n, h, w, c) * gamma + beta


def max_pool_3x3_s2(x):
    """The imagenet stem's max pool: 3x3, stride 2, padding 1 filled with -inf."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def _gn(params, name: str, x, spec: ResNetSpec):
    return group_norm(
        x, params[f"{name}.weight"], params[f"{name}.bias"], spec.gn_groups(x.shape[-1])
    )


def forward(params: dict, x, spec: ResNetSpec, impl: str = "xla", tap=None):
    """Logits of the ResNet-18 of dpscale.models.resnet for NHWC images x.

    `tap(name, input, output, stride, pad) -> output`, if given, sees each parameterized layer
    (canonical prefix; stride and pad for convolutions, else None): _bookkeeping_jax records
    inputs and adds its probes there.
    """
    relu = jax.nn.relu
    tap = tap or (lambda name, a, out, stride, pad: out)

    def conv(name, x, stride, pad):
        return tap(name, x, _conv(x, params[f"{name}.weight"], stride, pad, impl), stride, pad)

    def gn(name, x):
        return tap(name, x, _gn(params, name, x, spec), None, None)

    imagenet = spec.stem_kind == "imagenet"
    x = relu(gn("gn1", conv("conv1", x, 2 if imagenet else 1, 3 if imagenet else 1)))
    if imagenet:
        x = max_pool_3x3_s2(x)
    for prefix, _, _, stride, down in blocks(spec):
        out = relu(gn(f"{prefix}.gn1", conv(f"{prefix}.conv1", x, stride, 1)))
        out = gn(f"{prefix}.gn2", conv(f"{prefix}.conv2", out, 1, 1))
        if down:
            short = conv(f"{prefix}.downsample.conv", x, stride, 0)
            x = relu(out + gn(f"{prefix}.downsample.gn", short))
        else:
            x = relu(out + x)
    pooled = x.mean(axis=(1, 2))
    return tap("fc", pooled, pooled @ params["fc.weight"].T + params["fc.bias"], None, None)


def cross_entropy(logits, labels):
    """Per-example softmax cross-entropy."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]


# -- the DP math: small pure functions ---------------------------------------------------------
def example_loss(params, x, y, spec, impl):
    """Loss of one example (x: (H, W, 3)); vmap(grad(.)) of it gives per-example gradients."""
    return cross_entropy(forward(params, x[None], spec, impl), y[None])[0]


def per_example_grads(params, x, y, spec, impl):
    """(grads with a leading example axis, losses (n,))."""
    fn = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0, None, None))
    losses, grads = fn(params, x, y, spec, impl)
    return grads, losses


def global_norms(grads) -> jnp.ndarray:
    """L2 norm of each example's whole gradient (all parameters together)."""
    sq = [jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in jax.tree.leaves(grads)]
    return jnp.sqrt(sum(sq))


def clip_factors(norms, clip_norm):
    """Per-example scale bringing a gradient of norm `norms` to at most `clip_norm`."""
    return jnp.minimum(1.0, clip_norm / (norms + CLIP_EPS))


def weighted_sum(grads, weights):
    """sum_i weights_i * grads_i per parameter (weights = clip factor * mask)."""
    return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), grads)


def add_noise(tree, key, std):
    """tree + N(0, std^2) per entry: one draw of all entries, cut into the tree's leaves.

    One draw, not one per leaf: XLA compiles each random.normal into its own threefry
    kernel, and ~60 of them made the update's compile take minutes on a CPU.
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [x.size for x in leaves]
    flat = std * jax.random.normal(key, (sum(sizes),), leaves[0].dtype)
    parts = jnp.split(flat, np.cumsum(sizes)[:-1])
    noisy = [x + p.reshape(x.shape) for x, p in zip(leaves, parts, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


@partial(jax.jit, static_argnames=("spec", "impl"))
def dp_chunk(params, x, y, mask, clip_norm, spec, impl):
    """(sum over real rows of clipped per-example gradients, sum of their losses)."""
    grads, losses = per_example_grads(params, x, y, spec, impl)
    weights = clip_factors(global_norms(grads), clip_norm) * mask
    return weighted_sum(grads, weights), jnp.sum(losses * mask)


@partial(jax.jit, static_argnames=("spec", "impl"))
def nonprivate_chunk(params, x, y, mask, spec, impl):
    """(gradient of the summed loss over real rows, that loss sum)."""

    def loss_sum(p):
        total = jnp.sum(cross_entropy(forward(p, x, spec, impl), y) * mask)
        return total, total

    grads, total = jax.grad(loss_sum, has_aux=True)(params)
    return grads, total


@jax.jit
def tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def split_and_add_noise(gsum, key, std):
    """(gsum + N(0, std^2) from a fresh subkey, the next key)."""
    key, sub = jax.random.split(key)
    return add_noise(gsum, sub, std), key


def _update(tx, noise, params, opt_state, gsum, key, std, divisor, lr, momentum):
    """`noise(gsum, key, std)` (if private) once per logical step, divide, then optax SGD with
    momentum at lr."""
    if noise is not None:
        gsum, key = noise(gsum, key, std)
    grads = jax.tree.map(lambda g: g / divisor, gsum)
    opt_state.hyperparams["learning_rate"] = lr
    opt_state.hyperparams["momentum"] = momentum
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, key


class Adapter(jc.JaxDevice, BaseAdapter):
    mode = "jax-bk"
    #: Book-Keeping unless options say mode vmap (a subclass with a DP step of its own: vmap)
    default_mode = "bk"
    multi_device = True
    #: the DP machinery, jitted pure functions: (params, x, y, mask, clip_norm, spec, impl) ->
    #: (clipped sum, loss sum), and (gsum, key, std) -> (gsum + noise, next key)
    dp_chunk = staticmethod(dp_chunk)
    add_noise = staticmethod(split_and_add_noise)
    OPTIONS = {
        "eval_batch_size": "rows per prediction call",
        "compilation_cache": "XLA's persistent cache: true, false or a folder",
        "conv": "auto, xla or patches",
        "mode": "bk (Book-Keeping, one backward pass; default) or vmap (per-example gradients)",
    }

    def _build(self) -> None:
        spec, seed = self.spec, self.seed
        self._cache_dir = jc.compilation_cache_dir(self.options.get("compilation_cache", True))
        jc.enable_compilation_cache(jax, self._cache_dir)
        self._eval_rows = int(self.options.get("eval_batch_size", 128))
        if self._eval_rows < 1:
            raise ValueError(f"jax option eval_batch_size={self._eval_rows}; expected >= 1")
        self._shapes = param_shapes(spec)
        self._mesh = jc.device_mesh(jax, self.runtime.devices)
        self.params: dict = {}
        self.set_weights(init_weights(spec, seed))
        self._key = jax.random.key(seed)
        option = self.options.get("conv", "auto")
        self._conv_dp, self._conv = jc.conv_impls(option, jax.default_backend(), "jax")
        self.mode = "jax-vmap" if self._conv_dp == "patches" else "jax-vmap-xlaconv"
        option = self.options.get("mode", self.default_mode)
        if option not in ("bk", "vmap"):
            raise ValueError(f"jax option mode={option!r}; expected bk or vmap")
        if option == "bk":  # no vmap: the forward's own convolution serves
            from dpscale.backends import _bookkeeping_jax

            self.dp_chunk = _bookkeeping_jax.dp_chunk
            self._conv_dp, self.mode = self._conv, "jax-bk"
        self._predict = jax.jit(partial(forward, spec=spec, impl=self._conv))
        # lr and momentum are injected hyperparameters (traced), so the update compiles once.
        self._tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.0, momentum=0.0)
        self._opt_state = None
        self._gsum = None  # the logical step's accumulated gradient sum
        self._apply_noisy = jax.jit(partial(_update, self._tx, self.add_noise))
        self._apply_plain = jax.jit(partial(_update, self._tx, None))

    # -- model ------------------------------------------------------------------------------
    def num_params(self) -> int:
        return int(sum(np.prod(p.shape) for p in self.params.values()))

    def get_weights(self) -> dict[str, np.ndarray]:
        return {n: np.asarray(self.params[n], dtype=np.float32) for n in self._shapes}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, self._shapes)
        self.params = self._place(
            {n: jnp.asarray(weights[n], dtype=jnp.float32) for n in self._shapes}
        )

    def _place(self, tree, rows: bool = False):
        """`tree` on the run's devices: as is on one; replicated (or split by rows) on a mesh."""
        if self._mesh is None:
            return tree
        spec = jax.sharding.PartitionSpec("d") if rows else jax.sharding.PartitionSpec()
        return jax.device_put(tree, jax.sharding.NamedSharding(self._mesh, spec))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return jc.predict_padded(
            lambda rows: self._predict(self.params, rows), x, self._eval_rows, self.spec.num_classes
        )

    def _device_batch(self, batch: Batch):
        return (
            jnp.asarray(batch.x, dtype=jnp.float32),
            jnp.asarray(batch.y, dtype=jnp.int32),
            jnp.asarray(batch.mask, dtype=jnp.float32),
        )

    # -- the step's hooks -------------------------------------------------------------------
    def _setup(self, step: StepConfig) -> None:
        self._opt_state = self._place(self._tx.init(self.params))
        self._gsum = None

    def _accumulate_chunks(self, chunks: list[Batch], private: bool) -> tuple[float, int]:
        """On a mesh of N devices: the real chunks N at a time, one per device (a round short
        of N is filled with all-padding chunks, which add nothing), as one batch split by rows."""
        n = self.runtime.devices
        real = [c for c in chunks if c.size]
        if n == 1 or not real:
            return super()._accumulate_chunks(chunks, private)
        losses, count = [], 0
        for i in range(0, len(real), n):
            group = real[i : i + n]
            empty = Batch(group[0].x, group[0].y, np.zeros_like(group[0].mask))
            group += [empty] * (n - len(group))
            rows = Batch(*(np.concatenate([getattr(c, f) for c in group]) for f in BATCH_FIELDS))
            losses.append(self._accumulate_device(rows, private))
            count += rows.size
        return float(sum(losses)), count

    def _accumulate(self, chunk: Batch, private: bool) -> float:
        return float(self._accumulate_device(chunk, private))

    def _accumulate_device(self, chunk: Batch, private: bool):
        """Add the chunk's gradient sum to the accumulator; its loss sum, on the device."""
        x, y, m = self._place(self._device_batch(chunk), rows=True)
        if private:
            clip = self._step.clip_norm
            g, loss = self.dp_chunk(self.params, x, y, m, clip, self.spec, self._conv_dp)
        else:
            g, loss = nonprivate_chunk(self.params, x, y, m, self.spec, self._conv)
        self._gsum = g if self._gsum is None else tree_add(self._gsum, g)
        return loss

    def _apply(self, noise_std: float | None, divisor: float, lr: float) -> None:
        gsum = self._gsum
        if gsum is None:  # no real row in the logical batch: noise (or nothing) alone
            gsum = jax.tree.map(jnp.zeros_like, self.params)
        apply = self._apply_plain if noise_std is None else self._apply_noisy
        self.params, self._opt_state, self._key = apply(
            self.params,
            self._opt_state,
            gsum,
            self._key,
            noise_std or 0.0,
            divisor,
            lr,
            self._step.momentum,
        )
        self._gsum = None

    def _clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        x, y, m = self._device_batch(batch)
        g, _ = self.dp_chunk(self.params, x, y, m, clip_norm, self.spec, self._conv_dp)
        return {n: np.asarray(g[n], dtype=np.float32) for n in self._shapes}

    def reseed(self, seed: int) -> None:
        self._key = jax.random.key(int(seed))

    # -- checkpoint state -------------------------------------------------------------------
    def _momentum(self) -> dict[str, np.ndarray]:
        trace = optax.tree_utils.tree_get(self._opt_state, "trace")
        return {n: np.asarray(trace[n], dtype=np.float32) for n in self._shapes}

    def _set_momentum(self, momentum: dict[str, np.ndarray]) -> None:
        check_weights(momentum, self._shapes)
        trace = self._place({n: jnp.asarray(momentum[n], dtype=jnp.float32) for n in self._shapes})
        self._opt_state = optax.tree_utils.tree_set(self._opt_state, trace=trace)

    def _noise_state(self) -> np.ndarray:
        return np.asarray(jax.random.key_data(self._key))

    def _set_noise_state(self, state: np.ndarray) -> None:
        self._key = jax.random.wrap_key_data(jnp.asarray(state))

    # -- reporting --------------------------------------------------------------------------
    def _device_state(self):
        return (self.params, self._opt_state)

    def versions(self) -> dict[str, str]:
        import jaxlib

        return {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "optax": optax.__version__,
            "xla_threads": jc.thread_note(self.threads),
            "xla_compilation_cache": self._cache_dir or "off",
        }
