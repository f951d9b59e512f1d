"""TensorFlow Privacy backend: DPModel's per-example clipping, compiled with XLA.

The DP path (mode "dpmodel-vmap-xla"): the model is a tensorflow_privacy DPModel; per-example
gradients come from `tf.vectorized_map` over one-example tapes and are clipped by DPModel's own
`_process_per_example_grads`, exactly as `DPModel.train_step` does, inside one XLA-compiled
function per physical shape. DPModel's ghost-norm fast path needs every trainable layer in its
layer registry, which has no Conv2D or GroupNormalization, so it cannot run on this model.

Why not `DPModel.fit`/`train_step` as is: it adds noise to each physical batch and divides by
the realized batch size, and applies the optimizer per physical batch. The contract (base.py)
needs the clipped sums of all chunks of a logical batch, then one noise draw N(0, (sigma C)^2),
division by the expected batch size B, and PyTorch-convention momentum. So this adapter keeps
TF Privacy's per-example gradient and clipping machinery and does the aggregation itself:
padding rows get per-example loss weight 0 (zero gradient, and clipping divides a zero norm by
max(0/C, 1) = 1, so they contribute exactly 0; a tf.where drops them again to be safe).

Options: `xla` (default true): compile the gradient functions with XLA (about 10x faster for
the per-example path on CPU); `predict_batch` (default 256): rows per inference call.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path

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
    gradient_clipping_utils,
    layer_registry,
)
from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPModel  # noqa: E402

from dpscale.backends import _keras_resnet as kr  # noqa: E402
from dpscale.backends.base import Adapter as BaseAdapter  # noqa: E402
from dpscale.backends.base import Batch, StepConfig  # noqa: E402
from dpscale.models.resnet import ResNetSpec, init_weights  # noqa: E402

KNOWN_OPTIONS = {"xla", "predict_batch"}
CHECKPOINT_FORMAT = "dpscale-tfprivacy-1"
ACCOUNTANT = (
    "tensorflow_privacy compute_dp_sgd_privacy_statement (RDP, dp_accounting default orders)"
)


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


class Adapter(BaseAdapter):
    mode = "dpmodel-vmap-xla"

    def __init__(self, spec: ResNetSpec, options: dict, seed: int, threads: int) -> None:
        super().__init__(spec, options, seed, threads)
        unknown = sorted(set(self.options) - KNOWN_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown tfprivacy backend option(s) {unknown}; expected {sorted(KNOWN_OPTIONS)}"
            )
        self._xla = bool(self.options.get("xla", True))
        self._predict_batch = int(self.options.get("predict_batch", 256))
        if self._predict_batch < 1:
            raise ValueError(f"tfprivacy option predict_batch={self._predict_batch}; expected >= 1")
        set_threads(threads)
        self._clip = tf.Variable(1.0, trainable=False, dtype=tf.float32, name="l2_norm_clip")
        self.model, slots = kr.build(
            spec,
            lambda **kw: DPModel(l2_norm_clip=1.0, noise_multiplier=0.0, use_xla=False, **kw),
        )
        # DPModel's clipping reads self._l2_norm_clip; a variable lets clipped_grad_sum change C
        # without retracing. object.__setattr__ keeps Keras from tracking it as a model weight.
        object.__setattr__(self.model, "_l2_norm_clip", self._clip)
        self._vars = kr.variables(slots)
        self._tvars = list(self._vars.values())
        registry = layer_registry.make_default_layer_registry()
        self.ghost_supported = gradient_clipping_utils.all_trainable_layers_are_registered(
            self.model, registry
        )
        if not self._xla:
            self.mode = "dpmodel-vmap"
        self.set_weights(init_weights(spec, seed))
        self._acc = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self._tvars]
        self._vel = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self._tvars]
        self._momentum_from_checkpoint = False
        self._gen = tf.random.Generator.from_seed(int(seed))
        self._step: StepConfig | None = None
        self._apply = None

        shape = (None, spec.image_size, spec.image_size, spec.in_channels)
        signature = [
            tf.TensorSpec(shape, tf.float32),
            tf.TensorSpec((None,), tf.int64),
            tf.TensorSpec((None,), tf.float32),
        ]
        # One compiled program per physical shape: the batch dimension is left open in the
        # signature and XLA caches one executable per concrete size (the runner's P).
        self._dp_sum = tf.function(
            self._dp_sum_impl, input_signature=signature, jit_compile=self._xla
        )
        self._grad_sum = tf.function(
            self._grad_sum_impl, input_signature=signature, jit_compile=self._xla
        )
        self._dp_chunk = tf.function(self._dp_chunk_impl, input_signature=signature)
        self._np_chunk = tf.function(self._np_chunk_impl, input_signature=signature)
        self._logits = tf.function(
            lambda x: self.model(x, training=False), input_signature=signature[:1]
        )

    # -- model ------------------------------------------------------------------------------
    def num_params(self) -> int:
        return int(sum(np.prod(v.shape) for v in self._tvars))

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: kr.to_canonical(name, v.numpy()) for name, v in self._vars.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        missing = sorted(set(self._vars) - set(weights))
        extra = sorted(set(weights) - set(self._vars))
        if missing or extra:
            raise ValueError(
                f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}; "
                "expected the canonical names of dpscale.models.resnet.param_shapes"
            )
        for name, var in self._vars.items():
            w = kr.to_keras(name, weights[name])
            if w.shape != tuple(var.shape):
                want = kr.to_canonical(name, np.zeros(var.shape)).shape
                raise ValueError(f"weights[{name!r}] has shape {np.shape(weights[name])}; "
                                 f"expected {want}")  # fmt: skip
            var.assign(w)

    def predict(self, x: np.ndarray) -> np.ndarray:
        n = self._predict_batch
        out = [
            self._logits(tf.convert_to_tensor(np.asarray(x[i : i + n], np.float32))).numpy()
            for i in range(0, len(x), n)
        ]
        if not out:
            return np.zeros((0, self.spec.num_classes), np.float32)
        return np.concatenate(out).astype(np.float32)

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
        grads = tape.gradient(loss, self._tvars)
        return self.model._process_per_example_grads(grads), loss

    def _dp_sum_impl(self, x, y, w):
        """Sum over real rows of per-example clipped gradients (canonical order), loss sum."""
        clipped, losses = tf.vectorized_map(
            self._clipped_example_grads, (x[:, None], y[:, None], w[:, None])
        )
        real = w > 0
        sums = []
        for g in clipped:
            keep = tf.reshape(real, [-1] + [1] * (g.shape.rank - 1))
            sums.append(tf.reduce_sum(tf.where(keep, g, tf.zeros_like(g)), axis=0))
        return sums, tf.reduce_sum(losses)

    def _grad_sum_impl(self, x, y, w):
        """Gradient of the summed loss of the real rows (non-private), loss sum."""
        with tf.GradientTape() as tape:
            loss = self._example_loss(x, y, w)
        return tape.gradient(loss, self._tvars), loss

    def _dp_chunk_impl(self, x, y, w):
        sums, loss = self._dp_sum(x, y, w)
        for acc, s in zip(self._acc, sums, strict=True):
            acc.assign_add(s)
        return loss

    def _np_chunk_impl(self, x, y, w):
        grads, loss = self._grad_sum(x, y, w)
        for acc, g in zip(self._acc, grads, strict=True):
            acc.assign_add(g)
        return loss

    def _make_apply(self, cfg: StepConfig):
        """g = (acc + noise) / divisor; v = mu v + g; w -= lr v; acc = 0 (one graph)."""
        std = float(cfg.noise_multiplier * cfg.clip_norm) if cfg.private else 0.0
        mu = float(cfg.momentum)

        @tf.function(input_signature=[tf.TensorSpec((), tf.float32)] * 2)
        def apply(lr, divisor):
            for acc, vel, var in zip(self._acc, self._vel, self._tvars, strict=True):
                g = acc.read_value()
                if cfg.private:
                    # One draw per logical step, in canonical order, whatever its chunking.
                    g = g + std * self._gen.normal(acc.shape, dtype=tf.float32)
                vel.assign(mu * vel + g / divisor)
                var.assign_sub(lr * vel)
                acc.assign(tf.zeros_like(acc))

        return apply

    # -- training ---------------------------------------------------------------------------
    def _tensors(self, batch: Batch):
        x = np.asarray(batch.x, dtype=np.float32)
        mask = np.asarray(batch.mask, dtype=bool)
        if mask.shape != (len(x),) or np.shape(batch.y) != (len(x),):
            raise ValueError(
                f"batch has x {x.shape}, y {np.shape(batch.y)}, mask {mask.shape}; "
                "expected one label and one mask entry per image"
            )
        want = (self.spec.image_size, self.spec.image_size, self.spec.in_channels)
        if x.shape[1:] != want:
            raise ValueError(f"batch images have shape {x.shape[1:]}; expected {want} (H, W, C)")
        y = np.where(mask, np.asarray(batch.y, dtype=np.int64), 0)  # padding labels may be junk
        return tf.constant(x), tf.constant(y), tf.constant(mask.astype(np.float32)), int(mask.sum())

    def setup_training(self, step: StepConfig) -> None:
        if step.private and (step.clip_norm <= 0 or step.expected_batch_size <= 0):
            raise ValueError(
                f"DP step needs clip_norm > 0 and expected_batch_size > 0; got "
                f"{step.clip_norm} and {step.expected_batch_size}"
            )
        if step.private and step.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={step.noise_multiplier}; expected >= 0")
        self._step = step
        if step.private:
            self._clip.assign(step.clip_norm)
        if not self._momentum_from_checkpoint:
            for vel in self._vel:
                vel.assign(tf.zeros_like(vel))
        self._momentum_from_checkpoint = False
        for acc in self._acc:
            acc.assign(tf.zeros_like(acc))
        self._apply = self._make_apply(step)

    def train_step(self, chunks: list[Batch], lr: float) -> float:
        if self._step is None:
            raise RuntimeError("train_step called before setup_training")
        cfg = self._step
        chunk_fn = self._dp_chunk if cfg.private else self._np_chunk
        if cfg.private:
            self._clip.assign(cfg.clip_norm)  # clipped_grad_sum may have changed it
        losses, count = [], 0
        for batch in chunks:
            x, y, w, n = self._tensors(batch)
            if n == 0:
                continue  # contributes nothing; the noise below is still added
            losses.append(chunk_fn(x, y, w))
            count += n
        divisor = cfg.expected_batch_size if cfg.private else max(count, 1)
        self._apply(tf.constant(lr, tf.float32), tf.constant(divisor, tf.float32))
        # An empty logical batch has no loss to average; 0.0 keeps the runner's NaN check quiet.
        return float(tf.add_n(losses)) / count if count else 0.0

    def clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        if clip_norm <= 0:
            raise ValueError(f"clip_norm={clip_norm}; expected > 0")
        x, y, w, n = self._tensors(batch)
        self._clip.assign(clip_norm)
        sums, _ = self._dp_sum(x, y, w)
        if self._step is not None and self._step.private:
            self._clip.assign(self._step.clip_norm)
        return {
            name: kr.to_canonical(name, s.numpy()) for name, s in zip(self._vars, sums, strict=True)
        }

    def reseed(self, seed: int) -> None:
        self._gen.reset_from_seed(int(seed))

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        path = Path(path)
        arrays = {"format": np.array(CHECKPOINT_FORMAT), "rng_state": self._gen.state.numpy()}
        for (name, var), vel in zip(self._vars.items(), self._vel, strict=True):
            arrays[f"weight/{name}"] = var.numpy()
            arrays[f"momentum/{name}"] = vel.numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:  # a file object: np.savez adds no ".npz"
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_checkpoint(self, path: Path) -> None:
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                if "format" not in z.files or str(z["format"]) != CHECKPOINT_FORMAT:
                    raise ValueError
                state = {k: z[k] for k in z.files}
        except (ValueError, OSError) as err:
            raise ValueError(f"{path} is not a tfprivacy-backend checkpoint") from err
        for (name, var), vel in zip(self._vars.items(), self._vel, strict=True):
            var.assign(state[f"weight/{name}"])
            vel.assign(state[f"momentum/{name}"])
        self._gen.state.assign(state["rng_state"])
        # setup_training (if called after this) must keep the loaded momentum.
        self._momentum_from_checkpoint = self._step is None

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

    def device(self) -> str:
        gpus = tf.config.list_logical_devices("GPU")
        return gpus[0].name if gpus else "cpu"

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
        return out
