"""Weight streaming: blocks whose weights live in (pinned) host memory and are copied in around use.

A plan's ``streamed`` blocks (module paths such as ``down_blocks.1`` or ``decoder.up_blocks.3``, the
profiler's :func:`block_of` of their units, or finer ones an adapter declares, such as
``up_blocks.0.resnets.1``: :func:`stream_block_of`) keep their parameters and buffers in host memory. Through
the executor's ``around_segment``, for every segment of a call:

- at its start, every streamed block the segment touches that is not on the device is copied in;
  then the **next** streamed block (the first one used after this segment) is prefetched: on CUDA
  on a copy stream, with an event the compute stream waits on before the block's first use; on
  other devices synchronously;
- after it, every streamed block no later segment of the call touches is released (its device copy
  dropped; the parameter points at the host copy again).

So while a segment runs the device holds the resident weights, the streamed blocks it touches and
the next streamed block. A streamed block whose unit gathers rows of its table (``Op.gathers``, an
embedding) is never copied in: the table stays in host memory and the unit copies only the rows its
ids select (:mod:`.gather`). Weights are swapped through ``tensor.data``: the Parameter objects stay
the model's own. Without CUDA, host == device: the host copy is the weight itself (marked as host
for the memory tracker), and loading still makes a device copy per use, so the memory tracker sees
what the GPU would hold. ``restore()`` puts every weight back on the device it came from.

Streaming does not support autograd (a backward pass would read the released host copies): a call
with grad enabled and a streamed weight that requires grad is refused.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..planner.errors import InvalidPlanError
from .gather import set_hosted
from .memory import current_label, mark_host

log = logging.getLogger(__name__)

PAGEABLE_WARNING = (
    "pinned host memory could not be allocated ({error}); streamed weights use pageable host memory: "
    "transfers are slower and not overlapped with compute (plan with --pageable / plan_for(pinned=False) to price them)"
)


def block_of(unit: str) -> str:
    """The top-level block of a unit, for per-block tables: ``down_blocks.1``, ``decoder.mid_block``,
    ``blocks.7``, ``encoder.block.3`` (numbered DiT and text-encoder layers)."""
    parts = unit.split(".")
    for i, part in enumerate(parts):
        if part in ("down_blocks", "up_blocks") or (
            part in ("blocks", "block", "layers") and parts[i + 1 : i + 2] and parts[i + 1].isdigit()):
            return ".".join(parts[: i + 2])
        if part == "mid_block":
            return ".".join(parts[: i + 1])
    return ".".join(parts[:2]) if len(parts) > 1 and parts[0] in ("decoder", "encoder") else parts[0]


def stream_block_of(unit: str, parts: Sequence[str] = ()) -> str:
    """The streaming block of a unit: its :func:`block_of`, or, when the adapter declares finer
    streaming units (``stream_parts``, e.g. ``("resnets", "attentions", "motion_modules")``), the numbered
    child of that block the unit lies in: ``up_blocks.1.attentions.0`` for
    ``up_blocks.1.attentions.0.transformer_blocks.0``. Always a module path that prefixes the unit's name."""
    block = block_of(unit)
    if parts and unit.startswith(block + "."):
        rest = unit[len(block) + 1 :].split(".")
        if len(rest) >= 2 and rest[0] in parts and rest[1].isdigit():
            return f"{block}.{rest[0]}.{rest[1]}"
    return block


def adapter_block(adapter) -> Callable[[str], str]:
    """``unit -> streaming block`` for the units of ``adapter`` (its ``stream_parts``, if it declares any)."""
    parts = tuple(getattr(adapter, "stream_parts", ()))
    return (lambda unit: stream_block_of(unit, parts)) if parts else block_of


def owning_block(name: str, blocks) -> str | None:
    """The block of ``blocks`` (module paths) that ``name`` lies in: the longest one that is ``name`` or a
    dotted prefix of it; None if none is."""
    best = None
    for b in blocks:
        if (name == b or name.startswith(b + ".")) and (best is None or len(b) > len(best)):
            best = b
    return best


# ---------------------------------------------------------------------------- which blocks may stream
def _weights(module: torch.nn.Module):
    """(path, tensor) of every parameter and buffer, shared ones under each of their names."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from ((n, b) for n, b in module.named_buffers(remove_duplicate=False) if b is not None)


class WeightReaders(TorchDispatchMode):
    """Which units read each of a model's parameters and buffers (by storage), from the unit label
    active at each op: "" for the call's prologue and epilogue, outside any unit."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.readers: dict[int, set[str]] = {}
        # Held, so that the ids stay theirs while we look.
        self._storages = {id(t.untyped_storage()): t.untyped_storage() for _, t in _weights(model)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                key = id(t.untyped_storage())
                if key in self._storages:
                    self.readers.setdefault(key, set()).add(current_label().split(":", 1)[0])
        return func(*args, **kwargs)

    def block_weights(self, units: Sequence[str], block: Callable[[str], str] = block_of) -> dict[str, int]:
        """Per block (``block`` of ``units``: :func:`block_of`, or an adapter's finer
        :func:`stream_block_of`) that is a module of the model: the bytes of its
        parameters and buffers, when each of them is owned by modules inside the block only and read
        by units of that block only (never by the call's prologue or another block's unit). A tensor
        also registered outside the block (a tied embedding's ``shared.weight``) is owned when it is the
        same Parameter object: swapping its ``.data`` moves it under every name. Blocks without weights
        are left out."""
        modules = dict(self.model.named_modules(remove_duplicate=False))
        unit_block = {u: block(u) for u in units}
        owners: dict[int, set[tuple[str, int]]] = {}
        for path, t in _weights(self.model):
            owners.setdefault(id(t.untyped_storage()), set()).add((path, id(t)))
        out: dict[str, int] = {}
        for block in dict.fromkeys(unit_block.values()):
            module = modules.get(block) if block else None
            if module is None:
                continue
            tensors = list({id(t): t for _, t in _weights(module)}.values())
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            if not nbytes:
                continue
            keys = {id(t.untyped_storage()) for t in tensors}
            ids = {id(t) for t in tensors}
            owned = all(path.startswith(block + ".") or tid in ids for key in keys for path, tid in owners.get(key, ()))
            alone = all(unit_block.get(r) == block for key in keys for r in self.readers.get(key, ()))
            if owned and alone:
                out[block] = nbytes
        return out


def streamable_blocks(model: torch.nn.Module, shape, method: str = "forward",
                      top_level: bool = False) -> dict[str, int] | None:
    """:meth:`WeightReaders.block_weights` of ``model`` at ``shape``, traced once on a meta copy (no
    data, nobody's hooks); None when the model cannot be traced so. The blocks are the adapter's streaming
    blocks (finer than top-level ones where it declares ``stream_parts``); ``top_level``: the top-level
    blocks that can stream as well (a plan made from a profile of before the finer blocks still runs)."""
    from .adapters.base import adapter_for
    from .apply import _TORCH_DTYPES, _meta_twin
    from .executor import execute, unit_by_unit

    try:
        twin = _meta_twin(model, _TORCH_DTYPES[shape.dtype])
        adapter = adapter_for(twin, method)  # a VAE's encode or decode adapter
        ops, result = adapter.ops(twin)
        args = adapter.example_inputs(twin, shape, device="meta")
        readers = WeightReaders(twin)
        with torch.no_grad(), readers:
            binding = adapter.bind(twin, *args)
            program = binding.program(ops, result)
            execute(program, unit_by_unit(ops), first_slice_only=True)
        names = [op.name for op in ops]
        fine = readers.block_weights(names, adapter_block(adapter))
        return {**readers.block_weights(names), **fine} if top_level else fine
    except Exception as err:  # noqa: BLE001 - a model that cannot be copied or traced on meta
        log.warning("could not trace which units read which weights (%s: %s); streamed blocks are not checked",
                    type(err).__name__, err)
        return None


# ---------------------------------------------------------------------------- host memory
def _allocate_pinned(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=True)


def host_copy(tensor: torch.Tensor, pinned: bool, on_fallback: Callable[[BaseException], None] | None = None):
    """A host-memory copy of ``tensor`` (pinned when asked; pageable when pinning fails, after calling
    ``on_fallback(error)``); returns (copy, whether it is pinned)."""
    out = None
    if pinned:
        try:
            out = _allocate_pinned(tensor)
        except (RuntimeError, OSError) as err:  # container limits on locked memory, no driver
            if on_fallback is not None:
                on_fallback(err)
            pinned = False
    if out is None:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    out.copy_(tensor)
    return out, pinned


# ---------------------------------------------------------------------------- the streamer
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one storage at one place (``.data`` makes a new object each time)."""
    return a.untyped_storage() is b.untyped_storage() and a.storage_offset() == b.storage_offset()


@dataclass(eq=False)
class _Weight:
    tensor: torch.Tensor  # the model's Parameter or buffer object; its .data is swapped
    host: torch.Tensor
    home: torch.device  # where restore() puts it


@dataclass(eq=False)
class _Block:
    name: str
    weights: list[_Weight] = field(default_factory=list)
    loaded: bool = False
    event: Any = None  # CUDA event of a prefetch the compute stream has not waited on yet

    @property
    def nbytes(self) -> int:
        return sum(w.host.numel() * w.host.element_size() for w in self.weights)


class WeightStreamer:
    """The streamed blocks of one planned model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, blocks: Sequence[str], gathered: Sequence[str] = ()) -> None:
        modules = dict(model.named_modules(remove_duplicate=False))
        # Blocks whose tables a unit gathers rows of (Op.gathers): they stay in host memory, never copied in.
        self.gathered = set(gathered) & set(blocks)
        self.model = model
        self.blocks: dict[str, _Block] = {}
        seen: set[int] = set()
        for name in blocks:
            block = _Block(name)
            for _, t in _weights(modules[name]):
                if id(t) not in seen:
                    seen.add(id(t))
                    block.weights.append(_Weight(t, t.data, t.device))
            self.blocks[name] = block
        self.pinned = True  # False once pinning failed (pageable host memory)
        self.fallback_error: str | None = None
        self._copy_stream = None
        self._offloaded = False

    # -- host placement ---------------------------------------------------------------------------
    def _on_fallback(self, err: BaseException) -> None:
        if self.pinned:
            self.pinned = False
            self.fallback_error = f"{type(err).__name__}: {err}"
            warnings.warn(PAGEABLE_WARNING.format(error=self.fallback_error), RuntimeWarning, stacklevel=3)

    def offload(self, compute: torch.device | None = None) -> None:
        """Put every streamed weight in host memory, releasing any device copy: a weight on CUDA gets a
        pinned host copy (pageable with one warning when pinning fails); a weight already off CUDA is
        its own host copy (host == device), marked as host for the memory tracker. A weight someone
        moved since (``model.to(device)``) is taken back to host the same way. ``compute``: the call's
        device (a CPU weight under a CUDA call is pinned)."""
        cuda_call = compute is not None and compute.type == "cuda"
        for block in self.blocks.values():
            if block.loaded:
                continue
            for w in block.weights:
                current = w.tensor.data
                hosted = self._offloaded and _same(current, w.host)
                if not hosted and not (self._offloaded and current.device == w.host.device):
                    w.home = current.device  # moved since (model.to(device)); a dtype change keeps the home
                # pinned for a CUDA call: async copies in, and a CPU weight pinned once (not per call)
                pin = self.pinned and (current.device.type == "cuda" or (
                    cuda_call and current.device.type == "cpu" and not current.is_pinned()))
                if hosted and not pin:
                    continue
                if current.device.type == "cuda" or pin:
                    w.host, _ = host_copy(current, pin, self._on_fallback)
                else:
                    w.host = current
                mark_host(w.host)
                w.tensor.data = w.host
                set_hosted(w.tensor, block.name in self.gathered)
        self._offloaded = True

    def restore(self) -> None:
        """Every weight back where it was before streaming (its home device), whatever happened."""
        for block in self.blocks.values():
            block.loaded, block.event = False, None
            for w in block.weights:
                w.tensor.data = w.host if w.host.device == w.home else w.host.to(w.home)
                w.host = w.tensor.data
                set_hosted(w.tensor, False)
        self._offloaded = False

    # -- a call -----------------------------------------------------------------------------------
    def check_grad(self) -> None:
        if torch.is_grad_enabled() and any(w.tensor.requires_grad for b in self.blocks.values() for w in b.weights):
            raise InvalidPlanError(
                f"the plan streams the weights of {', '.join(self.blocks)}, which autograd cannot follow (backward "
                f"would read the released copies). Call under torch.no_grad() or torch.inference_mode(), or use a "
                f"plan without streamed blocks for training."
            )

    @contextlib.contextmanager
    def call(self, segments: Sequence, device: torch.device) -> Iterator[Callable]:
        """Around one call of the program: yields ``around(segment)`` for the executor. Every block
        loaded during the call is released at its end, also when a segment raises."""
        self.check_grad()
        self.offload(device)
        copied = set(self.blocks) - self.gathered  # a gathered table's rows are copied by its unit
        # a unit's block: the streamed module its name lies in (its top-level block, or a finer one
        # an adapter declares, stream_block_of)
        owner = [[owning_block(op.name, self.blocks) for op in seg.ops] for seg in segments]
        touched = [set(names) & copied for names in owner]
        index = {id(seg): i for i, seg in enumerate(segments)}
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for i, names in enumerate(touched):
            for name in names:
                first.setdefault(name, i)
                last[name] = i
        # blocks in the order of their first unit (as the planner's block order): a segment may touch
        # several, and the next one prefetched is the first used after the segment
        order = [b for b in dict.fromkeys(b for names in owner for b in names) if b in first]
        rank = {b: n for n, b in enumerate(order)}
        cuda = device.type == "cuda"
        if cuda and self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(device)

        @contextlib.contextmanager
        def around(seg):
            i = index[id(seg)]
            for name in sorted(touched[i], key=rank.__getitem__):
                self._load(self.blocks[name], device, prefetch=False)
            upcoming = next((n for n in order if first[n] > i), None)  # the next streamed block used
            if upcoming is not None and not self.blocks[upcoming].loaded:
                self._load(self.blocks[upcoming], device, prefetch=cuda)
            yield
            for name, block in self.blocks.items():
                if block.loaded and last.get(name, -1) <= i:
                    self._release(block)

        try:
            yield around
        finally:
            if cuda and any(b.event is not None for b in self.blocks.values()):
                self._copy_stream.synchronize()
            for block in self.blocks.values():
                if block.loaded:
                    self._release(block)

    def _load(self, block: _Block, device: torch.device, prefetch: bool) -> None:
        if block.loaded:
            if block.event is not None and not prefetch:  # first use of a prefetched block
                compute = torch.cuda.current_stream(device)
                compute.wait_event(block.event)
                for w in block.weights:
                    w.tensor.data.record_stream(compute)  # made on the copy stream, freed after compute's use
                block.event = None
            return
        if prefetch:
            with torch.cuda.stream(self._copy_stream):
                self._copy_in(block, device)
                block.event = torch.cuda.Event()
                block.event.record(self._copy_stream)
        else:
            self._copy_in(block, device)
        block.loaded = True

    @staticmethod
    def _copy_in(block: _Block, device: torch.device) -> None:
        for w in block.weights:
            w.tensor.data = w.host.to(device, non_blocking=w.host.is_pinned(), copy=True)

    @staticmethod
    def _release(block: _Block) -> None:
        for w in block.weights:
            w.tensor.data = w.host
        block.loaded, block.event = False, None

    def describe(self) -> str:
        total = sum(b.nbytes for b in self.blocks.values())
        return f"{len(self.blocks)} streamed blocks ({total / 2**20:.1f} MiB)"
