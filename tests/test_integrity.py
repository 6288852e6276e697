"""Plan files are data that must agree with themselves and with the model: every edited plan below is
refused by ``load_plan`` with one line naming the field (and by ``vramplan verify`` with exit 1), and
a fleet plan whose jobs' peaks were lowered is refused before its packings are trusted.

The plans are made once from the shipped profiles (no torch); each case edits the JSON as a user (or
an attacker) would and names the error it must get.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
from vramplan.planner.errors import PlanIntegrityError
from vramplan.planner.integrity import MAX_STEPS, problems

from vramplan import load_plan, plan_for


@pytest.fixture(scope="module")
def laptop():
    """SVD-XT on a 4 GB laptop: streamed UNet blocks, host-placed VAE values, recompute, depth."""
    return json.loads(plan_for(gpu="RTX 3050 Laptop", model="svd-xt").to_json())


@pytest.fixture(scope="module")
def rehashed():
    """SVD on a 2080 Ti with a uniform Step Rehash schedule."""
    return json.loads(plan_for(gpu="2080Ti", model="svd", rehash="uniform").to_json())


def comp(data, name):
    return next(c for c in data["components"] if c["component"] == name)


def _unsliced(data, name):
    """The component made unsliced (no shape, nothing planned), as a stage that runs whole."""
    c = comp(data, name)
    c.update(shape=None, slices={}, groups=[], recompute=[], host=[], streamed=[])
    return c


def stage(data, name):
    return next(s for s in data["stages"] if s["stage"] == name)


def first_group(data, name, depth_above=1):
    return next(g for g in comp(data, name)["groups"] if g["k"] > depth_above)


def _scale_all(d, factor):
    """Every byte count of the prediction and the stages scaled alike: consistent with itself, not the model."""
    for part in [d["prediction"], *d["stages"]]:
        for key, value in part.items():
            if key.endswith("_bytes") and isinstance(value, int):
                part[key] = int(value * factor)


def _inside_value(d):
    """A VAE value made and last read inside one of the plan's groups (it never leaves the GPU)."""
    from vramplan.planner.plan import shipped_pipeline_profile

    profile = next(s.profile for s in shipped_pipeline_profile("svd-xt", 576, 1024, 25, True, "fp16", "efficient").stages
                   if s.stage == "decode")
    for g in comp(d, "vae")["groups"]:
        inside = set(g["units"])
        for name in g["units"][:-1]:
            if all(u.name in inside for u in profile.units if name in u.inputs):
                return name
    raise AssertionError("no value inside a group")


def _set(path, value):
    def edit(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return edit


def _do(*edits):
    def edit(d):
        for e in edits:
            e(d)
    return edit


def _group_k(name, k):
    def edit(d):
        c = comp(d, name)
        g = first_group(d, name)
        g["k"] = k
        for u in g["units"]:
            c["slices"][u] = k
    return edit


def _unit_k(name, unit, k):
    return lambda d: comp(d, name)["slices"].__setitem__(unit, k)


def _append(name, key, value):
    return lambda d: comp(d, name)[key].append(value(d) if callable(value) else value)


def _lower_stage_peaks(d):
    """The 'honest-looking' edit: every stage and the top-level peak lowered by a third, parts adjusted."""
    for s in d["stages"]:
        cut = min(s["peak_bytes"] // 3, s["weight_bytes"])
        s["peak_bytes"] -= cut
        s["weight_bytes"] -= cut
    p = d["prediction"]
    cut = p["peak_bytes"] - max(s["peak_bytes"] for s in d["stages"])
    p["peak_bytes"] -= cut
    p["weight_bytes"] -= cut


LAPTOP_CASES = {
    # -- the top-level prediction --------------------------------------------------------------
    "peak a third": (_set(["prediction", "peak_bytes"], lambda v: v // 3), r"'prediction\.peak_bytes'"),
    "negative peak": (_set(["prediction", "peak_bytes"], -1), r"'prediction\.peak_bytes' is -1: it cannot be negative"),
    "nan latency": (_set(["prediction", "latency_s"], math.nan), r"'prediction\.latency_s' is nan: .*finite"),
    "infinite latency": (_set(["prediction", "latency_s"], math.inf), r"'prediction\.latency_s' is inf"),
    "negative latency": (_set(["prediction", "latency_s"], -3.0), r"'prediction\.latency_s' is -3\.0"),
    "latency a tenth": (_set(["prediction", "latency_s"], lambda v: v / 10), r"'prediction\.latency_s'"),
    "unet call faster": (_set(["prediction", "unet_call_s"], lambda v: v / 2), r"'prediction\.unet_call_s'"),
    "host memory halved": (_set(["prediction", "host_bytes"], lambda v: v // 2), r"'prediction\.host_bytes'"),
    "no host memory": (_set(["prediction", "host_bytes"], 0), r"'prediction\.host_bytes'"),
    "transfer time hidden": (_set(["prediction", "transfer_s"], 0.0), r"'prediction\.transfer_s'"),
    "nan transfer time": (_set(["prediction", "transfer_s"], math.nan), r"'prediction\.transfer_s'"),
    "negative host memory": (_set(["prediction", "host_bytes"], -5), r"'prediction\.host_bytes'"),
    "weights lowered": (_set(["prediction", "weight_bytes"], lambda v: v // 2), r"'prediction\.peak_bytes'"),
    "context lowered with peak": (_do(_set(["prediction", "context_bytes"], lambda v: v - 2**20),
                                      _set(["prediction", "peak_bytes"], lambda v: v - 2**20)),
                                  r"peak_bytes' is \d+, but context"),
    "margin zero with peak": (_do(lambda d: d["prediction"].__setitem__("peak_bytes", d["prediction"]["peak_bytes"]
                                                                       - d["prediction"]["margin_bytes"]),
                                  _set(["prediction", "margin_bytes"], 0)), r"peak_bytes' is \d+, but"),
    "every byte scaled": (lambda d: _scale_all(d, 0.5), r"profile gives"),
    "stage peaks lowered consistently": (_lower_stage_peaks, r"peak_bytes' is \d+, but"),
    "peak unit renamed": (_set(["prediction", "peak_unit"], "conv_in"), r"'prediction\.peak_unit'"),
    "peak stage renamed": (_set(["prediction", "peak_stage"], "encode_vae"), r"'prediction\.peak_stage'"),
    "original peak lowered": (_set(["prediction", "original_peak_bytes"], 1), r"'prediction\.original_peak_bytes'"),
    "nan original latency s": (_set(["prediction", "unet_call_s"], math.nan), r"'prediction\.unet_call_s' is nan"),
    "streamed weights claimed": (_set(["prediction", "streamed_bytes"], 10**9), r"'prediction\.peak_bytes' is \d+, but its parts"),
    # -- per stage ----------------------------------------------------------------------------------
    "stage seconds": (lambda d: stage(d, "decode").__setitem__("seconds", 1.0), r"'stages\[3\]\.seconds'|latency_s"),
    "stage peak": (lambda d: stage(d, "decode").__setitem__("peak_bytes", 1), r"'stages\[3\]\.peak_bytes'"),
    "stage host": (lambda d: stage(d, "decode").__setitem__("host_bytes", 0), r"host_bytes"),
    "stage nan seconds": (lambda d: stage(d, "denoise").__setitem__("seconds", math.nan), r"'stages\[2\]\.seconds' is nan"),
    "stage negative held": (lambda d: stage(d, "denoise").__setitem__("held_bytes", -1), r"'stages\[2\]\.held_bytes' is -1"),
    "stage calls": (lambda d: stage(d, "denoise").__setitem__("calls", 2), r"'stages\[2\]\.calls'"),
    # -- target and steps ---------------------------------------------------------------------------
    "steps 1e9": (_set(["target", "steps"], 10**9), rf"'target\.steps' is 1000000000: at most {MAX_STEPS}"),
    "steps changed": (_set(["target", "steps"], 50), r"profile gives"),
    "usable memory raised": (_set(["target", "usable_bytes"], lambda v: v * 2), r"profile gives"),
    "another GPU": (_set(["target", "gpu"], "RTX 4090"), r"profile gives"),
    "pageable claimed pinned": (_set(["target", "pinned"], False), r"profile gives"),
    "negative solve time": (_set(["solver", "solve_seconds"], -1.0), r"'solver\.solve_seconds' is -1\.0"),
    "nan gap": (_set(["solver", "gap"], math.nan), r"'solver\.gap' is nan"),
    # -- header vs component shapes -----------------------------------------------------------------
    "height and width swapped": (lambda d: d.update(height=d["width"], width=d["height"]),
                                 r"'components\[unet\]\.shape\.latent_height' is 72, but the plan's header \(25 x 1024x576\) needs 128"),
    "frames halved in the header": (_set(["frames"], 12), r"'components\[unet\]\.shape\.frames' is 25, but the plan's header \(12 x 576x1024\) needs 12"),
    "unet with twice the frames": (lambda d: comp(d, "unet")["shape"].__setitem__("frames", 50),
                                   r"'components\[unet\]\.shape\.frames' is 50, but the plan's header"),
    "vae latents swapped": (lambda d: comp(d, "vae")["shape"].update(latent_height=128, latent_width=72),
                            r"'components\[vae\]\.shape\.latent_height' is 128, but the plan's header"),
    "unet batch of three": (lambda d: comp(d, "unet")["shape"].__setitem__("batch", 3),
                            r"'components\[unet\]\.shape\.batch' is 3"),
    "vae batch of two": (lambda d: comp(d, "vae")["shape"].__setitem__("batch", 2), r"'components\[vae\]\.shape"),
    "unet dtype changed": (lambda d: comp(d, "unet")["shape"].__setitem__("dtype", "fp32"),
                           r"'components\[vae\]\.shape\.dtype' is fp16, but .* fp32"),
    # -- slicing ------------------------------------------------------------------------------------
    "depth 1e9": (lambda d: first_group(d, "unet").__setitem__("depth", 10**9), r"\.depth' is 1000000000: more slices"),
    "depth above k": (lambda d: first_group(d, "vae").__setitem__("depth", first_group(d, "vae")["k"] + 1),
                      r"\.depth' is .*more slices in flight"),
    "k 1e9 on a unit": (_unit_k("unet", "down_blocks.0.resnets.0.spatial_res_block", 10**9),
                        r"slices\.down_blocks\.0\.resnets\.0\.spatial_res_block' is 1000000000: more slices than"),
    "group k 1e9": (_group_k("vae", 10**9), r"k' is 1000000000: more slices than|more slices than"),
    "k never profiled": (_unit_k("unet", "down_blocks.0.resnets.0.spatial_res_block", 7), r"did not measure|more slices"),
    "unknown sliced unit": (_unit_k("unet", "down_blocks.9.nothing", 2), r"'down_blocks\.9\.nothing', which is not a unit"),
    "group along the wrong axis": (lambda d: first_group(d, "unet").__setitem__(
        "axis", "tokens" if first_group(d, "unet")["axis"] == "frames" else "frames"), r"\.axis' is"),
    "group units out of order": (lambda d: first_group(d, "unet")["units"].reverse(), r"not a run of consecutive units"),
    "group with an unknown unit": (lambda d: first_group(d, "unet")["units"].append("nowhere"), r"'nowhere', which is not a unit"),
    "k changed with its group": (_group_k("vae", 2), r"profile gives|did not measure|depth"),
    "depth changed": (lambda d: first_group(d, "unet").__setitem__("depth", 1), r"profile gives"),
    # -- recompute ----------------------------------------------------------------------------------
    "recompute duplicated": (_append("vae", "recompute", lambda d: comp(d, "vae")["recompute"][0]), r"recompute' lists .* more than once"),
    "recompute extra": (_append("unet", "recompute", "conv_in"), r"'components\[unet\]\.recompute' lists conv_in"),
    "recompute missing": (lambda d: comp(d, "vae")["recompute"].pop(0), r"'components\[vae\]\.recompute' misses"),
    # -- placement ----------------------------------------------------------------------------------
    "host duplicated": (_append("vae", "host", lambda d: comp(d, "vae")["host"][0]), r"'components\[vae\]\.host' lists .* more than once"),
    "host unknown value": (_append("vae", "host", "sample"), r"'components\[vae\]\.host' names 'sample'"),
    "host value never leaves": (lambda d: comp(d, "vae")["host"].append(_inside_value(d)),
                                r"'components\[vae\]\.host' names .*, which no later segment reads"),
    "host dropped": (lambda d: comp(d, "vae")["host"].pop(), r"profile gives"),
    "host on an unsliced component": (lambda d: _unsliced(d, "image_encoder")["host"].append("x"),
                                      r"'components\[image_encoder\]\.host' is set, but the component is not sliced"),
    # -- streaming and residency --------------------------------------------------------------------
    "resident while streaming": (lambda d: comp(d, "unet").__setitem__("resident", True), r"profile gives"),
    "streamed block duplicated": (_append("unet", "streamed", lambda d: comp(d, "unet")["streamed"][0]),
                                  r"'components\[unet\]\.streamed' lists .* more than once"),
    "streamed block unknown": (_append("unet", "streamed", "down_blocks.7"), r"'down_blocks\.7', not a block"),
    "streamed on an unsliced component": (lambda d: _unsliced(d, "image_encoder")["streamed"].append("vision_model"),
                                          r"'components\[image_encoder\]\.streamed' is set, but the component is not sliced"),
    "streamed block dropped": (lambda d: comp(d, "unet")["streamed"].pop(), r"profile gives"),
    "resident flipped": (lambda d: comp(d, "image_encoder").__setitem__("resident", True), r"profile gives"),
    # -- model identity -----------------------------------------------------------------------------
    "another unet config": (lambda d: comp(d, "unet")["model"].__setitem__("config_hash", "0" * 64),
                            r"'components\[unet\]\.model'"),
}


def _write(tmp_path, data) -> str:
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_planned_plans_load_clean(laptop, rehashed, tmp_path):
    for data in (laptop, rehashed):
        plan = load_plan(_write(tmp_path, data))
        assert problems(plan) == []


@pytest.mark.parametrize("case", sorted(LAPTOP_CASES))
def test_edited_plan_is_refused_naming_the_field(laptop, tmp_path, case):
    edit, message = LAPTOP_CASES[case]
    data = copy.deepcopy(laptop)
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is checked below
        load_plan(path)
    err = info.value
    assert isinstance(err, PlanIntegrityError) or type(err).__name__ == "PlanFormatError", type(err)
    text = str(err)
    assert "\n" not in text
    assert __import__("re").search(message, text), text


def _cut_case(cut):
    return lambda d: d["rehash"].__setitem__("cut", cut)


REHASH_CASES = {
    "cut that does not exist": (_cut_case("up_blocks.9.nothing"), r"'rehash\.cut' is 'up_blocks\.9\.nothing', not one"),
    "cut in the down path": (_cut_case("down_blocks.1.attentions.0.proj_out"), r"'rehash\.cut' is 'down_blocks"),
    "cut at conv_in": (_cut_case("conv_in"), r"'rehash\.cut' is 'conv_in'"),
    "CFG reuse on a batched-guidance UNet": (_cut_case("cfg"), r"'rehash\.cut' is 'cfg': per-step CFG reuse needs two"),
    "rehash steps 1e9": (lambda d: d["rehash"].__setitem__("steps", 10**9), r"'rehash\.steps' is 1000000000"),
    "rehash steps not the target's": (lambda d: d["rehash"].update(steps=40), r"'rehash\.steps' is 40, but"),
    "flops claimed lower": (lambda d: d["rehash"].__setitem__("unet_flops", d["rehash"]["unet_flops"] // 4),
                            r"'rehash\.unet_flops'"),
    "reuse call cheaper": (lambda d: d["rehash"].__setitem__("reuse_call_s", 0.001), r"'rehash\.reuse_call_s'"),
    "cache smaller": (lambda d: d["rehash"].__setitem__("cache_bytes", 1), r"'rehash\.cache_bytes'|profile gives"),
    "negative saving": (lambda d: d["rehash"].__setitem__("latency_saved_s", -1.0), r"'rehash\.latency_saved_s' is -1"),
    "nan error": (lambda d: d["rehash"].__setitem__("predicted_error", math.nan), r"'rehash\.predicted_error' is nan"),
    "fewer key steps": (lambda d: d["rehash"].__setitem__("key_steps", d["rehash"]["key_steps"][:2]),
                        r"profile gives|rehash"),
}


@pytest.mark.parametrize("case", sorted(REHASH_CASES))
def test_edited_rehash_plan_is_refused(rehashed, tmp_path, case):
    edit, message = REHASH_CASES[case]
    data = copy.deepcopy(rehashed)
    edit(data)
    with pytest.raises(PlanIntegrityError, match=message):
        load_plan(_write(tmp_path, data))


def test_verify_fails_with_exit_1_before_running_anything(laptop, tmp_path, capsys):
    from vramplan.cli import main

    data = copy.deepcopy(laptop)
    data["prediction"]["peak_bytes"] //= 3
    assert main(["verify", _write(tmp_path, data)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "'prediction.peak_bytes'" in err


def test_k_on_a_unit_without_an_axis(laptop):
    """No shipped unit lacks an axis: the check runs against a profile whose first unit has none."""
    from vramplan.planner.plan import shipped_pipeline_profile
    from vramplan.planner.schema import Plan

    unet = next(s.profile for s in shipped_pipeline_profile("svd-xt", 576, 1024, 25, True, "fp16", "efficient").stages
                if s.stage == "denoise")
    units = [unet.units[0].model_copy(update={"axis": None}), *unet.units[1:]]
    data = copy.deepcopy(laptop)
    comp(data, "unet")["slices"][unet.units[0].name] = 4
    found = problems(Plan.model_validate(data), unet.model_copy(update={"units": units}))
    assert found == [f"field 'components[unet].slices.{unet.units[0].name}' is 4, but {unet.units[0].name} has no "
                     f"exact slicing axis (it runs whole)"]


def test_a_plan_without_a_shipped_profile_still_checks_itself(laptop):
    """A plan whose header names no shipped profile (another size) is checked against itself only."""
    from vramplan.planner.schema import Plan

    data = copy.deepcopy(laptop)
    data["prediction"]["peak_bytes"] += 10**9
    plan = Plan.model_validate(data)
    assert any("parts" in p for p in problems(plan, find_profile=False))


# -- fleet plans ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet_data():
    from vramplan.planner.capacity import parse_inventory, parse_workloads, plan_fleet

    fleet = plan_fleet(parse_workloads([{"name": "a", "model": "svd", "height": 512, "width": 512, "rate": 20.0}]),
                       parse_inventory([{"gpu": "A10G", "count": 8}]))
    return json.loads(fleet.model_dump_json())


def _jobs(data):
    return [j for a in data["gpus"] for p in a["packings"] for j in p["jobs"]]


def _lower_job(job):
    """A job's peak lowered with its plan edited to agree with itself (the weights on the GPU shrink)."""
    pred, stages = job["plan"]["prediction"], job["plan"]["stages"]
    cut = pred["weight_bytes"] // 2
    for st in stages:
        over = st["peak_bytes"] - (pred["peak_bytes"] - cut)
        if over > st["weight_bytes"]:
            cut -= over - st["weight_bytes"]
    new = pred["peak_bytes"] - cut
    for st in stages:
        if st["peak_bytes"] > new:
            st["weight_bytes"] -= st["peak_bytes"] - new
            st["peak_bytes"] = new
    pred["weight_bytes"] -= cut
    pred["peak_bytes"] = job["peak_bytes"] = new
    assert cut > 0


def test_fleet_plan_with_lowered_job_peaks_is_refused(fleet_data, tmp_path):
    from vramplan.planner.capacity import FleetPlan, FleetPlanError

    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(fleet_data))
    FleetPlan.load(path)  # the plan as made loads
    data = copy.deepcopy(fleet_data)
    for job in _jobs(data):
        _lower_job(job)
    path.write_text(json.dumps(data))
    with pytest.raises(FleetPlanError, match=r"fleet plan job gpus\[A10G\]\.packings\[0\]\.jobs\[0\] \(a\).*profile gives"):
        FleetPlan.load(path)
    data = copy.deepcopy(fleet_data)
    _jobs(data)[0]["peak_bytes"] //= 3  # the job's own number, its plan untouched
    path.write_text(json.dumps(data))
    with pytest.raises(FleetPlanError, match=r"field 'peak_bytes' is \d+, but its plan's peak is"):
        FleetPlan.load(path)


def test_fleet_emit_ray_refuses_an_edited_fleet_plan(fleet_data, tmp_path, capsys):
    from vramplan.cli import main

    data = copy.deepcopy(fleet_data)
    for job in _jobs(data):
        _lower_job(job)
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "serve.yaml"
    assert main(["fleet", "--emit", "ray", "--fleet", str(path), "-o", str(out)]) == 2
    assert "profile gives" in capsys.readouterr().err and not out.exists()


def test_wan_plans_agree_with_their_header_in_latent_frames(tmp_path):
    """Wan's transformer sees latent frames (81 video frames -> 21): with or without the shipped profile
    the header check follows the pipeline's own shape rule."""
    from vramplan.planner.schema import Plan

    plan = plan_for(gpu="RTX 4090", model="wan2.1-t2v-1.3b", height=480, width=832, dtype="bf16")
    assert plan.component("transformer").shape.frames == 21
    assert problems(plan) == [] and problems(plan, find_profile=False) == []
    data = json.loads(plan.to_json())
    data["frames"] = 85  # 22 latent frames
    found = problems(Plan.model_validate(data))
    assert found and found[0].startswith("field 'components[")  and "frames' is 21, but the plan's header" in found[0]
    load_plan(_write(tmp_path, json.loads(plan.to_json())))
