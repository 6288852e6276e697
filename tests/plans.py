"""Hypothesis strategies for random plans over a model's units."""

from __future__ import annotations

from hypothesis import strategies as st
from vramplan.planner.schema import ComponentPlan, Group, Plan


@st.composite
def random_plans(draw, units, model_ref, shape, max_k: int = 12, recompute: dict[str, str] | None = None,
                 component: str = "unet"):
    """Random slice counts, random group boundaries inside same-axis runs, some units ungrouped.
    ``recompute`` (unit -> its first input): groups may also hold statistics units after the unit
    making their input (their statistics then come from a recompute pass, listed in the plan)."""
    slices: dict[str, int] = {}
    groups: list[Group] = []
    index = {u.name: i for i, u in enumerate(units)}
    i = 0
    while i < len(units):
        unit = units[i]
        if unit.axis is None:
            i += 1
            continue
        # The longest run this unit may start: same axis, and no later unit that needs input stats.
        # Nor one reading whole a value the run makes (attention keys/values: made before its segment).
        j = i + 1
        while (j < len(units) and units[j].axis == unit.axis and (recompute or not units[j].needs_input_stats)
               and not set(getattr(units[j], "whole_inputs", ())) & {u.name for u in units[i:j]}):
            j += 1
        size = draw(st.integers(1, j - i))
        k = draw(st.integers(1, max_k))
        names = [u.name for u in units[i : i + size]]
        if size > 1 or draw(st.booleans()):
            groups.append(Group(units=names, axis=unit.axis, k=k))
        if k > 1:
            slices.update(dict.fromkeys(names, k))
        i += size
    inside = [name for g in groups for pos, name in enumerate(g.units) if pos and recompute
              and units[index[name]].needs_input_stats and recompute[name] in g.units[:pos]]
    return Plan(components=[ComponentPlan(component=component, model=model_ref, shape=shape, slices=slices,
                                          groups=groups, recompute=inside)])
