"""vramplan fleet / serve / batch on the command line: tables, files, the Ray config, clear errors."""

from __future__ import annotations

import json
import sys

import pytest
from vramplan.planner.capacity import FleetPlan

from vramplan.cli import main

WORKLOADS = "workloads:\n  - {name: hd, model: svd, rate: 3}\n  - {name: sq, model: svd, height: 512, width: 512, rate: 2}\n"
INVENTORY = "gpus:\n  - {gpu: A10G, count: 2, price_per_hour: 1.0}\n"


@pytest.fixture
def files(tmp_path):
    (tmp_path / "w.yaml").write_text(WORKLOADS)
    (tmp_path / "inv.yaml").write_text(INVENTORY)
    return tmp_path


def test_fleet_table_and_plan_file(files, capsys):
    out = files / "fleet.json"
    assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / "inv.yaml"),
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "A10G" in text and "cost $1.00/hour for 1 GPUs" in text and "time-share" in text
    fleet = FleetPlan.load(out)
    assert fleet.capacity("hd") >= 3
    assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / "inv.yaml"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "vramplan-fleet"


def test_schema(capsys):
    assert main(["fleet", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "GpuAllocation" in schema["$defs"] and "Plan" in schema["$defs"]


def test_single_model_form_stays(capsys):
    assert main(["fleet", "--gpus", "A10G", "--rate", "10"]) == 0
    assert "GPUs needed" in capsys.readouterr().out


def test_emit_ray_is_a_valid_serve_config(files, capsys):
    pytest.importorskip("ray")
    import yaml
    from ray.serve.schema import ServeDeploySchema

    out = files / "serve.yaml"
    assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / "inv.yaml"),
                 "--emit", "ray", "-o", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(config)
    from vramplan.fleet.serve import deployment_name

    deployments = {d["name"]: d for d in config["applications"][0]["deployments"]}
    hd, sq = deployment_name("A10G", "hd"), deployment_name("A10G", "sq")
    assert set(deployments) == {hd, sq} and hd.startswith("hd--A10G-")
    assert sum(d["ray_actor_options"]["num_gpus"] for d in deployments.values()) <= 1
    assert deployments[hd]["ray_actor_options"]["label_selector"] == {"ray.io/accelerator-type": "A10G"}
    assert config["http_options"]["host"] == "127.0.0.1"  # loopback unless told
    assert len(config["applications"][0]["args"]["token_sha256"]) == 64  # the token's digest, never the token
    assert FleetPlan.load(config["applications"][0]["args"]["fleet"]).workloads[0].name == "hd"
    from ray.serve import Application

    from vramplan.fleet.serve import app_builder

    assert isinstance(app_builder(config["applications"][0]["args"]), Application)  # what `serve deploy` imports


@pytest.mark.parametrize("workloads, message", [
    ("workloads:\n  - {name: a, model: sora, rate: 1}\n", "unknown model 'sora'"),
    ("workloads:\n  - {name: a, model: svd, rate: -1}\n", "greater than 0"),
    ("workloads:\n  - {name: a, model: svd, rate: many}\n", "valid number"),
    ("workloads:\n  - {name: a, model: svd, height: 100, rate: 1}\n", "not a multiple of 8"),
    ("workloads:\n  - {name: a, model: svd, rate: 900}\n", "'a' is short by"),
])
def test_fleet_errors_are_one_line(files, capsys, workloads, message):
    (files / "bad.yaml").write_text(workloads)
    assert main(["fleet", "--workloads", str(files / "bad.yaml"), "--inventory", str(files / "inv.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_without_ray_one_line_says_how_to_install(files, capsys, monkeypatch):
    fleet = files / "fleet.json"
    assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / "inv.yaml"),
                 "-o", str(fleet)]) == 0
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    assert main(["serve", str(fleet)]) == 2
    assert "pip install 'vramplan[fleet]'" in capsys.readouterr().err


def test_no_cluster_reachable(files, capsys):
    pytest.importorskip("ray")
    fleet = files / "fleet.json"
    assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / "inv.yaml"),
                 "-o", str(fleet)]) == 0
    (files / "jobs.jsonl").write_text('{"workload": "hd", "image": "x.png"}\n')
    assert main(["batch", str(files / "jobs.jsonl"), "--fleet", str(fleet), "--address", "127.0.0.1:1"]) == 2
    assert "no Ray cluster reachable at 127.0.0.1:1" in capsys.readouterr().err


def test_batch_checks_the_jobs_file_before_starting_ray(files, capsys, monkeypatch):
    """A missing jobs file or a workload typo is reported at once, not after starting a Ray cluster."""
    import vramplan.fleet

    fleet = files / "fleet.json"
    assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / "inv.yaml"),
                 "-o", str(fleet)]) == 0

    def no_ray(*args, **kwargs):
        raise AssertionError("connected to Ray before reading the jobs")

    monkeypatch.setattr(vramplan.fleet, "connect", no_ray)
    (files / "typo.jsonl").write_text('{"workload": "hdd", "image": "x.png"}\n')
    (files / "key.jsonl").write_text('{"workload": "hd", "image": "x.png", "sed": 3}\n')
    (files / "empty.jsonl").write_text("\n")
    for jobs, message in [("empty.jsonl", "empty.jsonl holds no jobs"), ("nope.jsonl", "cannot read jobs file"), ("typo.jsonl", "'hdd' is not in the fleet plan"),
                          ("key.jsonl", "key.jsonl:1: sed: Extra inputs are not permitted")]:
        capsys.readouterr()
        assert main(["batch", str(files / jobs), "--fleet", str(fleet)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    for out in ("fleet.json", "serve.yaml"):  # checked before planning (was a traceback after it)
        emit = ["--emit", "ray"] if out.endswith("yaml") else []
        assert main(["fleet", "--workloads", str(files / "w.yaml"), *emit, "-o", str(files / "missing" / out)]) == 2
        assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(fleet), "--port", "99999"]) == 2
    assert "--port=99999: give a TCP port" in capsys.readouterr().err


def test_prices_given_in_the_inventory_are_not_called_assumptions(files, capsys):
    """The default-price note is for prices the inventory leaves out, even when a given one equals a default."""
    from vramplan.planner.capacity import DEFAULT_PRICES

    note = "default $/hour are assumptions"
    (files / "given.yaml").write_text(f"gpus:\n  - {{gpu: A10G, count: 2, price_per_hour: {DEFAULT_PRICES['A10G']}}}\n")
    (files / "left.yaml").write_text("gpus:\n  - {gpu: A10G, count: 2}\n")
    for inventory, noted in [("given.yaml", False), ("left.yaml", True)]:
        assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / inventory)]) == 0
        assert (note in capsys.readouterr().out) == noted, inventory


@pytest.mark.parametrize("extra", [["--rate", "3"], ["--gpus", "A10G"], ["--steps", "10"], ["--model", "svd-xt"]])
def test_single_model_options_with_workloads_are_refused(files, capsys, extra):
    """--rate, --gpus and the shape options belong to the one-model table; with --workloads they were ignored."""
    assert main(["fleet", "--workloads", str(files / "w.yaml"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and extra[0] in err and "workload file" in err, err


def test_batch_tiny_runs_tiny_pipelines_with_plans_for_them(files, capsys, monkeypatch):
    """--tiny (what the no-GPU warning suggests): the real plans would not fit the tiny pipelines, so the
    fleet's plans are swapped for tiny ones, targets and packing kept."""
    import vramplan.fleet
    import vramplan.fleet.batch
    from vramplan.fleet.batch import BatchSummary

    fleet = files / "fleet.json"
    assert main(["fleet", "--workloads", str(files / "w.yaml"), "--inventory", str(files / "inv.yaml"),
                 "-o", str(fleet)]) == 0
    (files / "jobs.jsonl").write_text('{"workload": "hd", "image": "x.png"}\n')
    seen = {}

    class Cluster:
        def cluster_resources(self):
            return {"GPU": 1}

    def run_batch(plan, jobs, out_dir, *, factory, **kwargs):
        seen.update(plan=plan, factory=factory)
        return BatchSummary(total=1, skipped=0, done=1, failed=0, reports="r.jsonl")

    monkeypatch.setattr(vramplan.fleet, "connect", lambda address: Cluster())
    monkeypatch.setattr(vramplan.fleet.batch, "run_batch", run_batch)
    capsys.readouterr()
    assert main(["batch", str(files / "jobs.jsonl"), "--fleet", str(fleet), "--tiny"]) == 0
    assert "each loads its pipeline before the first job" in capsys.readouterr().err  # no silent wait
    real = FleetPlan.load(fleet)
    assert seen["factory"] == "vramplan.fleet.testing:tiny_pipeline"
    tiny_plan, real_plan = seen["plan"].gpus[0].packings[0].jobs[0].plan, real.gpus[0].packings[0].jobs[0].plan
    assert (tiny_plan.height, real_plan.height) == (32, 576) and tiny_plan.target == real_plan.target


@pytest.mark.parametrize("extra", [["--max-jobs", "1"], ["--slack", "0.2"], ["--gap", "0"]])
def test_mix_options_without_workloads_are_refused(capsys, extra):
    assert main(["fleet", "--gpus", "A10G", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and extra[0] in err and "need --workloads" in err, err


def test_emit_ray_for_a_fleet_that_serves_nothing_is_refused(files, capsys):
    (files / "fast.yaml").write_text("workloads:\n  - {name: fast, model: svd, rate: 1, p95_latency_s: 1}\n")
    fleet = files / "fleet.json"
    assert main(["fleet", "--workloads", str(files / "fast.yaml"), "--inventory", str(files / "inv.yaml"),
                 "-o", str(fleet)]) == 0
    assert "UNSERVED fast" in capsys.readouterr().out
    assert main(["fleet", "--emit", "ray", "--fleet", str(fleet)]) == 2
    assert "serves no workload" in capsys.readouterr().err
