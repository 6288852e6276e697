"""Fleet files and names an attacker (or a typo) controls: YAML bombs, huge or odd files, error messages
that quote inputs, deployment names for any workload name, placement checked before deploying, and the
serve command's token rules and Ctrl-C. No Ray cluster needed."""

from __future__ import annotations

import os
import re
import threading
import time

import pytest
from vramplan.planner.capacity import (
    MAX_DOCUMENT_BYTES,
    FleetError,
    WorkloadError,
    parse_inventory,
    parse_workloads,
    read_document,
)


def _laughs(levels: int = 9) -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1:levels], strict=False):
        text += f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]\n"
    return text + f"workloads: [{{name: x, model: svd, rate: 1, height: *{names[levels - 1]}}}]\n"


@pytest.mark.parametrize("text, message", [
    (_laughs(9), "expands to more than"),  # 9**9 values
    (_laughs(6), "expands to more than"),  # 9**6 = 531441: still refused, in milliseconds
    ("a: " + "[" * 200 + "]" * 200 + "\n", "nests deeper than"),
    ("a: &x {b: 1}\nc: *y\n", "not valid YAML"),
    ("\xff".encode("latin-1").decode("latin-1") + "x: 1", None),
])
def test_yaml_bombs_are_refused_quickly(tmp_path, text, message):
    path = tmp_path / "w.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    if message is None:
        read_document(path)
        return
    with pytest.raises(FleetError, match=message) as err:
        read_document(path)
    assert time.monotonic() - t0 < 2 and len(str(err.value)) < 600


def test_a_little_yaml_sharing_is_fine(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("base: &b {model: svd, rate: 1}\nworkloads:\n  - {<<: *b, name: a}\n  - {<<: *b, name: b}\n")
    assert [w.name for w in parse_workloads(read_document(path))] == ["a", "b"]


def test_large_odd_and_binary_files_are_refused(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + " " * MAX_DOCUMENT_BYTES + "]")
    with pytest.raises(FleetError, match="at most"):
        read_document(big)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    result = {}
    thread = threading.Thread(target=lambda: result.update(err=pytest.raises(FleetError, read_document, fifo)))
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and "not a regular file" in str(result["err"].value)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\xff\xfe\x00")
    with pytest.raises(FleetError, match="not UTF-8"):
        read_document(binary)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(FleetError, match="nests deeper"):
        read_document(deep)
    with pytest.raises(FleetError, match="cannot read"):
        read_document(tmp_path)


@pytest.mark.parametrize("entry", [
    {"name": "x" * 100_000, "model": "sora", "rate": 1},
    {"name": "a", "model": "m" * 100_000, "rate": 1},
    {"name": "a", "model": "svd", "rate": "9" * 100_000},
    {"name": ["deep"] * 10_000, "model": "svd", "rate": 1},
])
def test_errors_quote_inputs_truncated(entry):
    with pytest.raises(WorkloadError) as err:
        parse_workloads([entry])
    assert len(str(err.value)) < 700, str(err.value)[:200]


def test_inventory_errors_quote_inputs_truncated():
    with pytest.raises(FleetError) as err:
        parse_inventory([{"gpu": "A10G", "count": "n" * 100_000}])
    assert len(str(err.value)) < 700


# -- deployment names ---------------------------------------------------------------------------------


SERVE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def test_deployment_names_are_unique_and_stable():
    from vramplan.fleet.serve import deployment_name

    names = ["视频", "動画", "видео", "a/b", "a b", "a-b", "a--b", "", "-", "." * 300, "x" * 500, "hd", "HD", "hd "]
    out = {deployment_name("A10G", n) for n in names}
    assert len(out) == len(names)
    assert all(SERVE_NAME.fullmatch(n) and len(n) <= 60 for n in out)
    assert deployment_name("A10G", "视频") == deployment_name("A10G", "视频")  # stable across runs
    assert deployment_name("A10G", "hd").startswith("hd--A10G-")
    assert deployment_name("A10G", "hd") != deployment_name("L4", "hd")


def test_a_name_collision_is_refused_at_emit(monkeypatch):
    from vramplan.fleet import serve

    class Fleet:
        def replicas(self):
            return {("A10G", "视频"): None, ("A10G", "動画"): None}

    assert len(serve.deployment_names(Fleet())) == 2
    monkeypatch.setattr(serve, "deployment_name", lambda gpu, workload: "same")
    with pytest.raises(FleetError, match="map to one deployment name"):
        serve.deployment_names(Fleet())


# -- placement before deploying -----------------------------------------------------------------------


def _node(cpu, gpu=0.0, acc=None):
    resources = {"CPU": cpu, "GPU": gpu, "memory": 1e9}
    labels = {"ray.io/node-id": "x"}
    if acc:
        labels["ray.io/accelerator-type"] = acc
    return {"Alive": True, "Resources": resources, "Labels": labels}


def _want(name, replicas=1, cpu=1.0, gpu=0.0, acc=None):
    return {"deployment": name, "replicas": replicas, "resources": {"CPU": cpu, "GPU": gpu},
            "labels": {"ray.io/accelerator-type": acc} if acc else {}}


def test_placement_problems_name_the_deployment_and_the_cluster():
    from vramplan.fleet.serve import placement_problems

    three = [_want("a"), _want("b"), _want("c")]
    problems = placement_problems(three, [_node(2)])
    assert len(problems) == 2 and "deployment c: 1 of 1 replica(s) cannot be placed; each asks CPU 1" in problems[0]
    assert "the cluster has node 1: CPU 2" in problems[1]
    assert placement_problems(three, [_node(2), _node(1)]) == []
    gpus = [_want("hd", 2, gpu=0.6, acc="A10G"), _want("sq", 1, gpu=0.4, acc="A10G")]
    assert placement_problems(gpus, [_node(8, 2, "A10G")]) == []
    problems = placement_problems(gpus, [_node(8, 1, "A10G"), _node(8, 4, "L4")])
    assert "deployment hd: 1 of 2" in problems[0] and "label ray.io/accelerator-type=A10G" in problems[0]
    assert "label ray.io/accelerator-type=L4" in problems[-1]
    dead = dict(_node(8, 2, "A10G"), Alive=False)
    assert "no nodes" in placement_problems(gpus, [dead])[-1]


# -- the serve command ---------------------------------------------------------------------------------


@pytest.fixture
def fleet_file(tmp_path):
    from vramplan.cli import main

    (tmp_path / "w.yaml").write_text("workloads:\n  - {name: hd, model: svd, rate: 3}\n")
    (tmp_path / "inv.yaml").write_text("gpus:\n  - {gpu: A10G, count: 2, price_per_hour: 1.0}\n")
    out = tmp_path / "fleet.json"
    assert main(["fleet", "--workloads", str(tmp_path / "w.yaml"), "--inventory", str(tmp_path / "inv.yaml"),
                 "-o", str(out)]) == 0
    return out


@pytest.fixture
def no_ray(monkeypatch):
    import vramplan.fleet

    def connect(*a, **k):
        raise AssertionError("connected to Ray")

    monkeypatch.setattr(vramplan.fleet, "connect", connect)
    monkeypatch.delenv("VRAMPLAN_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


@pytest.mark.parametrize("args, message", [
    (["--host", "0.0.0.0"], "listens beyond this machine"),
    (["--host", "::"], "listens beyond this machine"),
    (["--host", "example.com"], "listens beyond this machine"),
    (["--token", "short"], "at least 16"),
    (["--token", "x" * 20, "--insecure"], "drop --token"),
    (["--data-dir", "/nonexistent-dir"], "not a folder"),
    (["--job-timeout", "0"], "--job-timeout"),
])
def test_serve_refuses_before_starting_ray(fleet_file, no_ray, capsys, args, message):
    from vramplan.cli import main

    assert main(["serve", str(fleet_file), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_serve_prints_ready_and_stops_on_ctrl_c(fleet_file, monkeypatch, capsys):
    import vramplan.fleet
    import vramplan.fleet.serve as serve
    from vramplan.cli import main

    calls = []

    class Cluster:
        def cluster_resources(self):
            return {"GPU": 1}

    def start(fleet, **kwargs):
        calls.append(("start", kwargs["settings"].token_sha256, kwargs["nodes_may_join"]))
        return f"http://{kwargs['host']}:{kwargs['port']}"

    def sleep(_):
        raise KeyboardInterrupt

    monkeypatch.delenv("VRAMPLAN_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(vramplan.fleet, "connect", lambda address: Cluster())
    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(serve, "stop", lambda local: calls.append(("stop", local)))
    monkeypatch.setattr(time, "sleep", sleep)
    assert main(["serve", str(fleet_file), "--port", "8123"]) == 0
    out, err = capsys.readouterr()
    assert "ready: http://127.0.0.1:8123" in out and "stopping" in err and "Traceback" not in err
    token = re.search(r"token \(shown once\): (\S+)", err).group(1)
    from vramplan.fleet.front import digest

    assert calls == [("start", digest(token), False), ("stop", True)]
    assert err.count(token) == 1 and token not in out

    def interrupted_start(fleet, **kwargs):  # Ctrl-C while the replicas load
        raise KeyboardInterrupt

    monkeypatch.setattr(serve, "start", interrupted_start)
    calls.clear()
    monkeypatch.setenv("VRAMPLAN_TOKEN", "t" * 20)
    assert main(["serve", str(fleet_file)]) == 0
    out, err = capsys.readouterr()
    assert "stopping" in err and "Traceback" not in err and "t" * 20 not in out + err
    assert calls == [("stop", True)]


def test_emit_ray_carries_the_token_digest_never_the_token(fleet_file, tmp_path, monkeypatch, capsys):
    import yaml

    from vramplan.cli import main
    from vramplan.fleet.front import digest

    out = tmp_path / "serve.yaml"
    monkeypatch.setenv("VRAMPLAN_TOKEN", "tok-" * 8)
    assert main(["fleet", "--fleet", str(fleet_file), "--emit", "ray", "-o", str(out)]) == 0
    text = out.read_text()
    config = yaml.safe_load(text)
    assert config["http_options"]["host"] == "127.0.0.1"
    assert config["applications"][0]["args"]["token_sha256"] == digest("tok-" * 8) and "tok-" not in text
    monkeypatch.delenv("VRAMPLAN_TOKEN")
    capsys.readouterr()
    assert main(["fleet", "--fleet", str(fleet_file), "--emit", "ray", "-o", str(out)]) == 0
    token = re.search(r"token \(shown once.*\): (\S+)", capsys.readouterr().err).group(1)
    assert yaml.safe_load(out.read_text())["applications"][0]["args"]["token_sha256"] == digest(token)
    assert main(["fleet", "--fleet", str(fleet_file), "--emit", "ray", "--host", "0.0.0.0", "-o", str(out)]) == 2
    assert "listens beyond this machine" in capsys.readouterr().err
    assert main(["fleet", "--fleet", str(fleet_file), "--emit", "ray", "--host", "0.0.0.0", "--insecure",
                 "-o", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    assert config["http_options"]["host"] == "0.0.0.0" and config["applications"][0]["args"]["insecure"] is True
    assert main(["fleet", "--fleet", str(fleet_file), "--host", "0.0.0.0"]) == 2
    assert "go with --emit ray" in capsys.readouterr().err


def test_wait_ready_names_a_failed_or_slow_deployment(monkeypatch):
    pytest.importorskip("ray")
    import ray
    from ray import serve

    from vramplan.fleet.serve import wait_ready

    class Deployment:
        def __init__(self, status, message=""):
            self.status, self.message, self.replica_states = status, message, {"STARTING": 1}

    class App:
        def __init__(self, status, deployments):
            self.status, self.deployments, self.message = status, deployments, ""

    class Status:
        def __init__(self, app):
            self.applications = {"vramplan": app}

    states = iter([App("DEPLOYING", {"hd-1": Deployment("UPDATING")}),
                   App("DEPLOY_FAILED", {"hd-1": Deployment("DEPLOY_FAILED", "Traceback...\nGpuMismatchError: runs "
                                                                             "on 'T4' but made for A10G"),
                                         "FleetAPI": Deployment("HEALTHY")})])
    monkeypatch.setattr(serve, "status", lambda: Status(next(states)))
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 2.0, "GPU": 0.5, "memory": 1.0})
    said = []
    with pytest.raises(FleetError, match=r"failed to start: hd-1: GpuMismatchError: runs on 'T4'"):
        wait_ready(60, said.append, poll_s=0, report_after_s=0)
    assert said and "waiting for hd-1 (UPDATING" in said[0] and "CPU 2, GPU 0.5" in said[0]
    monkeypatch.setattr(serve, "status", lambda: Status(App("DEPLOYING", {"hd-1": Deployment("UPDATING")})))
    with pytest.raises(FleetError, match=r"not ready after 0.05 s: hd-1"):
        wait_ready(0.05, said.append, poll_s=0.01)
    monkeypatch.setattr(serve, "status", lambda: Status(App("RUNNING", {})))
    wait_ready(1, said.append)


def test_a_serve_config_without_a_token_or_insecure_is_refused(fleet_file, monkeypatch):
    pytest.importorskip("ray")
    from vramplan.fleet.serve import app_builder

    monkeypatch.delenv("VRAMPLAN_TOKEN", raising=False)
    with pytest.raises(FleetError, match="need token_sha256"):
        app_builder({"fleet": str(fleet_file)})
    with pytest.raises(FleetError, match="64 hex digits"):
        app_builder({"fleet": str(fleet_file), "token_sha256": "secret-in-clear"})
    with pytest.raises(FleetError, match="need token_sha256"):
        app_builder({"fleet": str(fleet_file), "token_env": "VRAMPLAN_TOKEN"})  # named, but unset


def test_a_jobs_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    from vramplan.fleet.batch import read_jobs

    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    result = {}
    thread = threading.Thread(target=lambda: result.update(err=pytest.raises(FleetError, read_jobs, fifo, {})))
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and "not a regular file" in str(result["err"].value)
