"""Book-Keeping in Opacus 1.6's fast-gradient-clipping machinery: the opacus adapter's
grad_sample_mode "bk". Opacus is imported here and in opacus.py only.

Opacus' part (GradSampleModuleFastGradientClipping, as its mode ghost uses it): forward hooks
keep each layer's input (`activations`); full backward hooks hand the layer's output gradient
(`backprops`) to the norm sampler of the layer's type and store the per-parameter norms it
returns (`p._norm_sample`); `get_clipping_coef()` makes them C / (||g_i|| + 1e-6), clamped at 1.
DPOptimizerFastGradientClipping then sums p.grad over a logical batch's chunks, adds the noise,
divides by B and steps (the adapter's code, shared with mode ghost).

dpscale's part, where Opacus has nothing:
- the norm samplers: _bookkeeping_torch's per-layer share (Conv2d: ghost norm or per-example
  gradient by fastDP's rule; Linear; GroupNorm), in a NORM_SAMPLERS table of this subclass's
  own: Opacus' `register_norm_sampler` writes the table every fast-gradient-clipping module of
  the process reads, which would change mode ghost (Opacus' Linear sampler, per-sample
  gradients for convs) in a process that also runs it;
- the backward: one `autograd.grad` of the summed loss w.r.t. the layers' outputs
  (_bookkeeping_torch.forward_backward), not `loss.backward()`, so autograd forms no batch
  weight gradient; Opacus' hooks fire on it as on any backward (a layer's input gradient is on
  the way to the earlier layers' outputs; the stem's hook fires on its output's);
- the clipped sum: each share weighted by Opacus' coefficients, stored as p.grad, in place of
  the second backward of the coefficient-weighted loss that Opacus' ghost clipping runs.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from torch import nn

from dpscale.backends import _bookkeeping_torch as bk


def norm_sampler(
    module: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus' norm-sampler signature: per-example gradient norms by parameter. The share's
    weighted sum waits on the module until `clipped_backward` has the coefficients."""
    sq, weighted = bk.share(module, activations[0], backprops)
    module.bk_weighted_sum = weighted
    return {getattr(module, k): v.sqrt() for k, v in sq.items()}


class BookKeepingModule(GradSampleModuleFastGradientClipping):
    """Opacus' fast-gradient-clipping module with Book-Keeping norm samplers on every layer."""

    NORM_SAMPLERS = dict.fromkeys(bk.LAYERS, norm_sampler)

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        layers = bk.tracked_layers(model)  # a one-line error for any other trainable layer
        # Opacus looks norm samplers up by exact type: a subclass would miss its share.
        odd = [f"{n} ({type(m).__name__})" for n, m in layers if type(m) not in bk.LAYERS]
        if odd:
            raise ValueError(
                f"opacus mode bk: layers {odd[:3]}; expected exact Conv2d, Linear, GroupNorm"
            )
        # Summed loss: the backprops are each example's own output gradients, unscaled.
        super().__init__(model, batch_first=True, loss_reduction="sum", max_grad_norm=max_grad_norm)
        self.bk_layers = layers

    def clipped_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One chunk: forward, one backward; p.grad = sum_i c_i grad_i with Opacus' clip
        coefficients c; returns the chunk's loss sum."""
        losses, _, _ = bk.forward_backward(self, self.bk_layers, x, y)
        coef = self.get_clipping_coef()
        with torch.no_grad():
            for _, m in self.bk_layers:
                for k, v in vars(m).pop("bk_weighted_sum")(coef).items():
                    getattr(m, k).grad = v
        return float(losses.sum())
