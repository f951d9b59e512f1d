"""The backend contract: what an adapter does. Everything else is the runner's.

The runner (numpy only) owns data, the Poisson batch plan, padding, the learning-rate schedule,
timing, checkpoint cadence and outputs. An adapter owns only what is framework-specific: the
model (from dpscale.models.resnet), one optimizer step, prediction, weights and checkpoints.

Arrays crossing the contract:
- images: float32 (n, H, W, 3), already normalized; labels: int64 (n,); mask: bool (n,), False
  rows are padding and must contribute nothing (no gradient, no loss, no count).
- weights: dict canonical name -> float32 array in canonical (PyTorch) layout.

The DP step (private=True) over one *logical* batch given as physical chunks:
    g = (sum over real examples of clip(grad_i, C) + N(0, (sigma*C)^2 I)) / B
where C = clip_norm, sigma = noise_multiplier and B = expected_batch_size (q * N), never the
realized batch size. The non-private step uses the mean gradient over the real examples.
Then SGD with heavy-ball momentum, PyTorch convention: v = mu*v + g; w = w - lr*v.
Loss is softmax cross-entropy.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpscale.models.resnet import ResNetSpec


@dataclass(frozen=True)
class Batch:
    """One physical, padded chunk of a logical batch."""

    x: np.ndarray  # float32 (P, H, W, 3)
    y: np.ndarray  # int64 (P,)
    mask: np.ndarray  # bool (P,)

    @property
    def size(self) -> int:
        return int(self.mask.sum())


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


class Adapter(abc.ABC):
    """One framework's side of the contract. Subclass as `Adapter` in dpscale.backends.<name>."""

    #: a short label of the DP mechanism actually used (e.g. "opacus-hooks"), set by the adapter
    mode: str = ""

    def __init__(self, spec: ResNetSpec, options: dict, seed: int, threads: int) -> None:
        """Build the model initialized from `dpscale.models.resnet.init_weights(spec, seed)`."""
        self.spec = spec
        self.options = dict(options)
        self.seed = seed
        self.threads = threads

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

    # -- training ---------------------------------------------------------------------------
    @abc.abstractmethod
    def setup_training(self, step: StepConfig) -> None:
        """Create optimizer state and the DP machinery; called once before the first step."""

    @abc.abstractmethod
    def train_step(self, chunks: list[Batch], lr: float) -> float:
        """One logical step over its physical chunks; returns the mean loss of the real examples."""

    @abc.abstractmethod
    def clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        """Sum over real examples of per-example gradients clipped to `clip_norm`, no noise.

        Canonical names and layouts; computed with the same machinery as the DP step.
        """

    @abc.abstractmethod
    def reseed(self, seed: int) -> None:
        """Reset the framework's noise RNG; the runner calls it at each epoch start so that a
        resumed run draws the same noise as an unbroken one."""

    @abc.abstractmethod
    def save_checkpoint(self, path: Path) -> None:
        """Weights and optimizer state, to the file `path`."""

    @abc.abstractmethod
    def load_checkpoint(self, path: Path) -> None:
        """Restore what `save_checkpoint` wrote; called after `setup_training`, so the optimizer
        state it restores into exists."""

    # -- reporting (optional) ---------------------------------------------------------------
    def backend_epsilon(self, sample_rate: float, steps: int, delta: float) -> dict | None:
        """The framework's own privacy statement, recorded beside the central accountant's."""
        return None

    def device(self) -> str:
        return "cpu"

    def peak_memory_bytes(self) -> int | None:
        """Accelerator peak memory, if the framework tracks it (host RSS is the runner's)."""
        return None

    def versions(self) -> dict[str, str]:
        return {}
