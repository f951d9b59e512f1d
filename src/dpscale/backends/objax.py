"""Objax backend: DP-SGD through `objax.privacy.dpsgd.PrivateGradValues` under `objax.Jit`.

Objax 1.8.0 is unmaintained and runs on jax 0.5.3 only (workflow/envs/objax.txt). The model is
dpscale.models.resnet built from objax.nn layers (NCHW activations, HWIO conv kernels).

How the contract (base.py) is met with PrivateGradValues (PGV), which per call clips every
microbatch's gradient, *averages* over the chunk and adds its own noise of std
sigma*C/num_microbatches:
- PGV runs with microbatch=1 (per-example clipping) and noise_multiplier=0, so it returns the
  mean of clipped per-example gradients over the P rows of a fixed-size chunk. The loss it
  differentiates is multiplied by the row's mask, so a padding row's gradient is exactly zero
  (and clipping leaves zero at zero): mean * P is the clipped sum over the real rows.
- Chunk sums are accumulated over the logical batch; then noise N(0, (sigma*C)^2) is drawn once
  per logical step from this adapter's own objax.random.Generator and the sum divided by the
  expected batch size B (not the realized size), then objax.optimizer.Momentum (PyTorch
  convention: m = g + mu*m; w -= lr*m).
- Every jitted function sees fixed shapes (P rows; lr, std and B as traced scalars), so Poisson
  batches of any size never recompile.

Options: `use_norm_accumulation` (PGV's two-pass mode, default false), `eval_batch_size`
(prediction chunk, default 128), `compilation_cache` (true: XLA's persistent cache in the venv;
false; or a folder), `conv`: "xla" (default) is objax's own Conv2D; "patches" computes each
Conv2D as shifted slices x kernel, whose per-example gradients vmap into batched matmuls
instead of batch-grouped convolutions; "auto": patches in the DP step on CPU, objax's Conv2D
everywhere else. Unlike the jax backend's XLA, jax 0.5.3's ran the patches DP step no faster
here, hence the default. Mode label `objax-pgv` (`-normacc` with norm accumulation, `-patches`
when the DP step uses patches).
"""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jn
import numpy as np
import objax
from objax.privacy.dpsgd import PrivateGradValues, analyze_dp

from dpscale.backends import _jax_common as jc
from dpscale.backends.base import Adapter as BaseAdapter
from dpscale.backends.base import Batch, StepConfig, check_weights
from dpscale.models.resnet import GN_EPS, ResNetSpec, blocks, init_weights, param_shapes

# Objax 1.8 calls jax.tree_map, deprecated (not yet removed) in jax 0.5.3.
warnings.filterwarnings("ignore", message=".*jax.tree_map is deprecated.*")

# analyze_dp's own default order list, recorded with its epsilon.
OBJAX_ORDERS = tuple(inspect.signature(analyze_dp).parameters["orders"].default)


# -- canonical (PyTorch) layout <-> objax layout, pure numpy ----------------------------------
def to_objax(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "conv":  # OIHW -> HWIO
        return np.transpose(w, (2, 3, 1, 0))
    if kind == "gn":  # (C,) -> (1, C, 1, 1), broadcast over NCHW
        return w.reshape(1, -1, 1, 1)
    if kind == "fc_w":  # (out, in) -> (in, out)
        return w.T
    return w


def to_canonical(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "conv":  # HWIO -> OIHW
        return np.transpose(w, (3, 2, 0, 1))
    if kind == "gn":
        return w.reshape(-1)
    if kind == "fc_w":
        return w.T
    return w


# -- the model --------------------------------------------------------------------------------
def _zeros(shape) -> jn.ndarray:
    # Placeholder init: set_weights loads the canonical weights right after construction, and
    # objax's random initializers compile a kernel per shape (tens of seconds of CPU).
    return jn.zeros(shape, jn.float32)


class _Conv2D(objax.nn.Conv2D):
    """objax's Conv2D, or the same sum as shifted slices x kernel (_jax_common.conv_patches),
    whose per-example gradients vmap into batched matmuls. `impl` is a cell shared by the
    model's convs, read while a function is traced (so each jitted function keeps its own)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, pad: int, impl: list[str]):
        # Explicit symmetric padding: objax's SAME pads stride-2 convs asymmetrically.
        super().__init__(cin, cout, k, strides=stride, padding=pad, use_bias=False, w_init=_zeros)
        self.stride_pad = (stride, pad)
        self.impl = impl

    def __call__(self, x):
        if self.impl[0] == "patches":
            return jc.conv_patches(jn, x, self.w.value, *self.stride_pad, "NCHW")
        return super().__call__(x)


class _Block(objax.Module):
    def __init__(self, spec, cin: int, cout: int, stride: int, down: bool, impl: list[str]):
        g = spec.gn_groups(cout)
        self.conv1 = _Conv2D(cin, cout, 3, stride, 1, impl)
        self.gn1 = objax.nn.GroupNorm2D(cout, groups=g, eps=GN_EPS)
        self.conv2 = _Conv2D(cout, cout, 3, 1, 1, impl)
        self.gn2 = objax.nn.GroupNorm2D(cout, groups=g, eps=GN_EPS)
        self.down = down
        if down:
            self.down_conv = _Conv2D(cin, cout, 1, stride, 0, impl)
            self.down_gn = objax.nn.GroupNorm2D(cout, groups=g, eps=GN_EPS)

    def __call__(self, x):
        out = objax.functional.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        short = self.down_gn(self.down_conv(x)) if self.down else x
        return objax.functional.relu(out + short)

    def named(self, prefix: str) -> list[tuple[str, str, objax.TrainVar]]:
        out = [
            (f"{prefix}.conv1.weight", "conv", self.conv1.w),
            (f"{prefix}.gn1.weight", "gn", self.gn1.gamma),
            (f"{prefix}.gn1.bias", "gn", self.gn1.beta),
            (f"{prefix}.conv2.weight", "conv", self.conv2.w),
            (f"{prefix}.gn2.weight", "gn", self.gn2.gamma),
            (f"{prefix}.gn2.bias", "gn", self.gn2.beta),
        ]
        if self.down:
            out += [
                (f"{prefix}.downsample.conv.weight", "conv", self.down_conv.w),
                (f"{prefix}.downsample.gn.weight", "gn", self.down_gn.gamma),
                (f"{prefix}.downsample.gn.bias", "gn", self.down_gn.beta),
            ]
        return out


class ResNet18(objax.Module):
    """dpscale.models.resnet's ResNet-18 in objax; takes NHWC images like the other backends."""

    def __init__(self, spec: ResNetSpec):
        self.conv_impl = ["xla"]  # see _Conv2D
        impl = self.conv_impl
        self.imagenet = spec.stem_kind == "imagenet"
        k, s, p = (7, 2, 3) if self.imagenet else (3, 1, 1)
        self.conv1 = _Conv2D(spec.in_channels, spec.width, k, s, p, impl)
        self.gn1 = objax.nn.GroupNorm2D(spec.width, groups=spec.gn_groups(spec.width), eps=GN_EPS)
        layout = list(blocks(spec))
        self.blocks = objax.ModuleList(_Block(spec, *b[1:], impl) for b in layout)
        self.fc = objax.nn.Linear(spec.widths()[-1], spec.num_classes, w_init=_zeros)
        named = [
            ("conv1.weight", "conv", self.conv1.w),
            ("gn1.weight", "gn", self.gn1.gamma),
            ("gn1.bias", "gn", self.gn1.beta),
        ]
        for (prefix, *_), block in zip(layout, self.blocks, strict=True):
            named += block.named(prefix)
        named += [("fc.weight", "fc_w", self.fc.w), ("fc.bias", "fc_b", self.fc.b)]
        #: canonical name -> (layout kind, objax variable)
        self.canonical = {n: (kind, var) for n, kind, var in named}

    def __call__(self, x):
        x = x.transpose((0, 3, 1, 2))  # NHWC -> NCHW, objax's layout
        x = objax.functional.relu(self.gn1(self.conv1(x)))
        if self.imagenet:  # objax pads max-pooling with -inf, as the spec asks
            x = objax.functional.max_pool_2d(x, 3, 2, padding=1)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean((2, 3)))


class Adapter(jc.JaxDevice, BaseAdapter):
    framework = f"JAX {jax.__version__} (Objax)"
    mode = "objax-pgv"
    OPTIONS = {
        "use_norm_accumulation": "PGV's two-pass mode",
        "eval_batch_size": "rows per prediction call",
        "compilation_cache": "XLA's persistent cache: true, false or a folder",
        "conv": "xla, auto or patches",
    }

    def _build(self) -> None:
        spec, seed = self.spec, self.seed
        self._cache_dir = jc.compilation_cache_dir(self.options.get("compilation_cache", True))
        jc.enable_compilation_cache(jax, self._cache_dir)
        self._norm_acc = bool(self.options.get("use_norm_accumulation", False))
        # Default "xla": under jax 0.5.3 the patches path did not pay here (docs/benchmarks.md).
        option = self.options.get("conv", "xla")
        self._conv_dp, self._conv = jc.conv_impls(option, jax.default_backend(), "objax")
        self.mode = "objax-pgv" + ("-normacc" if self._norm_acc else "")
        self.mode += "-patches" if self._conv_dp == "patches" else ""
        self._eval_rows = int(self.options.get("eval_batch_size", 128))
        if self._eval_rows < 1:
            raise ValueError(f"objax option eval_batch_size={self._eval_rows}; expected >= 1")

        self.model = ResNet18(spec)
        self.model.conv_impl[0] = self._conv
        self._shapes = param_shapes(spec)
        self.model_vars = self.model.vars()
        # Gradients (GradValues, PGV) and Momentum come in the order of the trainable variables.
        by_id = {id(var): name for name, (_, var) in self.model.canonical.items()}
        self._order = [by_id[id(v)] for v in self.model_vars.subset(objax.TrainVar).values()]
        self.set_weights(init_weights(spec, seed))

        self._noise_gen = objax.random.Generator(seed)  # the DP noise, one draw per step
        self._pgv_gen = objax.random.Generator(seed)  # PGV's own noise, scaled by 0 here
        self._opt = objax.optimizer.Momentum(self.model_vars)  # mu passed per call
        self._gv = objax.GradValues(self._masked_loss_sum, self.model_vars)
        self._predict = objax.Jit(lambda x: self.model(x), self.model_vars)
        self._nonprivate_chunk = objax.Jit(lambda x, y, m: self._gv(x, y, m), self._gv.vars())
        self._add = jax.jit(lambda a, b: [u + v for u, v in zip(a, b, strict=True)])
        self._dp_chunk = self._make_dp_chunk()
        opt_vars = self.model_vars + self._opt.vars()

        sizes = [int(np.prod(v.value.shape)) for v in self.model_vars.subset(objax.TrainVar)]
        cuts = np.cumsum(sizes)[:-1]

        def apply_noisy(gsum, lr, momentum, std, divisor):
            # One draw for all parameters, cut into pieces: a draw per parameter compiles
            # ~60 threefry kernels, minutes of XLA time on a CPU.
            noise = objax.random.normal((sum(sizes),), stddev=std, generator=self._noise_gen)
            parts = jn.split(noise, cuts)
            noisy = [(g + n.reshape(g.shape)) / divisor for g, n in zip(gsum, parts, strict=True)]
            self._opt(lr, noisy, momentum=momentum)

        def apply_plain(gsum, lr, momentum, divisor):
            self._opt(lr, [g / divisor for g in gsum], momentum=momentum)

        # lr, momentum, std and B are traced: these compile once, whatever the StepConfig.
        self._apply_noisy = objax.Jit(apply_noisy, opt_vars + self._noise_gen.vars())
        self._apply_plain = objax.Jit(apply_plain, opt_vars)
        self._gsum = None  # the logical step's accumulated gradient sum

    # -- model ------------------------------------------------------------------------------
    def num_params(self) -> int:
        return int(sum(np.prod(v.value.shape) for _, v in self.model.canonical.values()))

    def get_weights(self) -> dict[str, np.ndarray]:
        return {
            n: to_canonical(kind, np.asarray(var.value, dtype=np.float32))
            for n, (kind, var) in self.model.canonical.items()
        }

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, self._shapes)
        for n, (kind, var) in self.model.canonical.items():
            var.assign(jn.asarray(to_objax(kind, np.asarray(weights[n], dtype=np.float32))))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return jc.predict_padded(self._predict, x, self._eval_rows, self.spec.num_classes)

    # -- the math ---------------------------------------------------------------------------
    def _masked_loss_sum(self, x, y, m):
        """Sum of per-example cross-entropy times the mask: padding rows add 0 and get grad 0."""
        losses = objax.functional.loss.cross_entropy_logits_sparse(self.model(x), y)
        return (losses * m).sum()

    def _make_dp_chunk(self) -> objax.Jit:
        """Jitted (x, y, mask, clip) -> (clipped grad sum over real rows, loss sum), via PGV."""
        pgv = PrivateGradValues(
            self._masked_loss_sum,
            self.model_vars,
            noise_multiplier=0.0,  # noise is added once per logical batch, not per chunk
            l2_norm_clip=1.0,  # replaced by the traced clip norm below
            microbatch=1,
            batch_axis=(0, 0, 0),
            keygen=self._pgv_gen,
            use_norm_accumulation=self._norm_acc,
        )

        def chunk(x, y, m, clip_norm):
            # PGV reads l2_norm_clip while tracing: a traced value makes one compile serve
            # every clip norm (the conformance suite asks for two).
            pgv.l2_norm_clip = clip_norm
            self.model.conv_impl[0] = self._conv_dp  # likewise the DP step's convolutions
            try:
                g, values = pgv(x, y, m)
            finally:
                pgv.l2_norm_clip = 1.0
                self.model.conv_impl[0] = self._conv
            rows = x.shape[0]  # PGV averaged over all rows; padding rows added zeros
            return [gi * rows for gi in g], values[0] * rows

        return objax.Jit(chunk, pgv.vars())

    def _device_batch(self, batch: Batch):
        return (
            jn.asarray(batch.x, dtype=jn.float32),
            jn.asarray(batch.y, dtype=jn.int32),
            jn.asarray(batch.mask, dtype=jn.float32),
        )

    def _grads_to_canonical(self, grads) -> dict[str, np.ndarray]:
        kinds = {n: kind for n, (kind, _) in self.model.canonical.items()}
        return {
            n: to_canonical(kinds[n], np.asarray(g, dtype=np.float32))
            for n, g in zip(self._order, grads, strict=True)
        }

    # -- the step's hooks -------------------------------------------------------------------
    def _setup(self, step: StepConfig) -> None:
        for m in self._opt.m:
            m.assign(jn.zeros_like(m.value))
        self._gsum = None

    def _accumulate(self, chunk: Batch, private: bool) -> float:
        x, y, m = self._device_batch(chunk)
        if private:
            g, loss = self._dp_chunk(x, y, m, float(self._step.clip_norm))
        else:
            g, (loss,) = self._nonprivate_chunk(x, y, m)
        self._gsum = g if self._gsum is None else self._add(self._gsum, g)
        return float(loss)

    def _apply(self, noise_std: float | None, divisor: float, lr: float) -> None:
        gsum = self._gsum
        if gsum is None:  # no real row in the logical batch: noise (or nothing) alone
            gsum = [jn.zeros_like(v.value) for v in self.model_vars.subset(objax.TrainVar)]
        if noise_std is None:
            self._apply_plain(gsum, lr, self._step.momentum, divisor)
        else:
            self._apply_noisy(gsum, lr, self._step.momentum, noise_std, divisor)
        self._gsum = None

    def _clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        x, y, m = self._device_batch(batch)
        grads, _ = self._dp_chunk(x, y, m, clip_norm)
        return self._grads_to_canonical(grads)

    def reseed(self, seed: int) -> None:
        self._noise_gen.seed(int(seed))
        self._pgv_gen.seed(int(seed))

    # -- checkpoint state -------------------------------------------------------------------
    def _momentum(self) -> dict[str, np.ndarray]:
        return self._grads_to_canonical(self._opt.m)

    def _set_momentum(self, momentum: dict[str, np.ndarray]) -> None:
        check_weights(momentum, self._shapes)
        kinds = {n: kind for n, (kind, _) in self.model.canonical.items()}
        for n, m in zip(self._order, self._opt.m, strict=True):
            m.assign(jn.asarray(to_objax(kinds[n], momentum[n])))

    def _noise_state(self) -> np.ndarray:
        return np.asarray(self._noise_gen.key.value)

    def _set_noise_state(self, state: np.ndarray) -> None:
        self._noise_gen.key.assign(jn.asarray(state))

    # -- reporting --------------------------------------------------------------------------
    def backend_epsilon(self, sample_rate: float, steps: int, delta: float) -> dict | None:
        if self._step is None or not self._step.private:
            return None
        sigma = float(self._step.noise_multiplier)
        eps = analyze_dp(
            q=float(sample_rate),
            noise_multiplier=sigma,
            steps=int(steps),
            orders=OBJAX_ORDERS,
            delta=float(delta),
        )
        return {
            "epsilon": float(eps),
            "accountant": "objax.privacy.dpsgd.analyze_dp (RDP)",
            # a string, so the runner's flat metrics.json keeps it (it drops lists)
            "rdp_orders": ",".join(f"{o:g}" for o in OBJAX_ORDERS),
            "delta": float(delta),
            "sampling": "poisson",
            "sample_rate": float(sample_rate),
            "noise_multiplier": sigma,
            "steps": int(steps),
        }

    def _device_state(self):
        return [v.value for v in self.model_vars.values()]

    def versions(self) -> dict[str, str]:
        import jaxlib

        return {
            "objax": objax.__version__,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "xla_threads": jc.thread_note(self.threads),
            "xla_compilation_cache": self._cache_dir or "off",
        }
