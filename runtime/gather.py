"""Gathered tables: a weight read by row lookup (a token embedding) that may stay in host memory.

A unit that looks rows up by ids declares it (``Op.gathers``: the input holding the ids) and calls
:func:`gather_rows`. When the plan streams that unit's block, the weight streamer leaves the table in
(pinned) host memory and marks it (:data:`HOSTED`) instead of copying it in; :func:`gather_rows` then
takes the distinct ids, gathers those rows on the host and copies only them to the device. A lookup
copies values and computes nothing, so the result is ``F.embedding(ids, table)`` exactly.

The device holds the gathered rows (at most ``min(ids, table rows)`` of them: the bound the profiler
prices as the block's ``block_gathered`` bytes) and the index into them. On meta there are no ids to
read, so the bound itself is allocated. Without CUDA the host table is the weight itself and the rows
are still copied, so the memory tracker sees what a GPU would hold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .memory import host_allocation

HOSTED = "_vramplan_hosted_table"  # attribute the streamer sets on a Parameter whose table stays on host


def is_hosted(table: torch.Tensor) -> bool:
    return bool(getattr(table, HOSTED, False))


def set_hosted(table: torch.Tensor, hosted: bool) -> None:
    if hosted:
        setattr(table, HOSTED, True)
    elif hasattr(table, HOSTED):
        delattr(table, HOSTED)


def gathered_bytes(table: torch.Tensor, n_ids: int) -> int:
    """Device bytes of the rows ``n_ids`` ids can select from ``table`` (the distinct ones, at most)."""
    rows = table.shape[0] if table.dim() else 1
    return min(n_ids, rows) * (table.numel() // max(rows, 1)) * table.element_size()


def gather_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, table)`` on ``ids.device``, gathering on the host when ``table`` is hosted."""
    if not is_hosted(table):
        return F.embedding(ids, table)
    device = ids.device
    if device.type == "meta" or table.device.type == "meta":
        rows = torch.empty((min(ids.numel(), table.shape[0]), *table.shape[1:]), dtype=table.dtype, device=device)
        return F.embedding(torch.empty_like(ids), rows)
    unique, index = torch.unique(ids, return_inverse=True)
    pin = device.type == "cuda" and table.is_pinned()
    with host_allocation():
        picked = torch.empty((unique.numel(), *table.shape[1:]), dtype=table.dtype, pin_memory=pin)
        torch.index_select(table.detach(), 0, unique.to(table.device), out=picked)  # streaming: no autograd
    rows = picked.to(device, non_blocking=pin, copy=True)
    return F.embedding(index, rows)
