"""The memory tracker: exact counting on toy ops, and the same numbers on CPU and meta tensors."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from tiny import svd_inputs
from vramplan.runtime import (
    MemoryTracker,
    apply_plan,
    attention_kernel,
    empty_model,
    list_units,
    sample_shape,
    uniform_plan,
)
from vramplan.runtime.memory import current_label, current_tracker, unit_label


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_counts_new_storages_once_and_frees_them(device):
    x = torch.empty(1000, device=device)  # made before: not counted
    with MemoryTracker() as tracker:
        y = x * 2  # +4000
        view = y.view(10, 100)  # a view: no new storage
        y.add_(1)  # in place: no new storage
        z = torch.relu(view)  # +4000
        del y
        assert tracker.current_bytes == 8000  # the view keeps y's storage alive
        del view
        assert tracker.current_bytes == 4000
        w = z + 1  # +4000 -> 8000 live again
        del z, w
    assert tracker.peak_bytes == 8000
    assert tracker.current_bytes == 0


def test_weights_and_inputs_are_not_counted():
    layer = torch.nn.Linear(256, 256)
    x = torch.randn(4, 256)
    with MemoryTracker() as tracker, torch.no_grad():
        out = layer(x)
    assert tracker.peak_bytes == out.numel() * 4


def test_labels_attribute_transient_above_entry():
    x = torch.randn(100)
    with MemoryTracker() as tracker:
        keep = x + 1  # 400 live at entry
        with tracker.label("unit"):
            tmp = x * 2  # +400
            out = tmp + 1  # +400
            del tmp
    unit = tracker.units["unit"]
    assert (unit.entry_bytes, unit.peak_bytes, unit.transient_bytes) == (400, 1200, 800)
    assert tracker.peak_label == "unit"
    assert tracker.peak_breakdown == {"": 400, "unit": 800}
    del keep, out


def test_labels_and_trackers_are_per_thread():
    """A tracker in one thread sees neither the labels nor the allocations of another thread."""
    inside, done = threading.Barrier(2, timeout=30), threading.Event()
    seen = {}

    def other():
        with unit_label("other-thread"):
            inside.wait()
            seen["label"], seen["tracker"] = current_label(), current_tracker()
            seen["tensor"] = torch.ones(1000) * 2
            done.wait(30)

    thread = threading.Thread(target=other)
    x = torch.randn(100)
    with MemoryTracker() as tracker:
        thread.start()
        inside.wait()
        assert current_label() == "" and current_tracker() is tracker
        with unit_label("mine"):
            assert current_label() == "mine"
            y = x * 2
        done.set()
        thread.join()
    assert seen["label"] == "other-thread" and seen["tracker"] is None
    assert set(tracker.units) == {"mine"}
    assert tracker.peak_bytes == y.numel() * 4  # the other thread's 4000 bytes are not counted


@pytest.mark.parametrize("k", [1, 3])
def test_same_peak_on_cpu_and_meta_tensors(tiny_unet, k):
    """Real CPU tensors and meta tensors of the same tiny model give identical numbers."""
    inputs = svd_inputs(tiny_unet, batch=2, frames=5, height=9, width=7)
    meta = empty_model(type(tiny_unet), dict(tiny_unet.config), torch.float32)
    meta_inputs = [t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs]
    plan = uniform_plan(tiny_unet, k, sample_shape(inputs[0]))
    peaks = []
    for model, args in [(tiny_unet, inputs), (meta, meta_inputs)]:
        with apply_plan(model, plan), attention_kernel("cpu_flash"), MemoryTracker() as tracker, torch.no_grad():
            model(*args)
        peaks.append((tracker.peak_bytes, {n: u.transient_bytes for n, u in tracker.units.items()}))
    assert peaks[0] == peaks[1]
    assert peaks[0][0] > 0


def test_original_forward_breakdown_by_unit_modules(tiny_unet):
    inputs = svd_inputs(tiny_unet, batch=1, frames=3, height=8, width=8)
    modules = dict(tiny_unet.named_modules())
    label = {u.name: modules[u.name] for u in list_units(tiny_unet) if u.name in modules}
    with MemoryTracker(label_modules=label) as tracker, torch.no_grad():
        tiny_unet(*inputs)
    assert "conv_in" in tracker.units and "down_blocks.0.downsamplers.0" in tracker.units
    assert all(u.calls == 1 for u in tracker.units.values())
    assert not tiny_unet.conv_in._forward_pre_hooks  # hooks removed on exit


def test_full_size_svd_original_peak_with_fused_attention():
    """Full-size SVD UNet, 2x14x576x1024 fp16, on meta tensors: ~4.3 GiB with fused attention."""
    from diffusers import UNetSpatioTemporalConditionModel

    config = json.loads((Path(__file__).parents[1] / "profiles" / "models" / "svd_unet.json").read_text())
    unet = empty_model(UNetSpatioTemporalConditionModel, config, torch.float16)
    f16 = dict(device="meta", dtype=torch.float16)
    args = (torch.empty(2, 14, 8, 72, 128, **f16), torch.tensor(1.0, device="meta"),
            torch.empty(2, 1, 1024, **f16), torch.empty(2, 3, **f16))
    with attention_kernel("flash"), MemoryTracker() as tracker, torch.no_grad():
        unet(*args)
    assert 4.0 * 2**30 < tracker.peak_bytes < 4.7 * 2**30
