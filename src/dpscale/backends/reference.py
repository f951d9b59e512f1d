"""DP-SGD written from scratch in torch: the oracle (mode vmap) and Book-Keeping (mode bk).

Mode vmap, the oracle the conformance suite compares every backend with, nothing hidden. Per
logical step (base.py): per-example gradients with vmap(grad) over functional_call, each
clipped to C (factor min(1, C / (||g_i|| + 1e-6)), the 1e-6 guarding against 0/0 as Opacus
does), summed over the real rows of every chunk, plus one Gaussian draw N(0, sigma^2 C^2) per
parameter, divided by the expected batch size B. Non-private: mean gradient over real rows.
Then SGD with heavy-ball momentum, v = mu*v + g, w = w - lr*v.

Options: `vmap_chunk` (max examples per vmap call, or per book-keeping pass; bounds the memory
of per-example gradients, which is examples x parameters floats; default: whole chunk); `mode`:
"bk" (default: Book-Keeping, norms and the clipped sum from one backward pass,
_bookkeeping_torch; label reference-bk; the same numbers at ~half the vmap step's time on CPU,
docs/benchmarks.md) or "vmap" (the above; label reference-torch.func), the same clipping factor
either way. The device comes from training.device (base.Runtime).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from dpscale.backends import _bookkeeping_torch as bk
from dpscale.backends import _torch_resnet as tr
from dpscale.backends.base import Adapter as BaseAdapter
from dpscale.backends.base import Batch, StepConfig
from dpscale.models.resnet import init_weights

CLIP_EPS = 1e-6
MODES = {"vmap": "reference-torch.func", "bk": "reference-bk"}
DEFAULT_MODE = "bk"


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Per-example scale that brings a gradient of norm `norms` to at most `clip_norm`."""
    return (clip_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def per_example_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's whole gradient (all parameters flattened together)."""
    sq = [g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()]
    return torch.stack(sq, 1).sum(1).sqrt()


class Adapter(tr.TorchModel, BaseAdapter):
    mode = MODES[DEFAULT_MODE]
    OPTIONS = {
        "vmap_chunk": "max examples per vmap call (bounds per-example gradient memory)",
        "mode": "bk (Book-Keeping, one backward pass; default) or vmap (per-example gradients)",
    }

    def _build(self) -> None:
        spec, seed, threads = self.spec, self.seed, self.threads
        tr.set_threads(threads)
        self._device = self.pick_device()
        self._vmap_chunk = self.options.get("vmap_chunk")
        if self._vmap_chunk is not None and int(self._vmap_chunk) < 1:
            raise ValueError(f"reference option vmap_chunk={self._vmap_chunk}; expected >= 1")
        option = self.options.get("mode", DEFAULT_MODE)
        if option not in MODES:
            raise ValueError(
                f"reference option mode={option!r}; expected one of {', '.join(MODES)}"
            )
        self.mode, self._bk = MODES[option], option == "bk"
        self.model = tr.ResNet18(spec).to(self._device)
        tr.load_canonical(self.model, init_weights(spec, seed))
        self._velocity: dict[str, torch.Tensor] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._gen = torch.Generator(device=self._device)
        self._gen.manual_seed(seed)
        # Per-example loss of one example, vmapped over the batch for per-example gradients.
        self._per_example = vmap(grad_and_value(self._loss_one), in_dims=(None, 0, 0))
        self._mean_grad = grad(self._loss_sum, has_aux=True)

    # -- model ------------------------------------------------------------------------------
    def _params(self) -> dict[str, torch.Tensor]:
        # Frozen parameters stay out: functional_call takes them from the module as constants,
        # so they get no gradient, count in no norm and receive no noise.
        return {n: p.detach() for n, p in self.trainable().items()}

    # -- the math ---------------------------------------------------------------------------
    def _loss_one(self, params, x, y):
        logits = functional_call(self.model, params, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0))

    def _loss_sum(self, params, x, y):
        loss = F.cross_entropy(functional_call(self.model, params, (x,)), y, reduction="sum")
        return loss, loss.detach()

    def _clipped_sum(self, x, y, clip_norm, acc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add the clipped per-example gradients of (x, y) to `acc`; return the loss sum."""
        params = self._params()
        step = int(self._vmap_chunk or len(x))
        loss_sum = torch.zeros((), device=self._device)
        layers = bk.tracked_layers(self.model) if self._bk else []
        for i in range(0, len(x), step):
            if self._bk:
                book = bk.book_keeping(self.model, layers, x[i : i + step], y[i : i + step])
                factors = clip_factors(book.sq_norms.sqrt(), clip_norm)
                for name, g in book.weighted_sum(factors).items():
                    acc[name] += g
                loss_sum += book.losses.sum()
                continue
            grads, losses = self._per_example(params, x[i : i + step], y[i : i + step])
            factors = clip_factors(per_example_norms(grads), clip_norm)
            for name, g in grads.items():
                acc[name] += torch.tensordot(factors, g, dims=1)
            loss_sum += losses.sum()
        return loss_sum

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(p) for n, p in self.trainable().items()}

    # -- the step's hooks -------------------------------------------------------------------
    def _setup(self, step: StepConfig) -> None:
        self._velocity = self._zeros()
        self._acc = self._zeros()

    def _accumulate(self, chunk: Batch, private: bool) -> float:
        x, y = tr.real_rows(chunk, self._device)
        if private:
            return float(self._clipped_sum(x, y, self._step.clip_norm, self._acc))
        grads, loss = self._mean_grad(self._params(), x, y)
        for name, g in grads.items():
            self._acc[name] += g
        return float(loss)

    def _grad_sums(self) -> list[torch.Tensor]:
        return list(self._acc.values())

    @torch.no_grad()
    def _apply(self, noise_std: float | None, divisor: float, lr: float) -> None:
        # The noise in canonical order, one tensor per parameter, from this adapter's generator.
        for g in self._acc.values():
            if noise_std:
                g += torch.normal(0.0, noise_std, g.shape, generator=self._gen, device=g.device)
            g /= divisor
        # Heavy-ball momentum, PyTorch convention (base.py).
        for name, p in self.trainable().items():
            v = self._velocity[name]
            v.mul_(self._step.momentum).add_(self._acc[name])
            p.sub_(lr * v)
        self._acc = self._zeros()

    def _clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        acc = self._zeros()
        if batch.size:
            self._clipped_sum(*tr.real_rows(batch, self._device), clip_norm, acc)
        return {n: t.cpu().numpy().astype(np.float32) for n, t in acc.items()}

    def reseed(self, seed: int) -> None:
        self._gen.manual_seed(int(seed))

    # -- checkpoint state -------------------------------------------------------------------
    def _momentum(self) -> dict[str, np.ndarray]:
        return {n: v.cpu().numpy() for n, v in self._velocity.items()}

    def _set_momentum(self, momentum: dict[str, np.ndarray]) -> None:
        self._velocity = tr.tensors_like(momentum, self.trainable())

    def _noise_state(self) -> np.ndarray:
        return self._gen.get_state().numpy()

    def _set_noise_state(self, state: np.ndarray) -> None:
        self._gen.set_state(torch.from_numpy(np.asarray(state, np.uint8)))

    # -- reporting --------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        return tr.versions()
