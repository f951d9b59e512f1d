"""Book-Keeping DP-SGD in torch: per-example norms and the clipped sum from one backward pass.

Bu et al. 2022, "Differentially private optimization on large model at small cost" (fastDP's
BK with mixed ghost clipping); the ghost norm is Li et al. 2021's. Part of the reference
backend (option mode: bk) and, as norm samplers in Opacus' hooks, of the opacus backend's
grad_sample_mode bk (_opacus_bk); plain torch, no other framework.

One forward records each parameterized layer's input a; one backward, `autograd.grad` of the
summed loss w.r.t. those layers' outputs only, gives every example's output gradient g (no
weight gradient is computed: none is asked for). Examples are independent (GroupNorm, no batch
statistics), so example i's weight gradient of a layer is a function of (a_i, g_i) alone:
- Conv2d, with A_i = unfold(a_i) (D x T: D = Cin*kh*kw inputs per output position, T output
  positions) and G_i = g_i (Cout x T), grad_i = G_i A_i^T. Its squared norm is taken as the
  ghost norm sum_{t,t'} (A_i^T A_i)_{tt'} (G_i^T G_i)_{tt'} when 2 T^2 <= p (p = Cout*D, the
  layer's parameter count; fastDP's rule: two T x T Gram matrices against one Cout x D
  gradient), else from the per-example gradient itself (a grouped convolution backward on
  large CPU maps, a batched matmul otherwise), kept for the sum.
- Linear on (n, features): T = 1, the ghost norm ||a_i||^2 ||g_i||^2; bias g_i.
- GroupNorm: scale sum_hw xhat_i * g_i, offset sum_hw g_i, per example (n x C: cheap).
The clipped sum then reuses the same a and g: sum_i c_i grad_i is the layer's ordinary weight
gradient with g_i scaled by c_i (one convolution backward, or (c g)^T a), or sum_i c_i grad_i
over the kept per-example gradients. No second backward pass through the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYERS = (nn.Conv2d, nn.Linear, nn.GroupNorm)


def use_ghost_norm(positions: int, params: int) -> bool:
    """fastDP's per-layer rule: the ghost norm when 2 T^2 <= p, the per-example gradient else."""
    return 2 * positions * positions <= params


def tracked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers holding trainable parameters; one-line error for any other such module."""
    layers = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not isinstance(module, LAYERS):
            raise ValueError(
                f"book-keeping clipping: layer {name!r} is a {type(module).__name__}; expected "
                "only Conv2d, Linear and GroupNorm to hold trainable parameters"
            )
        layers.append((name, module))
    return layers


# One layer's share: ({param name: squared per-example norms (n,)}, weights (n,) -> {param name:
# sum}). Per parameter, as Opacus' norm samplers return them (the opacus adapter's mode bk).
Share = tuple[dict[str, torch.Tensor], Callable[[torch.Tensor], dict[str, torch.Tensor]]]


# On CPU, from these sizes on, example i's conv weight gradient as one grouped convolution
# backward (the batch as groups: oneDNN's kernel, no im2col copy) beats unfold + bmm; measured
# for Opacus' sampler on this project's 2-core CPU (_opacus_fast: 3x at 32x32 outputs).
GROUPED_MIN_POSITIONS, GROUPED_MIN_PATCH = 256, 64


def grouped_wins(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether `grouped_weight_grads` beats unfold + bmm here (inputs per position: Cin /
    groups x kh x kw)."""
    positions = g.shape[2] * g.shape[3]
    return (
        a.device.type == "cpu"
        and positions >= GROUPED_MIN_POSITIONS
        and m.weight[0].numel() >= GROUPED_MIN_PATCH
    )


def _unfold(m: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    return F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)


def grouped_weight_grads(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's weight gradient, (n, *m.weight.shape), as one convolution backward with
    n copies of the layer, one group (of m.groups) per example (also _opacus_fast's sampler)."""
    n, w = len(a), m.weight
    # The kernel's values are never read for a weight gradient, only its shape.
    shape_only = w.new_empty((n * w.shape[0], *w.shape[1:]))
    return torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), shape_only, None,
        m.stride, m.padding, m.dilation, False, [0, 0], n * m.groups, [False, True, False],
    )[1].view(n, *w.shape)  # fmt: skip


def _per_example_conv(m, a, g, cols, grads) -> torch.Tensor:
    """Each example's weight gradient, (n, Cout, Cin, kh, kw)."""
    if cols is not None:
        return torch.bmm(grads, cols.transpose(1, 2)).view(len(a), *m.weight.shape)
    return grouped_weight_grads(m, a, g)


def _conv(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> Share:
    if m.groups != 1 or isinstance(m.padding, str) or m.padding_mode != "zeros":
        raise ValueError(
            f"book-keeping clipping: {m} is grouped or not zero-padded; expected groups=1 and "
            "numeric zero padding"
        )
    out: dict[str, Callable] = {}
    sq: dict[str, torch.Tensor] = {}
    if m.weight.requires_grad:
        grads = g.flatten(2)  # (n, Cout, T)
        ghost = use_ghost_norm(grads.shape[2], m.weight.numel())
        cols = None if grouped_wins(m, a, g) and not ghost else _unfold(m, a)  # (n, D, T)
        if ghost:
            gram_a = torch.bmm(cols.transpose(1, 2), cols)
            gram_g = torch.bmm(grads.transpose(1, 2), grads)
            sq["weight"] = (gram_a * gram_g).sum((1, 2))

            def weight(c: torch.Tensor) -> torch.Tensor:
                # The batch weight gradient of the layer with example i's output gradient scaled
                # by c_i: sum_i c_i grad_i in one convolution backward.
                scaled = g * c.view(-1, 1, 1, 1)
                return torch.ops.aten.convolution_backward(
                    scaled, a, m.weight, None, m.stride, m.padding, m.dilation,
                    False, [0, 0], 1, [False, True, False],
                )[1]  # fmt: skip
        else:
            per_example = _per_example_conv(m, a, g, cols, grads)
            sq["weight"] = per_example.pow(2).flatten(1).sum(1)

            def weight(c: torch.Tensor) -> torch.Tensor:
                return torch.tensordot(c, per_example, 1).view_as(m.weight)

        out["weight"] = weight
    if m.bias is not None and m.bias.requires_grad:
        bias = g.sum((2, 3))
        sq["bias"] = bias.pow(2).sum(1)
        out["bias"] = lambda c: c @ bias
    return sq, lambda c: {k: f(c) for k, f in out.items()}


def _linear(m: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> Share:
    if a.dim() != 2:
        raise ValueError(f"book-keeping clipping: Linear input {tuple(a.shape)}; expected (n, in)")
    out: dict[str, Callable] = {}
    sq: dict[str, torch.Tensor] = {}
    if m.weight.requires_grad:  # T = 1: the ghost norm is the product of the two norms
        sq["weight"] = a.pow(2).sum(1) * g.pow(2).sum(1)
        out["weight"] = lambda c: (g * c[:, None]).T @ a
    if m.bias is not None and m.bias.requires_grad:
        sq["bias"] = g.pow(2).sum(1)
        out["bias"] = lambda c: c @ g
    return sq, lambda c: {k: f(c) for k, f in out.items()}


def _group_norm(m: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor) -> Share:
    per_example = {}
    if m.weight.requires_grad:
        xhat = F.group_norm(a, m.num_groups, eps=m.eps)  # the input before the affine map
        per_example["weight"] = (xhat * g).flatten(2).sum(2)
    if m.bias is not None and m.bias.requires_grad:
        per_example["bias"] = g.flatten(2).sum(2)
    sq = {k: v.pow(2).sum(1) for k, v in per_example.items()}
    return sq, lambda c: {k: c @ v for k, v in per_example.items()}


SHARES = {nn.Conv2d: _conv, nn.Linear: _linear, nn.GroupNorm: _group_norm}


def share(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> Share:
    """The Share of layer m from its input a and output gradient g (no autograd graph)."""
    with torch.no_grad():
        return SHARES[next(k for k in SHARES if isinstance(m, k))](m, a, g)


@dataclass
class Book:
    """One forward and backward's per-example losses, squared gradient norms and the layers'
    weighted sums."""

    losses: torch.Tensor  # (n,)
    sq_norms: torch.Tensor  # (n,), all trainable parameters together
    shares: list[tuple[str, Callable]]

    def weighted_sum(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """sum_i weights_i * grad_i by canonical parameter name."""
        with torch.no_grad():
            return {
                f"{layer}.{k}" if layer else k: v
                for layer, weighted in self.shares
                for k, v in weighted(weights).items()
            }


def forward_backward(
    model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Forward x through `model` (which runs `layers`), backward once to the layers' outputs:
    the per-example losses (detached), each layer's input and each layer's output gradient.
    Whatever else hooks the layers (Opacus' hooks, in the opacus adapter's mode bk) sees the
    same backward, which forms no weight gradient."""
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keeper(name: str):
        def keep(module, inputs, output):
            if name in records:
                raise ValueError(f"book-keeping clipping: layer {name!r} runs twice in forward")
            records[name] = (inputs[0].detach(), output)

        return keep

    handles = [m.register_forward_hook(keeper(name)) for name, m in layers]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    losses = F.cross_entropy(logits, y, reduction="none")
    # The summed loss' gradient w.r.t. each layer's output is every example's own output gradient.
    grads = torch.autograd.grad(losses.sum(), [records[name][1] for name, _ in layers])
    return losses.detach(), [records[name][0] for name, _ in layers], list(grads)


def book_keeping(
    model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, y: torch.Tensor
) -> Book:
    """Forward x, backward once to the layers' outputs; the Book of (x, y)."""
    losses, inputs, grads = forward_backward(model, layers, x, y)
    sq = torch.zeros(len(x), device=x.device, dtype=losses.dtype)
    shares = []
    for (name, m), a, g in zip(layers, inputs, grads, strict=True):
        layer_sq, weighted = share(m, a, g)
        for v in layer_sq.values():
            sq = sq + v
        shares.append((name, weighted))
    return Book(losses, sq, shares)
