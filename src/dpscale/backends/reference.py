"""The oracle: DP-SGD written from scratch with torch.func, nothing hidden.

Per logical step (base.py): per-example gradients with vmap(grad) over functional_call, each
clipped to C (factor min(1, C / (||g_i|| + 1e-6)), the 1e-6 guarding against 0/0 as Opacus
does), summed over the real rows of every chunk, plus one Gaussian draw N(0, sigma^2 C^2) per
parameter, divided by the expected batch size B. Non-private: mean gradient over real rows.
Then SGD with heavy-ball momentum, v = mu*v + g, w = w - lr*v.

Options: `device` ("auto", "cpu", "cuda"), `vmap_chunk` (max examples per vmap call; bounds the
memory of per-example gradients, which is examples x parameters floats; default: whole chunk).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from dpscale.backends import _torch_resnet as tr
from dpscale.backends.base import Adapter as BaseAdapter
from dpscale.backends.base import Batch, StepConfig
from dpscale.models.resnet import ResNetSpec, init_weights

CLIP_EPS = 1e-6
KNOWN_OPTIONS = {"device", "vmap_chunk"}


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """Per-example scale that brings a gradient of norm `norms` to at most `clip_norm`."""
    return (clip_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def per_example_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's whole gradient (all parameters flattened together)."""
    sq = [g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()]
    return torch.stack(sq, 1).sum(1).sqrt()


class Adapter(tr.TorchModel, BaseAdapter):
    mode = "reference-torch.func"

    def __init__(self, spec: ResNetSpec, options: dict, seed: int, threads: int) -> None:
        super().__init__(spec, options, seed, threads)
        unknown = sorted(set(self.options) - KNOWN_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown reference backend option(s) {unknown}; expected {sorted(KNOWN_OPTIONS)}"
            )
        tr.set_threads(threads)
        self._device = tr.pick_device(self.options)
        self._vmap_chunk = self.options.get("vmap_chunk")
        if self._vmap_chunk is not None and int(self._vmap_chunk) < 1:
            raise ValueError(f"reference option vmap_chunk={self._vmap_chunk}; expected >= 1")
        self.model = tr.ResNet18(spec).to(self._device)
        tr.load_canonical(self.model, init_weights(spec, seed))
        self._step: StepConfig | None = None
        self._momentum: dict[str, torch.Tensor] | None = None
        self._momentum_from_checkpoint = False
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

    def _real_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chunk's real examples; PyTorch is eager, so padding is simply sliced away."""
        mask = np.asarray(batch.mask, dtype=bool)
        if mask.shape != (len(batch.x),) or len(batch.y) != len(batch.x):
            raise ValueError(
                f"batch has x {np.shape(batch.x)}, y {np.shape(batch.y)}, mask {mask.shape}; "
                "expected one label and one mask entry per image"
            )
        if not mask.any():
            return None
        return tr.to_images(batch.x[mask], self._device), tr.to_labels(batch.y[mask], self._device)

    def _clipped_sum(self, x, y, clip_norm, acc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add the clipped per-example gradients of (x, y) to `acc`; return the loss sum."""
        params = self._params()
        step = int(self._vmap_chunk or len(x))
        loss_sum = torch.zeros((), device=self._device)
        for i in range(0, len(x), step):
            grads, losses = self._per_example(params, x[i : i + step], y[i : i + step])
            factors = clip_factors(per_example_norms(grads), clip_norm)
            for name, g in grads.items():
                acc[name] += torch.tensordot(factors, g, dims=1)
            loss_sum += losses.sum()
        return loss_sum

    def _zeros(self) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(p) for n, p in self.trainable().items()}

    # -- training ---------------------------------------------------------------------------
    def setup_training(self, step: StepConfig) -> None:
        self._step = step
        if not self._momentum_from_checkpoint:
            self._momentum = self._zeros()
        self._momentum_from_checkpoint = False

    def train_step(self, chunks: list[Batch], lr: float) -> float:
        if self._step is None:
            raise RuntimeError("train_step called before setup_training")
        cfg = self._step
        total = torch.zeros((), device=self._device)
        count = 0
        g = self._zeros()
        for batch in chunks:
            rows = self._real_rows(batch)
            if rows is None:
                continue
            x, y = rows
            count += len(y)
            if cfg.private:
                total += self._clipped_sum(x, y, cfg.clip_norm, g)
            else:
                grads, loss = self._mean_grad(self._params(), x, y)
                for name, gi in grads.items():
                    g[name] += gi
                total += loss
        with torch.no_grad():
            if cfg.private:
                # One noise draw per logical step, in canonical order, whatever its chunking;
                # an empty logical batch still gets it (Poisson sampling can draw nobody).
                std = cfg.noise_multiplier * cfg.clip_norm
                for gi in g.values():
                    if std > 0:
                        gi += torch.normal(
                            0.0, std, gi.shape, generator=self._gen, device=self._device
                        )
                    gi /= cfg.expected_batch_size
            elif count:
                for gi in g.values():
                    gi /= count
            # Heavy-ball momentum, PyTorch convention (base.py).
            for name, p in self.trainable().items():
                v = self._momentum[name]
                v.mul_(cfg.momentum).add_(g[name])
                p.sub_(lr * v)
        # An empty logical batch has no loss to average; 0.0 keeps the runner's NaN check quiet.
        return float(total) / count if count else 0.0

    def clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        acc = self._zeros()
        rows = self._real_rows(batch)
        if rows is not None:
            self._clipped_sum(*rows, clip_norm, acc)
        return {n: t.cpu().numpy().astype(np.float32) for n, t in acc.items()}

    def reseed(self, seed: int) -> None:
        self._gen.manual_seed(int(seed))

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, path: Path) -> None:
        state = {
            "format": "dpscale-reference-1",
            "weights": {n: p.detach().cpu() for n, p in self.model.named_parameters()},
            "momentum": {n: v.cpu() for n, v in (self._momentum or {}).items()},
        }
        tr.atomic_save(state, Path(path))

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != "dpscale-reference-1":
            raise ValueError(f"{path} is not a reference-backend checkpoint")
        tr.load_canonical(self.model, {n: t.numpy() for n, t in state["weights"].items()})
        if state["momentum"]:
            self._momentum = {n: t.to(self._device) for n, t in state["momentum"].items()}
            # setup_training (if called after this) must keep these buffers.
            self._momentum_from_checkpoint = self._step is None

    # -- reporting --------------------------------------------------------------------------
    def device(self) -> str:
        return str(self._device)

    def peak_memory_bytes(self) -> int | None:
        return tr.peak_memory_bytes(self._device)

    def versions(self) -> dict[str, str]:
        return tr.versions()
