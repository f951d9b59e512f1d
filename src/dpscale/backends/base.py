"""The backend contract. The logical DP step, the checkpoint and the options check live here,
once; an adapter supplies its framework's hooks.

The runner (numpy only) owns data, the Poisson batch plan, padding, the learning-rate schedule,
timing, checkpoint cadence and outputs. An adapter owns only what is framework-specific: the
model (from dpscale.models.resnet), the hooks of one optimizer step, prediction, weights, its
optimizer and noise state, and its framework's own privacy statement.

Arrays crossing the contract:
- images: float32 (n, H, W, 3), already normalized; labels: int64 (n,); mask: bool (n,), False
  rows are padding and must contribute nothing (no gradient, no loss, no count).
- weights: dict canonical name -> float32 array in canonical (PyTorch) layout.

The DP step (private=True) over one *logical* batch given as physical chunks (`train_step`):
    g = (sum over real examples of clip(grad_i, C) + N(0, (sigma*C)^2 I)) / B
where C = clip_norm, sigma = noise_multiplier and B = expected_batch_size (q * N), never the
realized batch size: chunks with no real row add nothing, the noise is drawn once per logical
step (also when Poisson sampling drew nobody), and the loss is the mean over real rows (0.0 for
an empty batch). The non-private step uses the mean gradient over the real examples. Then SGD
with heavy-ball momentum, PyTorch convention: v = mu*v + g; w = w - lr*v. Loss: softmax
cross-entropy.

Hooks (a framework's work only):
- `_setup(step)`: optimizer state and the DP machinery for this StepConfig;
- `_accumulate(chunk, private)`: add the chunk's sum over its real rows of clipped per-example
  gradients (private) or of plain gradients (not) to the adapter's accumulator; return the sum
  of their losses. Only called for chunks with real rows;
- `_apply(noise_std, divisor, lr)`: add N(0, noise_std^2) to the accumulated sum (one draw per
  parameter entry; noise_std None: no noise), divide by `divisor`, take the momentum step at
  `lr` (momentum from the StepConfig), and empty the accumulator;
- `_clipped_grad_sum(batch, clip_norm)`: the clipped sum with the DP step's own machinery;
- `_momentum()` / `_set_momentum(m)`, `_noise_state()` / `_set_noise_state(s)`: what a
  checkpoint holds beside the weights.

The device policy (`Runtime`: training.device, precision, deterministic) is applied here too:
`_configure(runtime)` sets the framework's precision, determinism and memory flags before the
model is built, `_visible_devices()` says what the framework sees (so that `device: gpu` fails
at construction, in one line, instead of training on the CPU), `synchronize()` waits for the
device's queued work (step timers call it), `device()` names the device as "cpu" or
"cuda:<model>" in every backend.

Data parallelism (training.devices N, `Runtime.devices`): a logical step's physical chunks are
spread over N workers, chunk i to worker i % N (`_local_chunks`). Each worker accumulates the
clipped sums of its own chunks; `_all_reduce` then sums the accumulators, the loss sums and the
counts over the workers, once, before `_apply`. The noise is one draw per logical step because
every worker holds the same noise RNG state (same seed, same reseeds, same checkpoint) and adds
the identical draw to the identical reduced sum: the weights stay identical on every worker,
with no broadcast. Torch backends run N processes (`workers`, `rank`: torch.distributed, one
device each); jax runs one process over N local devices (workers 1: it shards the chunks itself
in `_accumulate_chunks`). Only rank 0 writes outputs and checkpoints (the runner's rule).
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpscale import atomic
from dpscale.models.resnet import ResNetSpec

CHECKPOINT_FORMAT = "dpscale-checkpoint-1"


@dataclass(frozen=True)
class Batch:
    """One physical, padded chunk of a logical batch."""

    x: np.ndarray  # float32 (P, H, W, 3)
    y: np.ndarray  # int64 (P,)
    mask: np.ndarray  # bool (P,)

    @property
    def size(self) -> int:
        return int(np.count_nonzero(self.mask))


@dataclass(frozen=True)
class StepConfig:
    private: bool
    clip_norm: float
    noise_multiplier: float  # sigma; ignored when not private
    expected_batch_size: float  # B = q * N, the DP divisor
    momentum: float
    physical_batch_size: int  # the fixed chunk size P the adapter compiles for

    def __post_init__(self) -> None:
        if self.private and (self.clip_norm <= 0 or self.expected_batch_size <= 0):
            raise ValueError(
                f"DP step needs clip_norm > 0 and expected_batch_size > 0; got "
                f"{self.clip_norm} and {self.expected_batch_size}"
            )
        if self.private and self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier}; expected >= 0")


DEVICES = ("auto", "cpu", "gpu")
PRECISIONS = ("fp32", "tf32")


class DeviceError(RuntimeError):
    """The requested device is not what the framework sees."""


@dataclass(frozen=True)
class Runtime:
    """How a run uses its device (config training.device, .precision, .deterministic).

    device: auto (a GPU if the framework sees one), cpu, or gpu (required: an error otherwise).
    precision: fp32 (TF32 off everywhere, as frameworks default differently) or tf32 (float32
    matmuls and convolutions in TF32 on Ampere and later GPUs; no effect on a CPU).
    deterministic: the framework's determinism flags (slower; GPU reductions in fixed order).
    """

    device: str = "auto"
    precision: str = "fp32"
    deterministic: bool = False
    devices: int = 1  # data-parallel workers sharing each logical step (training.devices)

    def __post_init__(self) -> None:
        if not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"devices {self.devices!r}; expected an integer >= 1")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r}; expected one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}"
            )


DEFAULT_RUNTIME = Runtime()


def is_gpu(device: str) -> bool:
    """'cuda:NVIDIA H200' -> True, 'cpu' -> False: the kind in an adapter's device() name."""
    return device.split(":", 1)[0] == "cuda"


def check_weights(weights: dict[str, np.ndarray], shapes: dict[str, tuple]) -> None:
    """One-line error unless `weights` has exactly the canonical names and shapes."""
    missing = [n for n in shapes if n not in weights]
    extra = [n for n in weights if n not in shapes]
    if missing or extra:
        raise ValueError(
            f"weights do not match the model: missing {missing[:3]}, unexpected {extra[:3]}; "
            "expected the canonical names of dpscale.models.resnet.param_shapes"
        )
    for n, shape in shapes.items():
        if tuple(np.shape(weights[n])) != tuple(shape):
            raise ValueError(f"weights[{n!r}] has shape {np.shape(weights[n])}; expected {shape}")


class Adapter(abc.ABC):
    """One framework's side of the contract. Subclass as `Adapter` in dpscale.backends.<name>."""

    #: a short label of the DP mechanism actually used (e.g. "opacus-hooks"), set by the adapter
    mode: str = ""
    #: the backend options the adapter reads: name -> what it sets (its docs say more)
    OPTIONS: dict[str, str] = {}
    #: the framework's name in messages ("JAX sees only [cpu]")
    framework: str = ""
    #: how to get a GPU when the framework sees none
    gpu_fix: str = "build the cuda env (accelerator: cuda)"
    #: whether the adapter can share a logical step over runtime.devices > 1 (see the module's
    #: docstring; dpscale.backends.MULTI_DEVICE lists these backends without importing them)
    multi_device: bool = False
    #: this process among the `workers` processes that share each logical step
    rank: int = 0
    workers: int = 1
    #: set by the runner before setup_training under privacy.secure_randomness: a framework
    #: with a hardened noise sampler uses it (Opacus' secure_mode); the noise's law is the same
    secure_noise: bool = False

    def __init__(
        self,
        spec: ResNetSpec,
        options: dict,
        seed: int,
        threads: int,
        runtime: Runtime = DEFAULT_RUNTIME,
    ) -> None:
        """Check the options and the device, set the framework's flags, then `_build()` the
        model initialized from `dpscale.models.resnet.init_weights(spec, seed)`."""
        self.spec = spec
        self.options = dict(options)
        self.seed = seed
        self.threads = threads
        self.runtime = runtime
        self._step: StepConfig | None = None
        unknown = sorted(set(self.options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown {self.backend} backend option(s) {unknown}; "
                f"expected one of {sorted(self.OPTIONS)}"
            )
        if runtime.devices > 1 and not self.multi_device:
            from dpscale.backends import MULTI_DEVICE

            raise ValueError(
                f"training.devices={runtime.devices}, but the {self.backend} backend runs on one "
                f"device; expected devices 1, or a backend among {', '.join(MULTI_DEVICE)}"
            )
        self._configure(runtime)
        if runtime.device == "gpu":
            seen = self._visible_devices()
            if not any(is_gpu(d) for d in seen):
                raise DeviceError(
                    f"backend {self.backend}: device gpu requested, {self.framework} sees only "
                    f"[{', '.join(seen)}]; {self.gpu_fix}"
                )
        self._build()

    @abc.abstractmethod
    def _build(self) -> None:
        """The framework's model, optimizer machinery and noise generator (self.spec, .options,
        .seed, .threads, .runtime are set)."""

    def use_gpu(self) -> bool:
        """Whether to build the model on a GPU: asked for, or auto and one is there."""
        return self.runtime.device == "gpu" or (
            self.runtime.device == "auto" and any(is_gpu(d) for d in self._visible_devices())
        )

    @property
    def backend(self) -> str:
        """The backend's name: its module's, dpscale.backends.<name>."""
        return type(self).__module__.rsplit(".", 1)[-1]

    # -- model ------------------------------------------------------------------------------
    @abc.abstractmethod
    def num_params(self) -> int: ...

    @abc.abstractmethod
    def get_weights(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def set_weights(self, weights: dict[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits, float32 (n, num_classes), in inference mode."""

    def freeze(self, names: list[str]) -> None:
        """Keep these canonical parameters fixed from now on (no gradient, no noise, no update):
        transfer learning. Called after set_weights and before setup_training. A backend that
        cannot freeze leaves this as is, and the runner names the ones that can."""
        raise NotImplementedError(f"{type(self).__module__} cannot freeze parameters")

    # -- the logical step (here, once) ------------------------------------------------------
    def check_batch(self, batch: Batch, physical: int | None = None) -> None:
        """One-line errors for a malformed padded chunk (of `physical` rows, if given)."""
        x, n = batch.x, len(batch.x)
        if np.shape(batch.y) != (n,) or np.shape(batch.mask) != (n,):
            raise ValueError(
                f"batch has x {np.shape(x)}, y {np.shape(batch.y)}, mask {np.shape(batch.mask)}; "
                "expected one label and one mask entry per image"
            )
        want = (self.spec.image_size, self.spec.image_size, self.spec.in_channels)
        if tuple(np.shape(x)[1:]) != want:
            raise ValueError(
                f"batch images have shape {np.shape(x)[1:]}; expected {want} (H, W, C)"
            )
        if physical is not None and n != physical:
            raise ValueError(
                f"batch has {n} rows; expected the physical batch size {physical} (pad with a mask)"
            )

    def setup_training(self, step: StepConfig) -> None:
        """Optimizer state and the DP machinery; before the first step and before
        load_checkpoint (which restores into that state)."""
        self._setup(step)
        self._step = step

    def _require_setup(self, what: str) -> StepConfig:
        if self._step is None:
            raise RuntimeError(f"{self.backend} backend: {what} called before setup_training")
        return self._step

    def train_step(self, chunks: list[Batch], lr: float) -> float:
        """One logical step over its physical chunks; returns the mean loss of the real examples."""
        cfg = self._require_setup("train_step")
        for chunk in chunks:
            self.check_batch(chunk, cfg.physical_batch_size)
        loss_sum, count = self._accumulate_chunks(self._local_chunks(chunks), cfg.private)
        # Every worker's sums together, once, before the one noise draw (the module's docstring).
        loss_sum, count = self._all_reduce(loss_sum, count)
        if cfg.private:
            # One draw per logical step, whatever its chunking, also for an empty logical batch
            # (Poisson sampling can draw nobody); divided by B, never by the realized size.
            self._apply(cfg.noise_multiplier * cfg.clip_norm, cfg.expected_batch_size, lr)
        else:
            self._apply(None, float(max(count, 1)), lr)
        # An empty logical batch has no loss to average; 0.0 keeps the runner's NaN check quiet.
        return loss_sum / count if count else 0.0

    def _local_chunks(self, chunks: list[Batch]) -> list[Batch]:
        """The chunks this worker accumulates: chunk i goes to worker i % workers."""
        return chunks[self.rank :: self.workers]

    def _accumulate_chunks(self, chunks: list[Batch], private: bool) -> tuple[float, int]:
        """(loss sum, real rows) of `chunks`, their gradient sums added to the accumulator."""
        loss_sum, count = 0.0, 0
        for chunk in chunks:
            if chunk.size:  # an all-padding chunk adds nothing; skip its compute
                loss_sum += float(self._accumulate(chunk, private))
                count += chunk.size
        return loss_sum, count

    def _all_reduce(self, loss_sum: float, count: int) -> tuple[float, int]:
        """Sum the accumulators, loss sums and counts of all `workers` (every one gets the
        totals); with one worker there is nothing to do."""
        if self.workers > 1:
            raise NotImplementedError(f"{self.backend} backend: no all-reduce for {self.workers}")
        return loss_sum, count

    def weights_digest(self) -> str:
        """sha256 of the canonical weights: equal on every worker of a data-parallel run."""
        h = hashlib.sha256()
        for name, w in sorted(self.get_weights().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(w, np.float32).tobytes())
        return h.hexdigest()

    def clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        """Sum over real examples of per-example gradients clipped to `clip_norm`, no noise, in
        canonical names and layouts, computed with the same machinery as the DP step."""
        self.check_batch(batch)
        if clip_norm <= 0:
            raise ValueError(f"clip_norm={clip_norm}; expected > 0")
        return self._clipped_grad_sum(batch, float(clip_norm))

    @abc.abstractmethod
    def _setup(self, step: StepConfig) -> None: ...

    @abc.abstractmethod
    def _accumulate(self, chunk: Batch, private: bool) -> float: ...

    @abc.abstractmethod
    def _apply(self, noise_std: float | None, divisor: float, lr: float) -> None: ...

    @abc.abstractmethod
    def _clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def reseed(self, seed: int) -> None:
        """Reset the framework's noise RNG; the runner calls it at each epoch start so that a
        resumed run draws the same noise as an unbroken one."""

    # -- checkpoints: one format, written and read here -------------------------------------
    @abc.abstractmethod
    def _momentum(self) -> dict[str, np.ndarray]:
        """The momentum buffers by canonical name, canonical layout (trainable parameters)."""

    @abc.abstractmethod
    def _set_momentum(self, momentum: dict[str, np.ndarray]) -> None: ...

    @abc.abstractmethod
    def _noise_state(self) -> np.ndarray:
        """The noise RNG's state as an array (restored by _set_noise_state)."""

    @abc.abstractmethod
    def _set_noise_state(self, state: np.ndarray) -> None: ...

    def save_checkpoint(self, path: Path) -> None:
        """Weights, momentum and the noise RNG's state, to the file `path` (atomically)."""
        self._require_setup("save_checkpoint")
        arrays = {"format": np.array(CHECKPOINT_FORMAT), "backend": np.array(self.backend)}
        arrays.update({f"w/{n}": w for n, w in self.get_weights().items()})
        arrays.update({f"m/{n}": np.asarray(m, np.float32) for n, m in self._momentum().items()})
        arrays["noise_state"] = np.asarray(self._noise_state())
        atomic.write_npz(Path(path), arrays)

    def load_checkpoint(self, path: Path) -> None:
        """Restore what save_checkpoint wrote; after setup_training, whose state it fills."""
        self._require_setup("load_checkpoint")
        try:
            with np.load(Path(path), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a {self.backend}-backend checkpoint ({err})") from err
        found = (str(arrays.get("format", "")), str(arrays.get("backend", "")))
        if found != (CHECKPOINT_FORMAT, self.backend):
            raise ValueError(
                f"{path} is not a {self.backend}-backend checkpoint: format {found[0]!r} of "
                f"backend {found[1]!r}; expected {CHECKPOINT_FORMAT!r} of {self.backend!r}"
            )
        self.set_weights({k[2:]: v for k, v in arrays.items() if k.startswith("w/")})
        self._set_momentum({k[2:]: v for k, v in arrays.items() if k.startswith("m/")})
        self._set_noise_state(arrays["noise_state"])

    def close(self) -> None:
        """Release what the adapter holds beyond the process's life (a process group)."""
        return None

    # -- reporting (optional) ---------------------------------------------------------------
    def backend_epsilon(self, sample_rate: float, steps: int, delta: float) -> dict | None:
        """The framework's own privacy statement, recorded beside the central accountant's."""
        return None

    # -- the device (hooks; defaults for a CPU-only framework) ------------------------------
    def _configure(self, runtime: Runtime) -> None:
        """The framework's precision, determinism and memory flags, before the model is built."""
        return None

    def _visible_devices(self) -> list[str]:
        """What the framework sees, as device() names them: ["cpu"], ["cuda:NVIDIA H200", ...]."""
        return ["cpu"]

    def synchronize(self) -> None:
        """Return when the device has finished the work queued so far (the last update
        included), so that a timer stopped after it measures the whole step."""
        return None

    def device(self) -> str:
        """The device this adapter computes on: "cpu" or "cuda:<model name>"."""
        return "cpu"

    def peak_memory_bytes(self) -> int | None:
        """Accelerator peak memory, if the framework tracks it (host RSS is the runner's)."""
        return None

    def versions(self) -> dict[str, str]:
        return {}
