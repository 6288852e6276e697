"""The RTX 3050 4GB laptop GPU profile, and a labelled host-link bandwidth on every GPU."""

from __future__ import annotations

import pytest
from vramplan.planner.errors import InfeasibleError
from vramplan.planner.gpus import all_gpus, find_gpu

from vramplan import plan_for
from vramplan.cli import main

GIB = 2**30


@pytest.mark.parametrize("name", ["3050 laptop", "RTX 3050 Laptop GPU", "NVIDIA GeForce RTX 3050 Laptop GPU",
                                  "rtx 3050 mobile"])
def test_aliases_and_nvml_name(name):
    gpu = find_gpu(name)
    assert gpu.name == "RTX 3050 Laptop"
    assert gpu.memory_usable_bytes == 3902 * 2**20  # cudaMemGetInfo total: 3.81 GiB
    assert gpu.memory_usable_bytes < gpu.memory_total_bytes == 4 * GIB
    assert gpu.pcie_gbps < 15.75  # PCIe 4.0 x8 at best: 15.75 GB/s per direction


def test_desktop_3050_is_not_aliased():
    # the desktop RTX 3050 is a different card (8 GB): it must not resolve to the laptop profile
    with pytest.raises(KeyError):
        find_gpu("3050")


def test_every_gpu_labels_its_host_link():
    for gpu in all_gpus():
        labels = [s for s in gpu.sources if s.startswith("pcie_gbps")]
        assert len(labels) == 1, gpu.name
        assert "PCIe" in labels[0] and ("estimate" in labels[0] or "measured" in labels[0]), gpu.name


@pytest.mark.parametrize("model", ["svd", "svd-xt", "animatediff"])
def test_paper_settings_fit_the_laptop_gpu(model):
    """576x1024 on a 4 GB laptop GPU: weight streaming and host placement make room (exact plans)."""
    plan = plan_for(gpu="3050 laptop", model=model, height=576, width=1024)
    assert plan.target.gpu == "RTX 3050 Laptop"
    assert plan.prediction.peak_bytes <= find_gpu("3050 laptop").memory_usable_bytes
    assert any(c.streamed for c in plan.components)
    assert plan.rehash is None  # exact


def test_below_the_floor_names_the_laptop_gpu():
    with pytest.raises(InfeasibleError, match="RTX 3050 Laptop"):
        plan_for(gpu="3050 laptop", model="svd-xt", height=576, width=1024, vram_gb=1.0)


def test_cli_lists_it(capsys):
    assert main(["gpus"]) == 0
    assert "RTX 3050 Laptop" in capsys.readouterr().out
