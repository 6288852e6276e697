"""Gathered tables (runtime/gather.py, Op.gathers, ModelProfile.block_gathered): a streamed embedding table
stays in host memory and only the rows a call's ids select reach the device, exactly; profiled, priced and
chosen by the planner as such. CPU: host == device, the same copies happen."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import tiny_umt5
from vramplan.planner.costs import CostModel, Segment
from vramplan.planner.errors import InfeasibleError
from vramplan.planner.gpus import find_gpu
from vramplan.planner.placement import floor
from vramplan.planner.plan import make_plan
from vramplan.planner.schema import AllocatorProfile, ModelProfile, ModelRef, SampleShape, UnitProfile
from vramplan.runtime import apply_plan, uniform_plan
from vramplan.runtime.gather import HOSTED, gather_rows
from vramplan.runtime.memory import MemoryTracker
from vramplan.runtime.profiler import profile
from vramplan.runtime.streaming import streamable_blocks

TABLE = "encoder.embed_tokens"
MIB = 2**20


@pytest.fixture(scope="module")
def umt5():
    return tiny_umt5(seed=3)


def _shape(batch, n):
    return SampleShape(batch=batch, frames=1, latent_height=1, latent_width=n, dtype="fp32")


def _prompt(rng: random.Random, batch: int, n: int, vocab: int, distinct: int | None = None):
    """Random ids with a padded tail (the Wan pipelines pad prompts to the max length with id 0)."""
    pool = rng.sample(range(1, vocab), distinct) if distinct else range(1, vocab)
    ids = torch.tensor([[rng.choice(pool) for _ in range(n)] for _ in range(batch)])
    mask = torch.ones(batch, n, dtype=torch.long)
    for b in range(batch):
        used = rng.randint(1, n)
        ids[b, used:], mask[b, used:] = 0, 0
    return ids, mask


def test_the_tied_table_is_a_streamable_gathered_block(umt5):
    blocks = streamable_blocks(umt5, _shape(1, 7))
    table = umt5.shared.weight
    assert blocks[TABLE] == table.numel() * 4  # `shared` is the same Parameter: streaming it moves both names
    prof = profile(umt5, _shape(2, 13), kernel="math", max_k=1)
    assert prof.block_gathered == {TABLE: 2 * 13 * table.shape[1] * 4}  # 26 ids: at most 26 distinct rows
    assert set(prof.block_gathered) <= set(prof.block_weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_table_gives_the_stock_output(umt5, seed):
    """Random prompts (lengths that do not divide, padding) through a plan streaming the table alone or
    with every block: the stock UMT5 encoder's output; the table back in place, unmarked, afterwards."""
    rng = random.Random(seed)
    batch, n = rng.choice([(1, 11), (2, 9), (1, 17)])
    ids, mask = _prompt(rng, batch, n, umt5.config.vocab_size)
    with torch.no_grad():
        expected = umt5(ids, mask).last_hidden_state
    shape = _shape(batch, n)
    plan = uniform_plan(umt5, 1, shape)
    plan.components[0].streamed = [TABLE] if seed == 0 else list(streamable_blocks(umt5, shape))
    ptr = umt5.shared.weight.data_ptr()
    with apply_plan(umt5, plan) as handle, torch.no_grad():
        assert handle.streamer.gathered == {TABLE}
        assert getattr(umt5.shared.weight, HOSTED)
        got = umt5(ids, mask).last_hidden_state
        again = umt5(ids, mask).last_hidden_state
    assert torch.equal(got, expected) and torch.equal(again, expected)
    assert not hasattr(umt5.shared.weight, HOSTED) and umt5.shared.weight.data_ptr() == ptr
    assert umt5.encoder.embed_tokens.weight is umt5.shared.weight


def test_gather_rows_equals_the_lookup():
    table = torch.randn(37, 5)
    ids = torch.tensor([[3, 3, 0, 36, 7], [0, 0, 0, 1, 3]])
    param = torch.nn.Parameter(table.clone())
    setattr(param, HOSTED, True)
    assert torch.equal(gather_rows(param, ids), torch.nn.functional.embedding(ids, table))
    meta = torch.nn.Parameter(torch.empty(37, 5, device="meta"))
    setattr(meta, HOSTED, True)
    assert gather_rows(meta, ids.to("meta")).shape == (2, 5, 5)


def test_the_tracker_sees_only_the_gathered_rows(umt5):
    """Host == device: streaming the table adds the distinct rows (plus their index), never the table."""
    ids, mask = _prompt(random.Random(5), 1, 40, umt5.config.vocab_size, distinct=4)
    shape = _shape(1, 40)
    plan = uniform_plan(umt5, 1, shape)
    table_bytes = umt5.shared.weight.numel() * 4
    with apply_plan(umt5, plan), MemoryTracker() as plain, torch.no_grad():
        umt5(ids, mask)
    plan.components[0].streamed = [TABLE]
    with apply_plan(umt5, plan), MemoryTracker() as streamed, torch.no_grad():
        umt5(ids, mask)
    rows = len(set(ids.flatten().tolist())) * umt5.config.d_model * 4  # at most 5 distinct (4 + padding 0)
    extra = streamed.peak_bytes - plain.peak_bytes
    assert extra <= rows + ids.numel() * 8 * 2 < table_bytes // 4  # rows + the index / unique ids


def test_verify_on_meta_counts_the_gathered_bound():
    from vramplan.runtime import verify

    with torch.device("meta"):
        meta = type(tiny_umt5())(tiny_umt5().config).eval()
    shape = _shape(1, 12)
    ids = torch.empty(1, 12, dtype=torch.long, device="meta")
    plan = uniform_plan(meta, 1, shape)

    def lookup_peak():
        with apply_plan(meta, plan), MemoryTracker() as tracker, torch.no_grad():
            meta(ids)
        return tracker.units[TABLE].peak_bytes

    plain = lookup_peak()
    plan.components[0].streamed = [TABLE]
    bound = 12 * meta.config.d_model * 4  # the profiler's block_gathered at this shape
    assert lookup_peak() == plain + bound + ids.numel() * 8  # + the index into the rows
    assert verify(plan, meta).measured_host_bytes >= meta.shared.weight.numel() * 4  # the table: host memory
    assert all(p.device.type == "meta" for p in meta.parameters())


# -- the planner (handmade profile, no torch needed) --------------------------------------------------------
def _unit(name, block, inputs, out_mib, flops=10**9):
    return UnitProfile(name=name, axis=None, block=block, inputs=inputs, output_bytes=out_mib * MIB,
                       output_shape=[1, 8], axis_length=0, flops=flops, bytes_moved=out_mib * MIB * 3, kernels=5,
                       scratch={1: out_mib * MIB})


def _handmade(gathered: bool) -> ModelProfile:
    """A 1000 MiB embedding table whose unit gathers at most 4 MiB of rows, two 100 MiB layers."""
    units = [_unit("embed.lookup", "embed", ["ids"], 4), _unit("layers.0.f", "layers.0", ["embed.lookup"], 4),
             _unit("layers.1.f", "layers.1", ["layers.0.f"], 4)]
    return ModelProfile(
        model=ModelRef(class_name="Handmade", config_hash="0" * 64, name="handmade"),
        shape=SampleShape(batch=1, frames=1, latent_height=1, latent_width=512, dtype="bf16"),
        attention_kernel="flash", weight_bytes=1200 * MIB, globals_bytes=0, result="layers.1.f", units=units,
        original_peak_bytes=12 * MIB, block_weights={"embed": 1000 * MIB, "layers.0": 100 * MIB, "layers.1": 100 * MIB},
        block_gathered={"embed": 4 * MIB} if gathered else {},
        allocator=AllocatorProfile(method="handmade", default={1: 1.0}, expandable_segments={1: 1.0},
                                   original_default=1.0, original_expandable_segments=1.0),
    )


def test_a_gathered_table_is_priced_by_its_rows_and_chosen_when_needed():
    gpu = find_gpu("RTX 4090")
    model = CostModel(_handmade(True), gpu)
    everything = frozenset(model.streamable)
    first = Segment(0, 0, 1)
    assert model.present_blocks(first, everything) == ["embed", "layers.0"]
    assert model.present_bytes(first, everything) == 104 * MIB  # the rows, not the table; the next layer
    assert model.streamed_weight_bytes(everything) == 1200 * MIB  # all of it leaves the device
    transfer, exposed = model.streaming_seconds(frozenset({"embed"}))
    assert transfer == exposed == pytest.approx(4 * MIB / model.link_bytes_per_s)  # copied by its unit
    # A table in the middle is never prefetched: the block after it is (as the streamer does).
    middle = _handmade(True).model_copy(deep=True)
    middle.units[0].block, middle.units[1].block = "layers.0", "embed"
    assert CostModel(middle, gpu).present_blocks(first, everything) == ["layers.0", "layers.1"]
    plain = CostModel(_handmade(False), gpu)
    assert floor(plain).unit == "embed.lookup"  # the table whole on the device sets the floor
    assert floor(model).unit == "layers.0.f"  # gathered, a layer (and the next one prefetched) sets it
    assert floor(model).needed_bytes <= floor(plain).needed_bytes - 890 * MIB
    # A budget only the gathered table meets: the plan streams it; its peak counts the rows, its host the table.
    usable = gpu.cuda_context_bytes + 400 * MIB
    plan = make_plan(_handmade(True), gpu, usable_bytes=usable, steps=1)
    comp = plan.components[0]
    assert "embed" in comp.streamed and plan.prediction.peak_bytes <= usable
    assert plan.prediction.host_bytes >= 1000 * MIB
    with pytest.raises(InfeasibleError, match="set by embed.lookup"):  # the whole table on the device: no fit
        make_plan(_handmade(False), gpu, usable_bytes=usable, steps=1)


def test_a_profile_gathering_outside_its_streamable_blocks_is_refused():
    from pydantic import ValidationError

    data = _handmade(True).model_dump()
    for gathered in ({"layers.9": MIB}, {"embed": 2000 * MIB}):
        data["block_gathered"] = gathered
        with pytest.raises(ValidationError, match="block_gathered names"):
            ModelProfile.model_validate(data)
