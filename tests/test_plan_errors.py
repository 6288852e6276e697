"""Plans that do not fit the model, the call or the runtime are refused with a clear message."""

from __future__ import annotations

import pytest
import torch
from tiny import svd_inputs, tiny_svd_unet
from vramplan.planner.errors import InvalidPlanError, PlanMismatchError, UnsupportedModelError
from vramplan.planner.schema import Group
from vramplan.runtime import apply_plan, list_units, sample_shape, uniform_plan


def test_plan_for_another_model_is_refused(tiny_unet):
    other = tiny_svd_unet(block_out_channels=(32, 32))
    inputs = svd_inputs(tiny_unet, frames=3)
    plan = uniform_plan(tiny_unet, 2, sample_shape(inputs[0]))
    plan.components[0].model.name = "tiny-svd"
    with pytest.raises(PlanMismatchError, match=r"made for unet: tiny-svd \(UNetSpatioTemporalConditionModel.*3 frames"):
        apply_plan(other, plan)
    assert "forward" not in other.__dict__


def test_call_with_another_shape_is_refused(tiny_unet):
    inputs = svd_inputs(tiny_unet, frames=3, height=8, width=8)
    plan = uniform_plan(tiny_unet, 2, sample_shape(inputs[0]))
    with apply_plan(tiny_unet, plan), pytest.raises(PlanMismatchError, match="made for batch 1 x 3 frames x 8x8"):
        tiny_unet(*svd_inputs(tiny_unet, frames=4, height=8, width=8))


def test_model_without_adapter_names_supported_classes():
    with pytest.raises(UnsupportedModelError, match="UNetSpatioTemporalConditionModel"):
        list_units(torch.nn.Linear(2, 2))


def _plan(unet, inputs, groups):
    plan = uniform_plan(unet, 2, sample_shape(inputs[0]), group=False)
    plan.components[0].groups = groups
    return plan


@pytest.mark.parametrize(
    "pick, message",
    [
        (lambda u: ([u[1].name, u[5].name], "frames"), "consecutive"),
        (lambda u: ([u[1].name, u[2].name], "frames"), "slices along tokens"),
        (lambda u: ([u[2].name, u[3].name], "tokens"), "must start its group"),
        (lambda u: (["no.such.unit"], "frames"), "does not have: no.such.unit"),
    ],
)
def test_invalid_groups_are_refused(tiny_unet, pick, message):
    inputs = svd_inputs(tiny_unet, frames=3)
    names, axis = pick(list_units(tiny_unet))
    plan = _plan(tiny_unet, inputs, [Group(units=names, axis=axis, k=2)])
    with pytest.raises(InvalidPlanError, match=message):
        apply_plan(tiny_unet, plan)
    assert "forward" not in tiny_unet.__dict__
