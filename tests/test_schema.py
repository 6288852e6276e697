"""Plan JSON: round trip, and clear errors for corrupt or future files. Needs no torch."""

from __future__ import annotations

import json

import pytest
from vramplan.planner.errors import PlanFormatError
from vramplan.planner.schema import ComponentPlan, Group, ModelRef, Plan, SampleShape


def _plan() -> Plan:
    return Plan(components=[ComponentPlan(
        model=ModelRef(class_name="UNetSpatioTemporalConditionModel", config_hash="ab" * 32, name="svd"),
        shape=SampleShape(batch=2, frames=14, latent_height=72, latent_width=128, dtype="fp16"),
        slices={"conv_in": 4, "down_blocks.0.resnets.0.spatial_res_block": 4},
        groups=[Group(units=["conv_in", "down_blocks.0.resnets.0.spatial_res_block"], axis="frames", k=4)],
    )])


def test_round_trip(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "p.json")
    assert Plan.load(path) == plan
    assert json.loads(path.read_text())["schema_version"] == 1


def test_not_json(tmp_path):
    (tmp_path / "p.json").write_text("{oops")
    with pytest.raises(PlanFormatError, match="not valid JSON"):
        Plan.load(tmp_path / "p.json")


def test_missing_file(tmp_path):
    with pytest.raises(PlanFormatError, match="cannot read plan file"):
        Plan.load(tmp_path / "absent.json")


def test_wrong_field_is_named():
    data = json.loads(_plan().to_json())
    data["components"][0]["shape"]["frames"] = 0
    with pytest.raises(PlanFormatError, match="field 'components.0.shape.frames'"):
        Plan.from_json(json.dumps(data))


def test_future_version_says_upgrade():
    data = json.loads(_plan().to_json())
    data["schema_version"] = 7
    with pytest.raises(PlanFormatError, match="version 7.*upgrade vramplan"):
        Plan.from_json(json.dumps(data))


def test_group_and_slices_must_agree():
    data = json.loads(_plan().to_json())
    data["components"][0]["slices"]["conv_in"] = 2
    with pytest.raises(PlanFormatError, match="has k=2 but its group has k=4"):
        Plan.from_json(json.dumps(data))
