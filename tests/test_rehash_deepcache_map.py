"""``bench/bench_rehash.py`` (iv) maps DeepCache's published skip branches to vramplan cuts on the trained tiny
SVD. Checked here against DeepCache's rule, on the UNet's own unit program: branch r keeps the r-th skip
connection (conv_in's = 0); a reuse step runs the up layer reading it and every later op, and the down ops
making the skips those read, and caches that layer's other input. The mapped cut's reuse program (the
dependency walk) must be exactly that, plus the one op named as DeepCache's saving (an upsampler between the
cut and the cached feature)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_rehash.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_rehash", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _made_ancestors(made: dict[str, tuple[str, ...]], names) -> set[str]:
    out, stack = set(), list(names)
    while stack:
        name = stack.pop()
        if name in made and name not in out:
            out.add(name)
            stack.extend(made[name])
    return out


def test_each_published_branch_is_the_cut_that_caches_its_feature():
    from diffusers import UNetSpatioTemporalConditionModel
    from vramplan.planner.rehash import reuse_names
    from vramplan.runtime import trained
    from vramplan.runtime.adapters import adapter_for

    unet = UNetSpatioTemporalConditionModel(**trained.UNET_CONFIG)  # the trained model's architecture
    ops, result = adapter_for(unet).ops(unet)
    nodes = [(op.output, tuple(op.inputs)) for op in ops]
    order = [name for name, _ in nodes]
    made = dict(nodes)
    layers = [n for n in order if n.startswith("up_blocks.") and n.endswith("spatial_res_block")]
    assert len(layers) == 6  # three up blocks of two layers: skips 0..5
    seen = set()
    for r, _, cut, extra in _bench().DEEPCACHE:
        layer = layers[len(layers) - 1 - r]
        hidden, skip = made[layer]
        assert (skip == "conv_in") == (r == 0) and skip not in seen  # a skip connection of its own
        seen.add(skip)
        later = order[order.index(layer):]  # the layer reading skip r, the rest of the up path, the head
        skips = {i for n in later for i in made[n] if i not in later and i != hidden}  # skips 0..r
        kept = set(later) | _made_ancestors(made, skips)
        walk = set(reuse_names(nodes, result, cut))
        if extra is None:
            assert hidden == cut and walk == kept, r
        else:  # the cut is the upsampler's input: our reuse step runs the upsampler, DeepCache's does not
            assert hidden == extra and made[extra] == (cut,) and walk == kept | {extra}, r
