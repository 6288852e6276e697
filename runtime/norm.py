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
    """GroupNorm of ``x`` (``[B, C, *rest]``) with given per-(B, group) ``mean``/``var``."""
    b, c = x.shape[:2]
    rest = x.shape[2:]
    grouped = x.float().reshape(b, num_groups, c // num_groups, *rest)
    shape = (b, num_groups) + (1,) * (grouped.dim() - 2)
    y = (grouped - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    y = y.reshape(b, c, *rest)
    if weight is not None:
        affine = (1, c) + (1,) * len(rest)
        y = y * weight.float().reshape(affine) + bias.float().reshape(affine)
    return y.to(x.dtype)
