"""GroupNorm over an axis that is being sliced: statistics first, then normalise each slice.

A GroupNorm over time (``TemporalResnetBlock``, a motion module, the temporal VAE decoder)
needs per-(sample, group) mean and variance over *all* tokens. Running it per token slice would
use each slice's own statistics and change the result. Instead the moments of every slice are
merged exactly (Chan et al.'s pairwise update) in fp32, and each slice is normalised with the
merged statistics. The result equals the unsliced GroupNorm up to float rounding.
"""

from __future__ import annotations

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
    for piece in pieces:
        x = piece.float()
        n = 1
        for d in reduce_dims:
            n *= x.shape[d]
        var_i, mean_i = torch.var_mean(x, dim=reduce_dims, correction=0)
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
