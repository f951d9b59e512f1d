"""TensorFlow Privacy backend: its norm pass with Book-Keeping sums by default, compiled with XLA.

The default DP path (mode "bk-xla", option mode=bk: Book-Keeping): TF Privacy's fast-clipping
norm pass, `clip_grads.compute_gradient_norms` (per-example gradient norms from each layer's
registry function in one forward/backward pass; TF Privacy 0.9.0 ships none for Conv2D and
GroupNormalization, dpscale's are in _bookkeeping_tf), with registry functions that also record
how to form each layer's clip-weighted sum from the layer input and output gradient they saw
(_bookkeeping_tf): no second pass. Option mode=ghost (mode "fast-clipping-ghost-xla", the
default before 2026-12-03): TF Privacy's whole fast gradient clipping,
`clip_grads.compute_clipped_gradients_and_outputs`: the same norm pass, then the gradient of the
loss reweighted by each row's clip factor (a second forward and backward). Option mode=vmap
(mode "dpmodel-vmap-xla") takes DPModel's own per-example path instead: `tf.vectorized_map`
over one-example tapes, clipped by DPModel's `_process_per_example_grads`, exactly as
`DPModel.train_step` does. Each runs inside one XLA-compiled function per physical shape
(option xla=false: without XLA, modes without "-xla").

Why not `DPModel.fit`/`train_step` as is: it adds noise to each physical batch and divides by
the realized batch size, and applies the optimizer per physical batch. The contract (base.py)
needs the clipped sums of all chunks of a logical batch, then one noise draw N(0, (sigma C)^2),
division by the expected batch size B, and PyTorch-convention momentum. So this adapter keeps
TF Privacy's per-example gradient and clipping machinery and does the aggregation itself:
padding rows get per-example loss weight 0 (zero gradient, and clipping divides a zero norm by
max(0/C, 1) = 1, so they contribute exactly 0; a tf.where drops them again to be safe).

Options: `xla` (default true): compile the gradient functions with XLA (about 10x faster for
the per-example path on CPU); `predict_batch` (default 256): rows per inference call;
`compilation_cache` (true: XLA's persistent cache, $TF_XLA_CACHE_DIR or `tf-xla-cache/<host>`
in the venv, so the jobs of a grid after the first skip the ~10-25 s compiles; false; or a
folder). On loading a cached program TensorFlow logs an error line about the target machine
feature `+prefer-no-gather`: a tuning flag the host check does not know, harmless on the host
that compiled it; the folder is keyed by the host's CPU so other hosts never load it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import weakref
from importlib import metadata

# Before TensorFlow is imported: Keras 3 breaks every TF Privacy API, and TF's C++ logs drown
# the step logs. tensorflow_privacy's package __init__ imports tensorflow_estimator (absent):
# this flag makes it skip those imports so its submodules can be imported directly.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.skip_tf_privacy_import = True

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib  # noqa: E402
from tensorflow_privacy.privacy.fast_gradient_clipping import (  # noqa: E402
    clip_grads,
    gradient_clipping_utils,
    layer_registry,
)
from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel  # noqa: E402

from dpscale.backends import _bookkeeping_tf as bk  # noqa: E402
from dpscale.backends import _keras_resnet as kr  # noqa: E402
from dpscale.backends._xla_cache import cache_dir  # noqa: E402
from dpscale.backends.base import Adapter as BaseAdapter  # noqa: E402
from dpscale.backends.base import (  # noqa: E402
    Batch,
    Runtime,
    StepConfig,
    check_weights,
)
from dpscale.models.resnet import ResNetSpec, init_weights, param_shapes  # noqa: E402

MODES = ("ghost", "bk", "vmap")
# Book-Keeping: the same clipped sums as ghost without its second pass (docs/benchmarks.md).
DEFAULT_MODE = "bk"
MODE_LABELS = {"ghost": "fast-clipping-ghost", "bk": "bk", "vmap": "dpmodel-vmap"}
ACCOUNTANT = (
    "tensorflow_privacy compute_dp_sgd_privacy_statement (RDP, dp_accounting default orders)"
)


def enable_compilation_cache(path: str | None) -> None:
    """Point XLA's persistent cache at `path` (no-op for None). TF parses TF_XLA_FLAGS at the
    first XLA compile, not at import, so this works until then; later it changes nothing."""
    if path is None:
        return
    flags = [f for f in os.environ.get("TF_XLA_FLAGS", "").split() if "persistent_cache" not in f]
    flags.append(f"--tf_xla_persistent_cache_directory={path}")
    os.environ["TF_XLA_FLAGS"] = " ".join(flags)


def _gpu_name(gpu) -> str:
    details = tf.config.experimental.get_device_details(gpu)
    return f"cuda:{details.get('device_name', gpu.name)}"


def set_threads(threads: int) -> None:
    """Intra-op threads from the rule's `threads`; must run before TF's context starts."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass  # context already started (a second adapter in the same process): keep its setting


def epochs_for_steps(sample_rate: float, steps: int) -> float:
    """num_epochs that TF Privacy's accounting turns back into exactly `steps` Poisson steps.

    It composes ceil(num_epochs / q) steps; steps * q can round up past an integer.
    """
    epochs = steps * sample_rate
    while math.ceil(epochs / sample_rate) > steps:
        epochs = math.nextafter(epochs, 0.0)
    while math.ceil(epochs / sample_rate) < steps:
        epochs = math.nextafter(epochs, math.inf)
    return epochs


def _sum_loss(y, logits, sample_weight):
    """Weighted sum of per-example cross-entropies: the clipped gradient sum, not the mean."""
    return tf.reduce_sum(bk.weighted_losses(y, logits, sample_weight))


class _Engine:
    """One Keras DPModel and its compiled programs for one (spec, xla) in this process.

    XLA compiles the per-example program once per physical shape, and that takes tens of seconds
    on a small CPU. Adapters of the same spec in one process (the conformance suite builds several)
    share the engine: its variables hold the state of one adapter at a time (the owner), and an
    adapter that needs the engine first parks the owner's state in numpy and loads its own.
    """

    def __init__(self, spec: ResNetSpec, mode: str, xla: bool) -> None:
        self.spec = spec
        self.mode = mode
        self.owner = None  # weakref to the Adapter whose state the variables hold
        self.clip = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="l2_norm_clip")
        self.model, slots = kr.build(
            spec,
            lambda **kw: DPModel(l2_norm_clip=1.0, noise_multiplier=0.0, use_xla=False, **kw),
        )
        # DPModel's clipping reads self._l2_norm_clip; a variable lets clipped_grad_sum change C
        # without retracing. object.__setattr__ keeps Keras from tracking it as a model weight.
        object.__setattr__(self.model, "_l2_norm_clip", self.clip)
        self.vars = kr.variables(slots)
        self.tvars = list(self.vars.values())
        self.acc = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.tvars]
        self.vel = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.tvars]
        self.gen = tf.random.Generator.from_seed(0)
        self.ghost_supported = gradient_clipping_utils.all_trainable_layers_are_registered(
            self.model, layer_registry.make_default_layer_registry()
        )
        self.registry = bk.make_layer_registry()
        if mode in ("ghost", "bk") and not (
            gradient_clipping_utils.all_trainable_layers_are_registered(self.model, self.registry)
        ):
            raise AssertionError("a trainable layer of the ResNet has no registry function")
        if mode == "ghost":
            # clip_grads reads the per-example loss from the compiled loss (reduction none).
            self.model.compile(
                optimizer="sgd",
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
            # clip_grads returns gradients in model.trainable_variables order; ours is canonical.
            where = {v.ref(): i for i, v in enumerate(self.model.trainable_variables)}
            self.canonical_index = [where[v.ref()] for v in self.tvars]

        shape = (None, spec.image_size, spec.image_size, spec.in_channels)
        signature = [
            tf.TensorSpec(shape, tf.float32),
            tf.TensorSpec((None,), tf.int64),
            tf.TensorSpec((None,), tf.float32),
        ]
        # One compiled program per physical shape: the batch dimension is left open in the
        # signature and XLA caches one executable per concrete size (the runner's P).
        dp_sum = {"ghost": self._dp_sum_ghost, "bk": self._dp_sum_bk, "vmap": self._dp_sum}[mode]
        self.dp_sum = tf.function(dp_sum, input_signature=signature, jit_compile=xla)
        self.grad_sum = tf.function(self._grad_sum, input_signature=signature, jit_compile=xla)
        self.dp_chunk = tf.function(self._dp_chunk, input_signature=signature)
        self.np_chunk = tf.function(self._np_chunk, input_signature=signature)
        self.logits = tf.function(
            lambda x: self.model(x, training=False), input_signature=signature[:1]
        )
        # Step hyperparameters are tensors: one trace each, whatever StepConfig or lr says.
        scalars = [tf.TensorSpec((), tf.float32)] * 4
        self.apply_private = tf.function(
            lambda lr, div, std, mu: self._apply(lr, div, std, mu, True), input_signature=scalars
        )
        self.apply_plain = tf.function(
            lambda lr, div, std, mu: self._apply(lr, div, std, mu, False), input_signature=scalars
        )

    # -- the math (traced) ------------------------------------------------------------------
    def _example_loss(self, x, y, w):
        logits = self.model(x, training=True)
        ce = tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return tf.reduce_sum(w * ce)

    def _clipped_example_grads(self, example):
        """One example (as a batch of 1): its gradient clipped by DPModel's own clipping."""
        x, y, w = example
        with tf.GradientTape() as tape:
            loss = self._example_loss(x, y, w)
        grads = tape.gradient(loss, self.tvars)
        return self.model._process_per_example_grads(grads), loss

    def _dp_sum(self, x, y, w):
        """Sum over real rows of per-example clipped gradients (canonical order), loss sum.

        Per-example gradients as DPModel.train_step computes them: tf.vectorized_map over
        one-example tapes (each example a batch of 1, as DPModel's microbatch axis does).
        """
        clipped, losses = tf.vectorized_map(
            self._clipped_example_grads, (x[:, None], y[:, None], w[:, None])
        )
        real = w > 0
        sums = []
        for g in clipped:
            keep = tf.reshape(real, [-1] + [1] * (g.shape.rank - 1))
            sums.append(tf.reduce_sum(tf.where(keep, g, tf.zeros_like(g)), axis=0))
        return sums, tf.reduce_sum(losses)

    def _dp_sum_ghost(self, x, y, w):
        """The same sums by TF Privacy's fast clipping: per-example norms from the registry
        functions (one forward/backward pass), then the gradient of the loss reweighted by the
        clip factors times the mask (a second pass): sum_i mask_i min(1, C/|g_i|) g_i."""
        grads, logits, _ = clip_grads.compute_clipped_gradients_and_outputs(
            self.model, self.clip, self.registry, x, y, weight_batch=w, clipping_loss=_sum_loss
        )
        return [grads[i] for i in self.canonical_index], _sum_loss(y, logits, w)

    def _dp_sum_bk(self, x, y, w):
        """The same sums by Book-Keeping: TF Privacy's norm pass (one forward/backward), the
        clip-weighted sums from the same layer inputs and output gradients (_bookkeeping_tf)."""
        return bk.clipped_sums(self.model, self.clip, x, y, w, self.tvars)

    def _grad_sum(self, x, y, w):
        """Gradient of the summed loss of the real rows (non-private), loss sum."""
        with tf.GradientTape() as tape:
            loss = self._example_loss(x, y, w)
        return tape.gradient(loss, self.tvars), loss

    def _dp_chunk(self, x, y, w):
        sums, loss = self.dp_sum(x, y, w)
        for acc, s in zip(self.acc, sums, strict=True):
            acc.assign_add(s)
        return loss

    def _np_chunk(self, x, y, w):
        grads, loss = self.grad_sum(x, y, w)
        for acc, g in zip(self.acc, grads, strict=True):
            acc.assign_add(g)
        return loss

    def _apply(self, lr, divisor, std, mu, private: bool):
        """g = (acc + std * N(0, 1)) / divisor; v = mu v + g; w -= lr v; acc = 0 (one graph)."""
        for acc, vel, var in zip(self.acc, self.vel, self.tvars, strict=True):
            g = acc.read_value()
            if private:
                # One draw per logical step, in canonical order, whatever its chunking.
                g = g + std * self.gen.normal(acc.shape, dtype=tf.float32)
            vel.assign(mu * vel + g / divisor)
            var.assign_sub(lr * vel)
            acc.assign(tf.zeros_like(acc))

    # -- state of one adapter ---------------------------------------------------------------
    def export_state(self) -> dict[str, np.ndarray]:
        return {
            "weights": [v.numpy() for v in self.tvars],
            "momentum": [v.numpy() for v in self.vel],
            "rng_state": self.gen.state.numpy(),
            "clip": self.clip.numpy(),
        }

    def import_state(self, state: dict) -> None:
        for var, w in zip(self.tvars, state["weights"], strict=True):
            var.assign(w)
        for vel, v in zip(self.vel, state["momentum"], strict=True):
            vel.assign(v)
        self.gen.state.assign(state["rng_state"])
        self.clip.assign(state["clip"])
        for acc in self.acc:
            acc.assign(tf.zeros_like(acc))


_ENGINES: dict[tuple, _Engine] = {}


class Adapter(BaseAdapter):
    framework = "TensorFlow"
    mode = MODE_LABELS[DEFAULT_MODE] + "-xla"
    OPTIONS = {
        "mode": "ghost (TF Privacy's fast clipping), bk (its norm pass, Book-Keeping sums) or "
        "vmap (DPModel's per-example path)",
        "xla": "compile the gradient functions with XLA",
        "predict_batch": "rows per inference call",
        "compilation_cache": "XLA's persistent cache: true, false or a folder",
    }

    def _build(self) -> None:
        spec, seed, threads = self.spec, self.seed, self.threads
        mode = self.options.get("mode", DEFAULT_MODE)
        if mode not in MODES:
            raise ValueError(f"tfprivacy option mode={mode!r}; expected one of {', '.join(MODES)}")
        xla = self.options.get("xla", True)
        if not isinstance(xla, bool):
            raise ValueError(f"tfprivacy option xla={xla!r}; expected true or false")
        self._predict_batch = int(self.options.get("predict_batch", 256))
        if self._predict_batch < 1:
            raise ValueError(f"tfprivacy option predict_batch={self._predict_batch}; expected >= 1")
        self.mode = MODE_LABELS[mode] + ("-xla" if xla else "")
        self._cache_dir = cache_dir(
            self.options.get("compilation_cache", True), "TF_XLA_CACHE_DIR", "tf-xla-cache"
        )
        enable_compilation_cache(self._cache_dir)
        set_threads(threads)
        key = (spec, mode, xla)
        if key not in _ENGINES:
            _ENGINES[key] = _Engine(spec, mode, xla)
        self._eng = _ENGINES[key]
        self._parked: dict | None = None
        # Take the engine with a fresh state: canonical init, zero momentum, seeded noise.
        self._take()
        for vel in self._eng.vel:
            vel.assign(tf.zeros_like(vel))
        self._eng.gen.reset_from_seed(int(seed))
        self._eng.clip.assign(1.0)
        self.set_weights(init_weights(spec, seed))

    @property
    def ghost_supported(self) -> bool:
        """Whether TF Privacy's layer registry covers every layer (its ghost-norm fast path)."""
        return bool(self._eng.ghost_supported)

    def _take(self) -> _Engine:
        """The engine, holding this adapter's state (parking its previous owner's)."""
        eng = self._eng
        owner = eng.owner() if eng.owner is not None else None
        if owner is not self:
            if owner is not None:
                owner._parked = eng.export_state()
            if self._parked is not None:
                eng.import_state(self._parked)
                self._parked = None
            eng.owner = weakref.ref(self)
        return eng

    # -- model ------------------------------------------------------------------------------
    def num_params(self) -> int:
        return int(sum(np.prod(v.shape) for v in self._eng.tvars))

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: kr.to_canonical(name, v.numpy()) for name, v in self._take().vars.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, param_shapes(self.spec))
        for name, var in self._take().vars.items():
            var.assign(kr.to_keras(name, weights[name]))

    def predict(self, x: np.ndarray) -> np.ndarray:
        eng, n = self._take(), self._predict_batch
        out = [
            eng.logits(tf.convert_to_tensor(np.asarray(x[i : i + n], np.float32))).numpy()
            for i in range(0, len(x), n)
        ]
        if not out:
            return np.zeros((0, self.spec.num_classes), np.float32)
        return np.concatenate(out).astype(np.float32)

    # -- the step's hooks -------------------------------------------------------------------
    def _tensors(self, batch: Batch):
        mask = np.asarray(batch.mask, dtype=bool)
        y = np.where(mask, np.asarray(batch.y, dtype=np.int64), 0)  # padding labels may be junk
        x = tf.constant(np.asarray(batch.x, dtype=np.float32))
        return x, tf.constant(y), tf.constant(mask.astype(np.float32))

    def _setup(self, step: StepConfig) -> None:
        eng = self._take()
        for vel in eng.vel:
            vel.assign(tf.zeros_like(vel))
        for acc in eng.acc:
            acc.assign(tf.zeros_like(acc))

    def _accumulate(self, chunk: Batch, private: bool) -> float:
        eng = self._take()
        if private:
            eng.clip.assign(self._step.clip_norm)  # clipped_grad_sum may have set another
            return float(eng.dp_chunk(*self._tensors(chunk)))
        return float(eng.np_chunk(*self._tensors(chunk)))

    def _apply(self, noise_std: float | None, divisor: float, lr: float) -> None:
        eng = self._take()
        apply = eng.apply_plain if noise_std is None else eng.apply_private
        values = (lr, divisor, noise_std or 0.0, self._step.momentum)
        apply(*(tf.constant(v, tf.float32) for v in values))

    def _clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        eng = self._take()
        eng.clip.assign(clip_norm)
        sums, _ = eng.dp_sum(*self._tensors(batch))
        return {
            name: kr.to_canonical(name, s.numpy()) for name, s in zip(eng.vars, sums, strict=True)
        }

    def reseed(self, seed: int) -> None:
        self._take().gen.reset_from_seed(int(seed))

    # -- checkpoint state -------------------------------------------------------------------
    def _momentum(self) -> dict[str, np.ndarray]:
        eng = self._take()
        return {
            name: kr.to_canonical(name, vel.numpy())
            for name, vel in zip(eng.vars, eng.vel, strict=True)
        }

    def _set_momentum(self, momentum: dict[str, np.ndarray]) -> None:
        check_weights(momentum, param_shapes(self.spec))
        eng = self._take()
        for name, vel in zip(eng.vars, eng.vel, strict=True):
            vel.assign(kr.to_keras(name, momentum[name]))

    def _noise_state(self) -> np.ndarray:
        return self._take().gen.state.numpy()

    def _set_noise_state(self, state: np.ndarray) -> None:
        self._take().gen.state.assign(state)

    # -- reporting --------------------------------------------------------------------------
    def backend_epsilon(self, sample_rate: float, steps: int, delta: float) -> dict | None:
        """TF Privacy's own figure: the "Epsilon assuming Poisson sampling" line of
        compute_dp_sgd_privacy_statement (add/remove-one example, no microbatching)."""
        if self._step is None or not self._step.private or steps < 1:
            return None
        sigma = float(self._step.noise_multiplier)
        lib = compute_dp_sgd_privacy_lib
        eps = lib._compute_dp_sgd_example_privacy(
            epochs_for_steps(sample_rate, steps),
            sigma,
            delta,
            used_microbatching=False,
            poisson_subsampling_probability=sample_rate,
            accountant_type=lib.AccountantType.RDP,
        )
        return {
            "epsilon": float(eps),
            "accountant": ACCOUNTANT,
            "delta": float(delta),
            "sampling": "poisson",
            "sample_rate": float(sample_rate),
            "steps": int(steps),
            "noise_multiplier": sigma,
        }

    # -- the device: flags before TF's context starts ----------------------------------------
    def _configure(self, runtime: Runtime) -> None:
        try:
            for gpu in tf.config.list_physical_devices("GPU"):
                # TF takes the whole GPU otherwise: other jobs on it fail or slow down.
                tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # context already started (a second adapter in the process): keep its setting
        # TF's default on Ampere and later is TF32 for float32 matmuls and convolutions.
        tf.config.experimental.enable_tensor_float_32_execution(runtime.precision == "tf32")
        if runtime.deterministic:
            tf.config.experimental.enable_op_determinism()

    def _visible_devices(self) -> list[str]:
        gpus = tf.config.list_physical_devices("GPU")
        return [_gpu_name(g) for g in gpus] or ["cpu"]

    def synchronize(self) -> None:
        # Ops on a device run in order: reading a variable the update wrote waits for all of it.
        self._eng.vel[-1].numpy()

    def device(self) -> str:
        if not tf.config.list_logical_devices("GPU"):
            return "cpu"
        return _gpu_name(tf.config.list_physical_devices("GPU")[0])

    def peak_memory_bytes(self) -> int | None:
        if not tf.config.list_logical_devices("GPU"):
            return None
        return int(tf.config.experimental.get_memory_info("GPU:0")["peak"])

    def versions(self) -> dict[str, str]:
        out = {}
        for pkg in (
            "tensorflow-cpu",
            "tensorflow",
            "tf-keras",
            "tensorflow-privacy",
            "dp-accounting",
        ):
            with contextlib.suppress(metadata.PackageNotFoundError):
                out[pkg] = metadata.version(pkg)
        out["xla_compilation_cache"] = self._cache_dir or "off"
        return out
