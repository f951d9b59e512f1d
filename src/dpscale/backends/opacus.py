"""Opacus 1.6 on the runner's batches: its per-sample gradients, clipping, noise and accounting.

The batch plan is the runner's (shared by every backend), so Opacus' own Poisson DataLoader is
not used: the adapter builds Opacus' GradSampleModule and DPOptimizer directly, with the
expected batch size B = q * N as the divisor (make_private would round it to an int). A logical
batch of several chunks is one optimizer step: every chunk but the last is a skipped step
(`signal_skip_step`, as Opacus' BatchMemoryManager does), so clipped gradients accumulate and
noise is drawn once. Padding rows are sliced away (PyTorch is eager); a logical batch with no
real rows still takes the noise-only step, via the empty-batch path of Opacus' clipping.

Options: `grad_sample_mode` "bk" (default: Book-Keeping, _opacus_bk: Opacus'
fast-gradient-clipping hooks, clip coefficients and optimizer, with _bookkeeping_torch's
per-layer norm samplers; one backward to the layers' outputs, no batch weight gradient, and the
clipped sum from the hooks' activations and backprops instead of a second backward), "hooks"
(Opacus' per-sample gradients), "functorch" or "ghost" (fast gradient clipping: per-sample
norms, then a second backward of the coefficient-weighted loss; Opacus 1.6 has ghost norm
samplers only for Linear and Embedding, so the convs and GroupNorms of this ResNet still
materialize per-sample gradients for their norms); `fast_samplers` (default true:
_opacus_fast's grouped-convolution Conv2d sampler and copy-free storage, same numbers; false:
stock Opacus, with hooks, functorch or ghost: bk runs none of Opacus' samplers);
the device comes from training.device (base.Runtime). docs/backends/opacus.md says more.
Non-private: plain torch SGD on the same model, hooks off.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from opacus import __version__ as opacus_version
from opacus.accountants import RDPAccountant
from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from dpscale.backends import _opacus_bk, _opacus_fast
from dpscale.backends import _torch_resnet as tr
from dpscale.backends.base import Adapter as BaseAdapter
from dpscale.backends.base import Batch, StepConfig
from dpscale.models.resnet import init_weights

MODES = ("hooks", "functorch", "ghost", "bk")
# Book-Keeping: the same clipped sums as hooks in about 0.7x its DP step (docs/benchmarks.md).
DEFAULT_MODE = "bk"

# Noise only, no behaviour change: the pseudo-RNG is what seeded, reproducible runs need, and
# the first conv's input never requires grad, which Opacus' full backward hooks report.
warnings.filterwarnings("ignore", message=r"Secure RNG turned off")
warnings.filterwarnings("ignore", message=r"Full backward hook is firing when gradients")


class Adapter(tr.TorchModel, BaseAdapter):
    OPTIONS = {
        "grad_sample_mode": "hooks, functorch, ghost or bk",
        "fast_samplers": "dpscale's faster Conv2d sampler and storage (same numbers)",
    }

    def _build(self) -> None:
        spec, seed, threads = self.spec, self.seed, self.threads
        self.grad_sample_mode = self.options.get("grad_sample_mode", DEFAULT_MODE)
        if self.grad_sample_mode not in MODES:
            raise ValueError(
                f"opacus option grad_sample_mode={self.grad_sample_mode!r}; "
                f"expected one of {', '.join(MODES)}"
            )
        fast = self.options.get("fast_samplers", True)
        if not isinstance(fast, bool):
            raise ValueError(f"opacus option fast_samplers={fast!r}; expected true or false")
        if self.grad_sample_mode == "bk" and not fast:
            raise ValueError(
                "opacus option fast_samplers=false with grad_sample_mode=bk (the default); "
                "expected grad_sample_mode hooks, functorch or ghost with it: mode bk runs none "
                "of Opacus' per-sample samplers"
            )
        _opacus_fast.install(fast)
        self.mode = f"opacus-{self.grad_sample_mode}" + ("" if fast else "-stock")
        tr.set_threads(threads)
        self._device = self.pick_device()
        self.model = tr.ResNet18(spec).to(self._device)
        tr.load_canonical(self.model, init_weights(spec, seed))
        self._gen = torch.Generator(device=self._device)
        self._gen.manual_seed(seed)
        self._gsm = None  # Opacus' per-sample machinery, built on first private use
        self._sgd: torch.optim.SGD | None = None
        self._dp: DPOptimizer | None = None

    # -- Opacus machinery -------------------------------------------------------------------
    @property
    def _fgc(self) -> bool:
        """Opacus' fast-gradient-clipping module and optimizer: p.grad is the clipped sum."""
        return self.grad_sample_mode in ("ghost", "bk")

    def _grad_sample_module(self, clip_norm: float):
        """One wrapper for the adapter's life: wrapping twice would hook every layer twice."""
        if self._gsm is None:
            if self.grad_sample_mode == "bk":
                self._gsm = _opacus_bk.BookKeepingModule(self.model, max_grad_norm=clip_norm)
            elif self.grad_sample_mode == "ghost":
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
        if self._fgc:
            # Ghost clipping and Book-Keeping compute the clip coefficients inside the module.
            self._gsm.max_grad_norm = clip_norm
        self._gsm.enable_hooks()
        return self._gsm

    def _dp_optimizer(self, sgd, sigma: float, clip_norm: float, batch_size: float):
        cls = DPOptimizerFastGradientClipping if self._fgc else DPOptimizer
        return cls(
            sgd,
            noise_multiplier=sigma,
            max_grad_norm=clip_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=self._gen,
            # secure_mode: each draw the sum of 4 Gaussians / 2 (same law), against the
            # floating-point attack on the noise's low bits (arXiv 2112.05307). Opacus'
            # PrivacyEngine(secure_mode=True) would also need torchcsprng, which has no build
            # for our torch; the generator is seeded by the runner (OS entropy when secure).
            secure_mode=self.secure_noise,
        )

    def _dp_backward(self, gsm, opt, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward/backward of one chunk's real rows; returns its loss sum."""
        if self.grad_sample_mode == "bk":
            return gsm.clipped_backward(x, y)  # one backward; p.grad is the clipped sum
        logits = gsm(x)
        if self.grad_sample_mode == "ghost":
            criterion = DPLossFastGradientClipping(
                gsm, opt, nn.CrossEntropyLoss(reduction="mean"), loss_reduction="mean"
            )
            loss = criterion(logits, y)
            loss.backward()  # two passes: per-sample norms, then the clipped sum
            return float(loss.loss_per_sample.detach().sum())
        loss = F.cross_entropy(logits, y)  # mean: Opacus rescales per-sample grads by len(y)
        loss.backward()
        return float(loss.detach()) * len(y)

    def _no_rows(self) -> None:
        """What a chunk of zero rows leaves behind, so an optimizer step adds nothing of it."""
        for p in self.trainable().values():
            if self._fgc:
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)

    # -- the step's hooks -------------------------------------------------------------------
    def _setup(self, step: StepConfig) -> None:
        self._sgd = torch.optim.SGD(self.trainable().values(), lr=0.0, momentum=step.momentum)
        self._dp = None
        if step.private:
            self._grad_sample_module(step.clip_norm)
            self._dp = self._dp_optimizer(
                self._sgd, step.noise_multiplier, step.clip_norm, step.expected_batch_size
            )

    def _accumulate(self, chunk: Batch, private: bool) -> float:
        x, y = tr.real_rows(chunk, self._device)
        if private:
            # Clipped into Opacus' summed_grad by a skipped step, as its BatchMemoryManager
            # does: noise and the update wait for _apply's step.
            loss_sum = self._dp_backward(
                self._grad_sample_module(self._step.clip_norm), self._dp, x, y
            )
            self._dp.signal_skip_step(do_skip=True)
            self._dp.step()
            self._dp.zero_grad(set_to_none=True)
            return loss_sum
        if self._gsm is not None:
            self._gsm.disable_hooks()
        loss = F.cross_entropy(self.model(x), y, reduction="sum")
        loss.backward()  # accumulates into p.grad; _apply divides by the count
        return float(loss.detach())

    def _grad_sums(self) -> list[torch.Tensor]:
        """Opacus' clipped sums (private) or torch's gradients (not); zeros on a rank that had
        no chunk. base's rule, not Opacus' DistributedDPOptimizer (noise on rank 0 before the
        reduction, then / world size, which needs a per-rank B/N): every rank reduces first and
        adds the same draw from its identically seeded generator in _apply."""
        private = self._step.private
        for p in self.trainable().values():
            held = getattr(p, "summed_grad", None) if private else p.grad
            if held is None:
                held = torch.zeros_like(p)
                if private:
                    p.summed_grad = held
                else:
                    p.grad = held
        return [p.summed_grad if private else p.grad for p in self.trainable().values()]

    def _apply(self, noise_std: float | None, divisor: float, lr: float) -> None:
        for group in self._sgd.param_groups:
            group["lr"] = lr
        if noise_std is not None:
            # Opacus' own step over the summed clipped gradients: one noise draw of std
            # sigma*C from this adapter's generator, division by B (expected_batch_size),
            # then the momentum step.
            self._no_rows()
            self._dp.step()
            self._dp.zero_grad(set_to_none=True)
            return
        with torch.no_grad():
            for p in self.trainable().values():
                if p.grad is None:  # an empty batch: momentum still steps
                    p.grad = torch.zeros_like(p)
                p.grad /= divisor
        self._sgd.step()
        self._sgd.zero_grad(set_to_none=True)

    def _clipped_grad_sum(self, batch: Batch, clip_norm: float) -> dict[str, np.ndarray]:
        """The DP step's own machinery with sigma=0 and divisor 1, stopped before the update."""
        gsm = self._grad_sample_module(clip_norm)
        probe = torch.optim.SGD(self.trainable().values(), lr=0.0)
        opt = self._dp_optimizer(probe, 0.0, clip_norm, 1.0)
        opt.zero_grad(set_to_none=True)
        if batch.size:
            self._dp_backward(gsm, opt, *tr.real_rows(batch, self._device))
        else:
            self._no_rows()
        opt.pre_step()  # clip, accumulate, add zero noise, divide by 1: p.grad is the sum
        out = {
            n: p.grad.detach().cpu().numpy().astype(np.float32, copy=True)
            for n, p in self.trainable().items()
        }
        opt.zero_grad(set_to_none=True)
        if self._fgc and self._step is not None and self._step.private:
            gsm.max_grad_norm = self._step.clip_norm
        return out

    def reseed(self, seed: int) -> None:
        self._gen.manual_seed(int(seed))

    # -- checkpoint state -------------------------------------------------------------------
    def _momentum(self) -> dict[str, np.ndarray]:
        """torch's SGD creates a buffer at a parameter's first step: zeros until then."""
        out = {}
        for name, p in self.trainable().items():
            buf = self._sgd.state.get(p, {}).get("momentum_buffer")
            out[name] = (torch.zeros_like(p) if buf is None else buf).detach().cpu().numpy()
        return out

    def _set_momentum(self, momentum: dict[str, np.ndarray]) -> None:
        params = self.trainable()
        for name, buf in tr.tensors_like(momentum, params).items():
            self._sgd.state[params[name]]["momentum_buffer"] = buf

    def _noise_state(self) -> np.ndarray:
        return self._gen.get_state().numpy()

    def _set_noise_state(self, state: np.ndarray) -> None:
        self._gen.set_state(torch.from_numpy(np.asarray(state, np.uint8)))

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

    def versions(self) -> dict[str, str]:
        return {**tr.versions(), "opacus": opacus_version}
