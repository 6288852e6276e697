"""Measure activation memory by counting live tensor storages at the dispatcher.

One instrument for every device: real CPU tensors, meta ("fake") tensors of a full-size model and
CUDA tensors all pass through ``__torch_dispatch__``, so the same bookkeeping measures all three.
A storage is counted when an op returns it for the first time (views and in-place results share
their input's storage and are not counted again) and uncounted when it dies (a weakref callback
on the storage object, which PyTorch keeps alive exactly as long as the storage itself).
Anything that existed before the tracker was entered, weights included, is never counted.

Host placement: storages made inside :func:`host_allocation` or passed to :func:`mark_host` are
never counted by this thread's active trackers (with host == device, on CPU or meta tensors, the
executor's host copies are marked so). A tracker made with ``device=`` counts only storages on
that device (on CUDA: the GPU-resident bytes; pinned host copies and streamed-out weights are on
the CPU).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

class _ThreadState(threading.local):
    """Per thread, like PyTorch's own dispatch-mode stack: a tracker sees only its thread's work."""

    def __init__(self) -> None:
        self.active: list[MemoryTracker] = []
        self.labels: list[str] = []


_state = _ThreadState()


def current_tracker() -> MemoryTracker | None:
    """This thread's innermost active tracker, so the runtime can label units without being handed one."""
    active = _state.active
    return active[-1] if active else None


def current_label() -> str:
    """This thread's innermost unit label ("" outside any unit); other dispatch-mode tools attribute by it."""
    labels = _state.labels
    return labels[-1] if labels else ""


def mark_host(tensor: torch.Tensor) -> torch.Tensor:
    """Never count ``tensor``'s storage in this thread's active trackers (uncounted if it already was);
    returns ``tensor``. For host-placed copies that live on the compute device (host == device)."""
    if _has_storage(tensor):
        for tracker in _state.active:
            tracker._ignore(tensor.untyped_storage())
    return tensor


@contextmanager
def host_allocation() -> Iterator[None]:
    """Storages first seen inside are host memory: this thread's active trackers never count them."""
    for tracker in _state.active:
        tracker._host_depth += 1
    active = list(_state.active)
    try:
        yield
    finally:
        for tracker in active:
            tracker._host_depth -= 1


@contextmanager
def unit_label(name: str) -> Iterator[None]:
    """Attribute what happens inside to unit ``name`` (in this thread's active tracker, if any)."""
    labels = _state.labels
    labels.append(name)
    tracker = current_tracker()
    try:
        if tracker is None:
            yield
        else:
            with tracker.label(name):
                yield
    finally:
        labels.pop()


@dataclass
class UnitMemory:
    """What one unit needed. ``transient_bytes`` is the most it ever added above its entry level."""

    entry_bytes: int = 0
    peak_bytes: int = 0
    transient_bytes: int = 0
    calls: int = 0


@dataclass
class _Frame:
    name: str
    entry: int
    peak: int


class MemoryTracker(TorchDispatchMode):
    """Context manager: ``peak_bytes``, ``current_bytes`` and ``units`` (a per-label breakdown).

    ``peak_breakdown`` says what was live at the peak, by the label that allocated it ("" for
    allocations outside any unit).

    ``label_modules`` maps names to modules whose forward calls should be labelled (used to get a
    per-unit breakdown of the *original* forward); the runtime labels planned units itself.
    On CUDA, ``cuda_peak_allocated_bytes`` is ``torch.cuda.max_memory_allocated`` above the level at
    entry, for cross-checking.
    """

    def __init__(
        self,
        label_modules: dict[str, torch.nn.Module] | None = None,
        record_events: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.label_modules = label_modules
        # Count only storages on this device (None: every storage). ``cuda`` matches every CUDA index.
        self.device = torch.device(device) if device is not None else None
        # (+nbytes, key) for an allocation, (-nbytes, key) for a free: replayed through an
        # allocator model by the profiler (vramplan.planner.allocator).
        self.events: list[tuple[int, int]] | None = [] if record_events else None
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_label: str | None = None
        self.units: dict[str, UnitMemory] = {}
        self.cuda_peak_allocated_bytes: int | None = None
        self.peak_breakdown: dict[str, int] = {}
        self._live: dict[int, tuple[int, weakref.ref, str]] = {}
        self._breakdown_stale = False
        self._stack: list[_Frame] = []
        self._hooks: list = []
        self._cuda_base: int | None = None
        self._ignored: dict[int, weakref.ref] = {}
        self._host_depth = 0
        # Host memory the call allocated (host-placed values' buffers): current and peak, never in peak_bytes.
        self.host_current_bytes = 0
        self.host_peak_bytes = 0

    # -- bookkeeping -------------------------------------------------------------------------
    def _counts(self, storage: torch.UntypedStorage) -> bool:
        if self.device is None:
            return True
        dev = storage.device
        return dev.type == self.device.type and (self.device.index is None or dev.index == self.device.index)

    def _ignore(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._ignored:
            return
        if key in self._live:
            self._free(key)
        self._ignored[key] = weakref.ref(storage, lambda _r, k=key: self._ignored.pop(k, None))

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._live or key in self._ignored:
            return
        if self._host_depth:
            self._ignore(storage)
            self._add_host(storage)
            return
        if not self._counts(storage):
            return
        nbytes = storage.nbytes()
        ref = weakref.ref(storage, lambda _r, k=key: self._free(k))
        label = self._stack[-1].name if self._stack else ""
        self._live[key] = (nbytes, ref, label)
        if self.events is not None:
            self.events.append((nbytes, key))
        self.current_bytes += nbytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_label = label or None
            self._breakdown_stale = True
        for frame in self._stack:
            frame.peak = max(frame.peak, self.current_bytes)

    def _add_host(self, storage: torch.UntypedStorage) -> None:
        """A new host storage (made inside :func:`host_allocation`): counted in ``host_*`` only."""
        nbytes = storage.nbytes()
        self.host_current_bytes += nbytes
        self.host_peak_bytes = max(self.host_peak_bytes, self.host_current_bytes)
        weakref.finalize(storage, self._free_host, nbytes)

    def _free_host(self, nbytes: int) -> None:
        self.host_current_bytes -= nbytes

    def _free(self, key: int) -> None:
        if self._breakdown_stale and self.current_bytes == self.peak_bytes:
            self._snapshot()  # the live set right now is the peak's: record who allocated it
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current_bytes -= entry[0]
            if self.events is not None:
                self.events.append((-entry[0], key))

    def _snapshot(self) -> None:
        breakdown: dict[str, int] = {}
        for nbytes, _ref, label in self._live.values():
            breakdown[label] = breakdown.get(label, 0) + nbytes
        self.peak_breakdown = breakdown
        self._breakdown_stale = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _has_storage(t)}
        for t in tree_flatten(out)[0]:
            if _has_storage(t):
                storage = t.untyped_storage()
                if id(storage) not in inputs:
                    self._add(storage)
        return out

    # -- labels ------------------------------------------------------------------------------
    @contextmanager
    def label(self, name: str) -> Iterator[None]:
        frame = _Frame(name, self.current_bytes, self.current_bytes)
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            self._close(frame)

    def _close(self, frame: _Frame) -> None:
        stats = self.units.setdefault(frame.name, UnitMemory(entry_bytes=frame.entry))
        stats.calls += 1
        stats.peak_bytes = max(stats.peak_bytes, frame.peak)
        stats.transient_bytes = max(stats.transient_bytes, frame.peak - frame.entry)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes
        self.peak_label = None
        self._breakdown_stale = True

    # -- context -----------------------------------------------------------------------------
    def __enter__(self) -> MemoryTracker:
        if self.label_modules:
            for name, module in self.label_modules.items():
                self._hooks.append(module.register_forward_pre_hook(self._pre_hook(name)))
                self._hooks.append(module.register_forward_hook(self._post_hook(), always_call=True))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        _state.active.append(self)
        super().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self._breakdown_stale and self.current_bytes == self.peak_bytes:
            self._snapshot()
        _state.active.remove(self)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._cuda_base is not None:
            torch.cuda.synchronize()
            self.cuda_peak_allocated_bytes = torch.cuda.max_memory_allocated() - self._cuda_base

    def _pre_hook(self, name: str):
        def hook(_module, _args):
            self._stack.append(_Frame(name, self.current_bytes, self.current_bytes))

        return hook

    def _post_hook(self):
        def hook(_module, _args, _out):
            if self._stack:
                self._close(self._stack.pop())

        return hook

    def summary(self, top: int = 10) -> str:
        """A short human-readable table of the largest per-unit peaks."""
        rows = sorted(self.units.items(), key=lambda kv: kv[1].peak_bytes, reverse=True)[:top]
        lines = [f"peak {gib(self.peak_bytes):.3f} GiB at {self.peak_label or '-'}"]
        lines += [
            f"  {name:<60} peak {gib(u.peak_bytes):8.3f} GiB  transient {gib(u.transient_bytes):8.3f} GiB"
            for name, u in rows
        ]
        return "\n".join(lines)


def _has_storage(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


def gib(nbytes: float) -> float:
    return nbytes / 2**30
