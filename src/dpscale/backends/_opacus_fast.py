"""Two speed-ups of Opacus 1.6's per-sample gradients: the same numbers, less work on CPU.

Opacus is imported here only (a part of the opacus adapter). `install(True)` puts both in place,
`install(False)` restores Opacus' own; the adapter's option `fast_samplers` (default true)
chooses, so the benchmark can time stock Opacus beside them in one run.

- Conv2d per-sample weight gradients on CPU, for outputs of at least MIN_POSITIONS positions
  and at least MIN_PATCH inputs per position (Cin / groups x kh x kw): one grouped convolution
  backward (the batch as groups, oneDNN's weight-gradient kernel) instead of Opacus' unfold +
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

MIN_POSITIONS = 256  # output H x W from which the grouped backward wins (see above)
MIN_PATCH = 64  # Cin / groups x kh x kw below which it loses (the RGB stem: 27)

_opacus_store = gsm_module.create_or_accumulate_grad_sample


def grouped_conv_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a Conv2d: Opacus' grad-sampler signature and result."""
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    positions = backprops.shape[-2] * backprops.shape[-1]
    if (
        n == 0
        or x.device.type != "cpu"
        or positions < MIN_POSITIONS
        or layer.weight[0].numel() < MIN_PATCH
        or isinstance(layer.padding, str)
        or layer.padding_mode != "zeros"
    ):
        return compute_conv_grad_sample(layer, activations, backprops)
    out = {}
    if layer.weight.requires_grad:
        w = layer.weight
        # The kernel's values are never read for a weight gradient, only its shape: n copies of
        # the layer, one group per example.
        shape_only = w.new_empty((n * w.shape[0], *w.shape[1:]))
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, n * backprops.shape[1], *backprops.shape[2:]),
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            shape_only,
            None,
            layer.stride,
            layer.padding,
            layer.dilation,
            False,
            [0, 0],
            n * layer.groups,
            [False, True, False],
        )
        out[w] = grad_w.view(n, *w.shape)
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
