"""Count FLOPs, memory traffic and kernel launches per unit, for the latency model.

Matmul, convolution and attention FLOPs come from PyTorch's own formulas
(``torch.utils.flop_counter``), plus one for the CPU fused attention kernel, which it does not
know and would count as zero. Every other non-view op is taken as memory-bound: its input and
output bytes are its traffic.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from .memory import current_label

aten = torch.ops.aten
_FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default, aten.detach.default}


def _cpu_flash_flops(query, key, value, *args, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


_EXTRA = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops}


@dataclass
class UnitOps:
    flops: int = 0
    bytes_moved: int = 0
    kernels: int = 0


class OpCounter(TorchDispatchMode):
    """Per unit label: FLOPs, bytes moved by memory-bound ops, and non-view op count."""

    def __init__(self) -> None:
        super().__init__()
        self.units: dict[str, UnitOps] = defaultdict(UnitOps)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func in _FREE:
            return out
        stats = self.units[current_label()]
        stats.kernels += 1
        packet = func._overloadpacket
        if packet in flop_registry:
            stats.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        elif packet in _EXTRA:
            stats.flops += int(_EXTRA[packet](*args, **kwargs))
        else:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            stats.bytes_moved += sum(t.numel() * t.element_size() for t in tensors)
        return out
