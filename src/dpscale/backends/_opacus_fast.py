"""Two speed-ups of Opacus 1.6's per-sample gradients: the same numbers, less work on CPU.

Opacus is imported here only (a part of the opacus adapter). `install(True)` puts both in place,
`install(False)` restores Opacus' own; the adapter's option `fast_samplers` (default true)
chooses, so the benchmark can time stock Opacus beside them in one run.

- Conv2d per-sample weight gradients on CPU, for outputs of at least 256 positions and at
  least 64 inputs per position (Cin / groups x kh x kw): one grouped convolution backward (the
  batch as groups, oneDNN's weight-gradient kernel; _bookkeeping_torch's grouped_wins and
  grouped_weight_grads, which its per-example convs use too) instead of Opacus' unfold +
  einsum, whose im2col copy dominates on large feature maps. On this project's 2-core CPU,
  ResNet-18 width 16, batch 64 (side by side, one process): 3x faster at 32x32 outputs, 1.5x
  at 16x16, even at 8x8, 2.5x slower at 4x4 and 2x slower for the RGB stem (27 inputs per
  position); so those, other devices, string paddings and empty batches keep Opacus' sampler.
- Storing them: Opacus copies every layer's fresh per-sample gradient into a zero-filled buffer
  of the module's max batch length (so RNNs and tied weights can accumulate into it), a fill
  and a copy of B x parameters floats per step. A gradient that is already full-length is kept
  as is (nothing writes into it afterwards); a second call for the same parameter
  (accumulation) copies it and then takes Opacus' path.
"""

from __future__ import annotations

import opacus.grad_sample.grad_sample_module as gsm_module
import opacus.grad_sample.grad_sample_module_fast_gradient_clipping as fgc_module
import torch
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.grad_sample.utils import register_grad_sampler
from torch import nn

from dpscale.backends import _bookkeeping_torch as bk

_opacus_store = gsm_module.create_or_accumulate_grad_sample


def grouped_conv_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d: Opacus' grad-sampler signature and result."""
    x = activations[0].to(backprops.dtype)
    if (
        x.shape[0] == 0
        or not bk.grouped_wins(layer, x, backprops)
        or isinstance(layer.padding, str)
        or layer.padding_mode != "zeros"
    ):
        return compute_conv_grad_sample(layer, activations, backprops)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = bk.grouped_weight_grads(layer, x, backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


def store_grad_sample(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int):
    """Opacus' create_or_accumulate_grad_sample without the copy where none is needed."""
    if not param.requires_grad:
        return
    current = getattr(param, "_current_grad_sample", None)
    if current is None and grad_sample.shape[0] == max_batch_len:
        param._current_grad_sample = grad_sample  # read, never written in place, from here on
        return
    if current is not None:
        # Accumulation (tied weights, recurrent layers): Opacus adds in place, and what we kept
        # may be a sampler's view of its inputs, so it adds into a copy of its own.
        param._current_grad_sample = current.clone()
    _opacus_store(param=param, grad_sample=grad_sample, max_batch_len=max_batch_len)


def install(enabled: bool) -> None:
    """Put the fast paths in place (True) or Opacus' own back (False); process-wide."""
    register_grad_sampler(nn.Conv2d)(
        grouped_conv_grad_sample if enabled else compute_conv_grad_sample
    )
    store = store_grad_sample if enabled else _opacus_store
    gsm_module.create_or_accumulate_grad_sample = store
    fgc_module.create_or_accumulate_grad_sample = store
