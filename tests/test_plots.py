"""`vramplan plan --plot`: the numbers drawn are the table's numbers, and the PNG is written."""

from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from vramplan.planner.errors import VramplanError

from vramplan import plan_for
from vramplan.cli import main, plan_table
from vramplan.plots import GIB, plot_data, plot_plan


@pytest.fixture(scope="module")
def plans():
    return {
        "svd 2080Ti": plan_for(gpu="2080Ti", model="svd"),
        "svd-xt 8.5 GiB": plan_for(gpu="2080Ti", model="svd-xt", vram_gb=8.5),  # sliced UNet and decoder
        "animatediff 4090": plan_for(gpu="RTX 4090", model="animatediff"),
    }


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _table_blocks(table: str) -> dict[str, dict[str, tuple[str, str, str]]]:
    """component -> block -> (original GiB, planned GiB, slice counts), parsed from plan_table."""
    out: dict[str, dict[str, tuple[str, str, str]]] = {}
    current = None
    for line in table.splitlines():
        if not line.strip():
            current = None
        elif current is None and ": batch " in line and not line.startswith(" "):
            current = out.setdefault(line.split(":")[0], {})
        elif current is not None and line.startswith("  ") and not line.split()[0] == "block":
            # a note under the table ("depth 4 on 1 group"); "-": a block with no original peak of its own (CLIP's outputs)
            if not all(_is_number(cell) or cell == "-" for cell in line.split()[1:3]):
                continue
            block, original, planned, ks = line.split()[:4]
            current[block] = (original, planned, ks)
    return out


@pytest.mark.parametrize("name", ["svd 2080Ti", "svd-xt 8.5 GiB", "animatediff 4090"])
def test_plotted_numbers_are_the_tables(plans, name):
    plan = plans[name]
    table = _table_blocks(plan_table(plan))
    data = plot_data(plan)
    assert [s.component for s in data] == list(table)
    svd = {"encode_image", "encode_vae"} if plan.pipeline == "StableVideoDiffusionPipeline" else set()
    assert {s.stage for s in data} == {"denoise", "decode"} | svd  # SVD plans its encoders too
    sliced = 0
    for stage in data:
        rows = {r.block: r for r in stage.rows}
        assert list(rows) == list(table[stage.component])
        for block, (original, planned, ks) in table[stage.component].items():
            row = rows[block]
            assert (original == "-" and not row.original_bytes) or f"{row.original_bytes / GIB:.2f}" == original
            assert f"{row.planned_bytes / GIB:.2f}" == planned
            assert ",".join(map(str, row.ks)) == ks
            sliced += row.ks != (1,)
        pred = next(s for s in plan.stages if s.stage == stage.stage)
        # the budget line: what the stage leaves for activations (allocator overhead included)
        assert stage.budget_bytes == plan.target.usable_bytes - (pred.peak_bytes - pred.needed_bytes)
        assert max(r.planned_bytes + r.streamed_bytes for r in stage.rows) == pred.activation_bytes
        assert pred.needed_bytes <= stage.budget_bytes
    if name == "svd-xt 8.5 GiB":
        assert sliced >= 4  # the tight plan slices blocks of both stages


def test_original_exceeds_the_budget_where_the_plan_slices(plans):
    decode = next(s for s in plot_data(plans["svd 2080Ti"]) if s.stage == "decode")
    over = [r for r in decode.rows if r.original_bytes > decode.budget_bytes]
    assert over and all(r.ks != (1,) for r in over)


def test_cli_writes_a_png(tmp_path, capsys):
    png, out = tmp_path / "mem.png", tmp_path / "plan.json"
    assert main(["plan", "--gpu", "2080Ti", "--model", "svd", "-o", str(out), "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert 800 <= width <= 3000 and 600 <= height <= 3000
    assert 20_000 < len(data) < 3_000_000


def test_plot_errors(plans, tmp_path, monkeypatch, capsys):
    plan = plans["svd 2080Ti"]
    with pytest.raises(VramplanError, match="PNG"):
        plot_plan(plan, tmp_path / "mem.jpg")
    assert main(["plan", "--gpu", "2080Ti", "-o", str(tmp_path / "p.json"), "--plot",
                 str(tmp_path / "missing" / "mem.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(VramplanError, match="pip install matplotlib"):
        plot_plan(plan, tmp_path / "mem.png")
    assert not (tmp_path / "mem.png").exists()


def test_plot_data_is_torch_free():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from vramplan import plan_for\nfrom vramplan.plots import plot_data\n"
        "print(sum(len(s.rows) for s in plot_data(plan_for(gpu='2080Ti', model='svd'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) > 10
