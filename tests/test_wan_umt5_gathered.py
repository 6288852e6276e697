"""Every shipped Wan pipeline profile prices UMT5's token-embedding table as a gathered block (#15): it may
stay in pinned host memory with only the rows a prompt selects copied to the GPU, so the text-encode stage
no longer needs the 2 GiB table on the GPU. Torch-free (shipped JSON and the planner only)."""

from __future__ import annotations

import pytest
from vramplan.planner.errors import InfeasibleError
from vramplan.planner.plan import shipped_pipeline_profile, shipped_profiles

from vramplan import plan_for

TABLE = "encoder.embed_tokens"
WAN = sorted(name for name in shipped_profiles() if name.startswith("wan"))


def _parse(name: str):
    model, rest = name.split("-", 3)[:3], name.split("-", 3)[3]
    size, frames = rest.split("-")[0], rest.split("-")[1]
    height, width = (int(x) for x in size.split("x"))
    return "-".join(model), height, width, int(frames[1:])


def test_the_shipped_wan_profiles_are_listed():
    assert len(WAN) == 8
    assert any(n.startswith("wan2.1-t2v-14b-720x1280") for n in WAN)


@pytest.mark.parametrize("name", WAN)
def test_umt5_embedding_table_is_a_gathered_block(name):
    model, height, width, frames = _parse(name)
    prof = shipped_pipeline_profile(model, height, width, frames, True, "bf16", "flash")
    assert prof is not None, name
    stage = next(s for s in prof.stages if s.stage == "encode_text")
    text = stage.profile
    assert text.model.class_name == "UMT5EncoderModel"
    table = text.block_weights.get(TABLE, 0)
    assert table > 2**30  # the 256k x 4096 bf16 table, streamable
    # the rows bound: at most one row per prompt token (512 tokens x 4096 x 2 bytes), far below the table
    assert text.block_gathered == {TABLE: 512 * 4096 * 2}
    assert sum(text.block_weights.values()) == text.weight_bytes  # every UMT5 weight is in some block


def test_the_14b_t2v_480p_floor_is_no_longer_set_by_the_text_encoders_table():
    """Before the table was gathered, the 2 GiB table (plus a layer) on the GPU set the 14B T2V 480p floor
    (3.26 GiB, encode_text: weights that cannot be streamed); now the denoise stage sets it."""
    with pytest.raises(InfeasibleError) as err:
        plan_for(gpu="RTX 4090", model="wan2.1-t2v-14b", height=480, width=832, frames=81, dtype="bf16",
                 vram_gb=0.25, host_ram_gb=128)
    assert (err.value.stage, err.value.part) != ("encode_text", "weights that cannot be streamed")
    assert err.value.min_peak_bytes < 3.2 * 2**30
