"""Opacus 1.6 on the runner's batches: its per-sample gradients, clipping, noise and accounting.

The batch plan is the runner's (shared by every backend), so Opacus' own Poisson DataLoader is
not used: the adapter builds Opacus' GradSampleModule and DPOptimizer directly, with the
expected batch size B = q * N as the divisor (make_private would round it to an int). A logical
batch of several chunks is one optimizer step: every chunk but the last is a skipped step
(`signal_skip_step`, as Opacus' BatchMemoryManager does), so clipped gradients accumulate and
noise is drawn once. Padding rows are sliced away (PyTorch is eager); a logical batch with no
real rows still takes the noise-only step, via the empty-batch path of Opacus' clipping.

Options: `grad_sample_mode` "hooks" (default), "functorch" or "ghost" (fast gradient clipping:
per-sample norms, then a second backward of the coefficient-weighted loss; Opacus 1.6 has ghost
norm samplers only for Linear and Embedding, so the convs and GroupNorms of this ResNet still
materialize per-sample gradients for their norms); `fast_samplers` (default true: _opacus_fast's
grouped-convolution Conv2d sampler and copy-free storage, same numbers; false: stock Opacus);
`device` ("auto", "cpu", "cuda").
Non-private: plain torch SGD on the same model, hooks off.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus import __version__ as opacus_version
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from dpscale.backends import _opacus_fast
from dpscale.backends import _torch_resnet as tr
from dpscale.backends.base import Adapter as BaseAdapter
from dpscale.backends.base import Batch, StepConfig
from dpscale.models.resnet import ResNetSpec, init_weights

MODES = ("hooks", "functorch", "ghost")
KNOWN_OPTIONS = {"grad_sample_mode", "fast_samplers", "device"}

# Noise only, no behaviour change: the pseudo-RNG is what seeded, reproducible runs need, and
# the first conv's input never requires grad, which Opacus' full backward hooks report.
warnings.filterwarnings("ignore", message=r"Secure RNG turned off")
warnings.filterwarnings("ignore", message=r"Full backward hook is firing when gradients")


class Adapter(tr.TorchModel, BaseAdapter):
    def __init__(self, spec: ResNetSpec, options: dict, seed: int, threads: int) -> None:
        super().__init__(spec, options, seed, threads)
        unknown = sorted(set(self.options) - KNOWN_OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown opacus backend option(s) {unknown}; expected {sorted(KNOWN_OPTIONS)}"
            )
        self.grad_sample_mode = self.options.get("grad_sample_mode", "hooks")
        if self.grad_sample_mode not in MODES:
            raise ValueError(
                f"opacus option grad_sample_mode={self.grad_sample_mode!r}; "
                f"expected one of {', '.join(MODES)}"
            )
        fast = self.options.get("fast_samplers", True)
        if not isinstance(fast, bool):
            raise ValueError(f"opacus option fast_samplers={fast!r}; expected true or false")
        _opacus_fast.install(fast)
        self.mode = f"opacus-{self.grad_sample_mode}" + ("" if fast else "-stock")
        tr.set_threads(threads)
        self._device = tr.pick_device(self.options)
        self.model = tr.ResNet18(spec).to(self._device)
        tr.load_canonical(self.model, init_weights(spec, seed))
        self._gen = torch.Generator(device=self._device)
        self._gen.manual_seed(seed)
        self._gsm = None  # Opacus' per-sample machinery, built on first private use
        self._step: StepConfig | None = None
        self._sgd: torch.optim.SGD | None = None
        self._dp: DPOptimizer | None = None
        self._pending_momentum: dict[str, torch.Tensor] | None = None

    # -- Opacus machinery -------------------------------------------------------------------
    @property
    def _ghost(self) -> bool:
        return self.grad_sample_mode == "ghost"

    def _grad_sample_module(self, clip_norm: float):
        """One wrapper for the adapter's life: wrapping twice would hook every layer twice."""
        if self._gsm is None:
            if self._ghost:
                self._gsm = GradSampleModuleFastGradientClipping(
                    self.model, batch_first=True, loss_reduction="mean", max_grad_norm=clip_norm
                )
            else:
                self._gsm = GradSampleModule(
                    self.model,
                    batch_first=True,
                    loss_reduction="mean",
                    force_functorch=self.grad_sample_mode == "functorch",
                )
        if self._ghost:
            # Ghost clipping computes the clip coefficients inside the module.
            self._gsm.max_grad_norm = clip_norm
        self._gsm.enable_hooks()
        return self._gsm

    def _dp_optimizer(self, sgd, sigma: float, clip_norm: float, batch_size: float):
        cls = DPOptimizerFastGradientClipping if self._ghost else DPOptimizer
        return cls(
            sgd,
            noise_multiplier=sigma,
            max_grad_norm=clip_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=self._gen,
            secure_mode=False,
        )

    def _real_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        mask = np.asarray(batch.mask, dtype=bool)
        if mask.shape != (len(batch.x),) or len(batch.y) != len(batch.x):
            raise ValueError(
                f"batch has x {np.shape(batch.x)}, y {np.shape(batch.y)}, mask {mask.shape}; "
                "expected one label and one mask entry per image"
            )
        if not mask.any():
            return None
        return tr.to_images(batch.x[mask], self._device), tr.to_labels(batch.y[mask], self._device)

    def _dp_backward(self, gsm, opt, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward/backward of one chunk's real rows; returns its loss sum."""
        logits = gsm(x)
        if self._ghost:
            criterion = DPLossFastGradientClipping(
                gsm, opt, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
            )
            loss = criterion(logits, y)
            loss.backward()  # two passes: per-sample norms, then the clipped sum
            return float(loss.loss_per_sample.detach().sum())
        loss = F.cross_entropy(logits, y)  # mean: Opacus rescales per-sample grads by len(y)
        loss.backward()
        return float(loss.detach()) * len(y)

    def _empty_batch(self, opt) -> None:
        """What a zero-row Poisson batch leaves behind, so opt.step() adds noise only."""
        for p in self.trainable().values():
            if self._ghost:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    def _dp_logical_step(self, gsm, opt, chunks: list[Batch]) -> tuple[float, int]:
        rows = [r for r in map(self._real_rows, chunks) if r is not None]
        opt.zero_grad(set_to_none=True)
        loss_sum, count = 0.0, 0
        if not rows:
            self._empty_batch(opt)
        for i, (x, y) in enumerate(rows):
            loss_sum += self._dp_backward(gsm, opt, x, y)
            count += len(y)
            if i < len(rows) - 1:
                # Clip and accumulate this chunk; noise and the update wait for the last one.
                opt.signal_skip_step(do_skip=True)
                opt.step()
                opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum, count

    def _nonprivate_logical_step(self, chunks: list[Batch]) -> tuple[float, int]:
        if self._gsm is not None:
            self._gsm.disable_hooks()
        rows = [r for r in map(self._real_rows, chunks) if r is not None]
        count = sum(len(y) for _, y in rows)
        self._sgd.zero_grad(set_to_none=False)  # zeros, so an empty batch still steps momentum
        loss_sum = 0.0
        for x, y in rows:
            loss = F.cross_entropy(self.model(x), y, reduction="sum")
            (loss / count).backward()
            loss_sum += float(loss.detach())
        for p in self.trainable().values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._sgd.step()
        self._sgd.zero_grad(set_to_none=True)
        return loss_sum, count

    # -- training ---------------------------------------------------------------------------
    def setup_training(self, step: StepConfig) -> None:
        self._step = step
        self._sgd = torch.optim.SGD(self.trainable().values(), lr=0.0, momentum=step.momentum)
        self._dp = None
        if step.private:
            self._grad_sample_module(step.clip_norm)
            self._dp = self._dp_optimizer(
                self._sgd, step.noise_multiplier, step.clip_norm, step.expected_batch_size
            )
        if self._pending_momentum is not None:
            self._set_momentum(self._pending_momentum)
            self._pending_momentum = None

    def train_step(self, chunks: list[Batch], lr: float) -> float:
        if self._step is None:
            raise RuntimeError("train_step called before setup_training")
        for group in self._sgd.param_groups:
            group["lr"] = lr
        if self._step.private:
            gsm = self._grad_sample_module(self._step.clip_norm)
            loss_sum, count = self._dp_logical_step(gsm, self._dp, chunks)
        else:
            loss_sum, count = self._nonprivate_logical_step(chunks)
        # An empty logical batch has no loss to average; 0.0 keeps the runner's NaN check quiet.
        return loss_sum / count if count else 0.0

    def clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        """The DP step's own machinery with sigma=0 and divisor 1, stopped before the update."""
        gsm = self._grad_sample_module(clip_norm)
        probe = torch.optim.SGD(self.trainable().values(), lr=0.0)
        opt = self._dp_optimizer(probe, 0.0, clip_norm, 1.0)
        opt.zero_grad(set_to_none=True)
        rows = self._real_rows(batch)
        if rows is None:
            self._empty_batch(opt)
        else:
            self._dp_backward(gsm, opt, *rows)
        opt.pre_step()  # clip, accumulate, add zero noise, divide by 1: p.grad is the sum
        out = {
            n: p.grad.detach().cpu().numpy().astype(np.float32, copy=True)
            for n, p in self.trainable().items()
        }
        opt.zero_grad(set_to_none=True)
        if self._ghost and self._step is not None and self._step.private:
            gsm.max_grad_norm = self._step.clip_norm
        return out

    def reseed(self, seed: int) -> None:
        self._gen.manual_seed(int(seed))

    # -- checkpoints ------------------------------------------------------------------------
    def _momentum(self) -> dict[str, torch.Tensor]:
        if self._sgd is None:
            return {}
        out = {}
        for name, p in self.model.named_parameters():
            buf = self._sgd.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[name] = buf.detach().cpu().clone()
        return out

    def _set_momentum(self, buffers: dict[str, torch.Tensor]) -> None:
        for name, p in self.model.named_parameters():
            if name in buffers:
                self._sgd.state[p]["momentum_buffer"] = buffers[name].to(p.device, p.dtype)

    def save_checkpoint(self, path: Path) -> None:
        state = {
            "format": "dpscale-opacus-1",
            "weights": {n: p.detach().cpu() for n, p in self.model.named_parameters()},
            "momentum": self._momentum(),
        }
        tr.atomic_save(state, Path(path))

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != "dpscale-opacus-1":
            raise ValueError(f"{path} is not an opacus-backend checkpoint")
        tr.load_canonical(self.model, {n: t.numpy() for n, t in state["weights"].items()})
        if self._sgd is None:
            self._pending_momentum = state["momentum"]  # applied by setup_training
        else:
            self._set_momentum(state["momentum"])

    # -- reporting --------------------------------------------------------------------------
    def backend_epsilon(self, sample_rate: float, steps: int, delta: float) -> dict | None:
        """Opacus' RDP accountant (its default orders) for Poisson sampling at rate q."""
        if self._step is None or not self._step.private:
            return None
        sigma = self._step.noise_multiplier
        accountant = RDPAccountant()
        accountant.history = [(sigma, sample_rate, int(steps))]
        eps, order = accountant.get_privacy_spent(delta=delta)
        alphas = RDPAccountant.DEFAULT_ALPHAS
        return {
            "epsilon": float(eps),
            "accountant": "opacus.accountants.RDPAccountant",
            "orders": f"opacus default: {len(alphas)} orders {alphas[0]:g}..{alphas[-1]:g}",
            "best_order": float(order),
            "delta": float(delta),
            "sampling": "poisson",
            "noise_multiplier": float(sigma),
            "sample_rate": float(sample_rate),
            "steps": int(steps),
        }

    def device(self) -> str:
        return str(self._device)

    def peak_memory_bytes(self) -> int | None:
        return tr.peak_memory_bytes(self._device)

    def versions(self) -> dict[str, str]:
        return {**tr.versions(), "opacus": opacus_version}
