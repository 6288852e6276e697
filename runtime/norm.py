"""GroupNorm over an axis that is being sliced: statistics first, then normalise each slice.

A GroupNorm over time (``TemporalResnetBlock``, a motion module, the temporal VAE decoder)
needs per-(sample, group) mean and variance over *all* tokens. Running it per token slice would
use each slice's own statistics and change the result. Instead the moments of every slice are
merged exactly (Chan et al.'s pairwise update) in fp32, and each slice is normalised with the
merged statistics. The result equals the unsliced GroupNorm up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def merged_moments(
    pieces: Iterable[torch.Tensor], reduce_dims: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance over ``reduce_dims`` of the concatenation of ``pieces``.

    Every piece must have the same shape outside ``reduce_dims``; they may differ in size along
    them (uneven slices).
    """
    count = 0
    mean = m2 = None
    pieces = iter(pieces)
    ahead = [p for p in (next(pieces, None), next(pieces, None)) if p is not None]
    whole = len(ahead) == 1  # one piece: the whole value (an unsliced unit)
    ahead.reverse()

    def stream():  # the looked-ahead pieces are let go as they are used
        while ahead:
            yield ahead.pop()
        yield from pieces

    for piece in stream():
        x = piece.float()
        # A recomputed piece (a recompute pass) is not held while the next one is made: the pass holds
        # one slice's statistics input (``x``) and the cone's slice, as the cost model prices it.
        del piece
        n = 1
        for d in reduce_dims:
            n *= x.shape[d]
        var_i, mean_i = _var_mean(x, reduce_dims, whole)
        if mean is None:
            count, mean, m2 = n, mean_i, var_i * n
            continue
        total = count + n
        delta = mean_i - mean
        mean = mean + delta * (n / total)
        m2 = m2 + var_i * n + delta.square() * (count * n / total)
        count = total
    if mean is None:
        raise ValueError("merged_moments needs at least one piece")
    return mean, m2 / count


def _var_mean(x: torch.Tensor, dims: tuple[int, ...], whole: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased variance and mean over ``dims``. For a ``whole``, contiguous value on the CPU (an unsliced
    unit) through PyTorch's batch-norm statistics kernel (vectorised; ``torch.var_mean`` over several dims
    is about 4x slower there, which made a planned UNet call slower than the stock one), with grad or
    without alike. Slices keep ``torch.var_mean``, whose result does not depend on a slice's strides (a
    view of the full value or a recomputed piece): the recompute pass stays bitwise the split plan's."""
    dims = tuple(sorted(d % x.dim() for d in dims))
    if whole and x.device.type == "cpu" and x.is_contiguous() and _fast_layout(x, dims):
        return _BatchNormStats.apply(x, dims)
    return torch.var_mean(x, dim=dims, correction=0)


def _fast_layout(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    kept = [d for d in range(x.dim()) if d not in dims]
    return bool(kept) and (kept == list(range(len(kept))) or kept == [0, 2])


class _BatchNormStats(torch.autograd.Function):
    """``var_mean`` over ``dims`` (kept dims leading, or dims 0 and 2) via ``batch_norm_update_stats``,
    with the gradient of the biased variance and the mean."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dims: tuple[int, ...]):
        kept = [d for d in range(x.dim()) if d not in dims]
        shape = [x.shape[d] for d in kept]
        if kept == [0, 2]:  # [B, *, C, ...]: channels at dim 1 of each sample
            stats = [torch.batch_norm_update_stats(x[i], None, None, 0.0) for i in range(x.shape[0])]
            mean, var = torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats])
        else:  # leading kept dims: one row of channels
            mean, var = torch.batch_norm_update_stats(x.reshape(1, math.prod(shape), -1), None, None, 0.0)
            mean, var = mean.reshape(shape), var.reshape(shape)
        ctx.dims = dims
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var, grad_mean):
        x, mean = ctx.saved_tensors
        n = math.prod(x.shape[d] for d in ctx.dims)
        view = [1 if d in ctx.dims else x.shape[d] for d in range(x.dim())]
        grad = torch.zeros_like(x)
        if grad_mean is not None:
            grad = grad + grad_mean.reshape(view) / n
        if grad_var is not None:
            grad = grad + grad_var.reshape(view) * (x - mean.reshape(view)) * (2.0 / n)
        return grad, None


def normalize_groups(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    num_groups: int,
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """GroupNorm of ``x`` (``[B, C, *rest]``) with given per-(B, group) ``mean``/``var``.

    Computed as PyTorch's own GroupNorm kernels do: per (sample, channel) ``scale = rstd * weight``
    and ``shift = bias - mean * scale`` in fp32, then one fused ``x * scale + shift`` pass.
    """
    b, c = x.shape[:2]
    rstd = torch.rsqrt(var + eps)  # [B, G]
    scale = rstd.repeat_interleave(c // num_groups, dim=1)  # [B, C]
    shift = -mean.repeat_interleave(c // num_groups, dim=1) * scale
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float() + bias.float()
    shape = (b, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)).to(x.dtype)
