"""Every bad input we tried gets a clear VramplanError subclass whose message says what is wrong.

Each case is (what was tried, the error class, a fragment of its message). The torch-free cases
run the planner alone; the runtime ones use tiny models on meta tensors.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import types

import pytest
from vramplan.planner import schema
from vramplan.planner.errors import (
    InputFileError,
    InvalidArgumentError,
    PlanFormatError,
    PlanMismatchError,
    ProfileCacheError,
    UnsupportedGPUFeatureError,
    UnsupportedModelError,
)
from vramplan.planner.pipelines import pipeline_spec
from vramplan.planner.schema import ModelProfile, Plan, write_atomic

from vramplan import VramplanError, load_plan, plan_for

GIB = 2**30

# ---------------------------------------------------------------------------- plan_for arguments
PLAN_FOR_CASES = [
    (dict(steps=-5), InvalidArgumentError, "steps=-5 must be >= 1"),
    (dict(steps=0), InvalidArgumentError, "steps=0 must be >= 1"),
    (dict(steps=2.5), InvalidArgumentError, "steps=2.5 must be an integer"),
    (dict(gpu=None), InvalidArgumentError, "gpu=None must be a GPU name"),
    (dict(gpu=""), InvalidArgumentError, "must be a GPU name"),
    (dict(height="576"), InvalidArgumentError, "height='576' must be an integer, not str"),
    (dict(width=1024.0), InvalidArgumentError, "width=1024.0 must be an integer"),
    (dict(frames=2.5), InvalidArgumentError, "frames=2.5 must be an integer"),
    (dict(frames=-3), InvalidArgumentError, "a video needs at least one frame"),
    (dict(frames=True), InvalidArgumentError, "frames=True must be an integer"),
    (dict(allocator="bogus"), InvalidArgumentError, "allocator='bogus': choose one of expandable_segments"),
    (dict(method="simplex"), InvalidArgumentError, "method='simplex': choose one of auto, ilp, dp"),
    (dict(dtype="int8"), InvalidArgumentError, "dtype='int8': choose one of fp16, bf16, fp32"),
    (dict(guidance="yes"), InvalidArgumentError, "guidance='yes' must be True or False"),
    (dict(vram_gb="8"), InvalidArgumentError, "vram_gb='8' must be a number, not str"),
    (dict(vram_gb=math.nan), InvalidArgumentError, "vram_gb=nan must be a finite number"),
    (dict(vram_gb=math.inf), InvalidArgumentError, "vram_gb=inf must be a finite number"),
    (dict(vram_gb=-4.0), InvalidArgumentError, "vram_gb=-4.0 must be > 0"),
    (dict(vram_gb=0), InvalidArgumentError, "vram_gb=0 must be > 0"),
    (dict(keys=5), InvalidArgumentError, "keys=5 needs rehash="),
    (dict(calibration="cal.json"), InvalidArgumentError, "calibration='cal.json' needs rehash="),
    (dict(max_latency_s=math.nan), InvalidArgumentError, "max_latency_s=nan must be a finite number"),
    (dict(max_latency_s=-1.0), InvalidArgumentError, "max_latency_s=-1.0 must be > 0"),
    (dict(height=570), InvalidArgumentError, "height=570 is not a multiple of 8"),
    (dict(width=32), InvalidArgumentError, "width=32 is too small"),
    (dict(model="svd-xxl"), UnsupportedModelError, "unknown model 'svd-xxl': not a shipped model (animatediff, svd, svd-xt, wan"),
    (dict(model=""), InvalidArgumentError, "model='' must be a model name"),
    (dict(model=None), InvalidArgumentError, "model=None must be a model name"),
    (dict(dtype="bf16"), UnsupportedGPUFeatureError, "RTX 2080 Ti (compute capability 7.5) has no bf16"),
    (dict(model="animatediff", frames=33), InvalidArgumentError,
     "the AnimateDiff motion modules take at most 32 frames (motion_max_seq_length=32)"),
    (dict(gpu="RTX 4900"), VramplanError, "unknown GPU 'RTX 4900'. Did you mean"),
]


@pytest.mark.parametrize("kwargs, error, message", PLAN_FOR_CASES, ids=[repr(c[0]) for c in PLAN_FOR_CASES])
def test_plan_for_refuses_bad_arguments(kwargs, error, message):
    args = {"gpu": "2080Ti", **kwargs}
    with pytest.raises(error) as info:
        plan_for(**args)
    assert message in str(info.value)


def test_animatediff_at_its_frame_limit_plans():
    assert pipeline_spec("AnimateDiffPipeline").max_frames({"motion_max_seq_length": 32}) == 32
    with pytest.raises(InvalidArgumentError, match="at most 32 frames"):
        pipeline_spec("AnimateDiffPipeline").check_frames(33, {"motion_max_seq_length": 32})
    pipeline_spec("AnimateDiffPipeline").check_frames(32, {"motion_max_seq_length": 32})


def test_more_memory_than_the_card_has_warns(caplog):
    with caplog.at_level(logging.WARNING):
        plan = plan_for(gpu="2080Ti", vram_gb=200)
    assert "planning beyond the card's memory" in caplog.text and "RTX 2080 Ti" in caplog.text
    assert plan.target.usable_bytes == 200 * GIB
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        plan_for(gpu="2080Ti", vram_gb=8)
    assert "beyond" not in caplog.text


# ---------------------------------------------------------------------------- gpu="auto" through NVML
def _fake_nvml(monkeypatch, name="NVIDIA GeForce RTX 3060", total=8 * GIB, count=1, init_error=None):
    nvml = types.ModuleType("pynvml")
    calls = []

    def init():
        calls.append("init")
        if init_error:
            raise init_error

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: calls.append("shutdown")
    nvml.nvmlDeviceGetCount = lambda: count
    nvml.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
    nvml.nvmlDeviceGetName = lambda h: name.encode()
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=total, used=0, free=total)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return calls


def test_auto_uses_nvml_memory_not_just_the_name(monkeypatch):
    """An 8 GiB card NVML names "RTX 3060" is planned with 8 GiB, not the 12 GB of the RTX 3060 12GB."""
    calls = _fake_nvml(monkeypatch, total=8 * GIB)
    plan = plan_for(gpu="auto", height=512, width=512)
    assert plan.target.gpu == "RTX 3060 12GB"
    assert 7.5 * GIB < plan.target.usable_bytes < 8 * GIB
    assert plan.prediction.peak_bytes <= plan.target.usable_bytes
    assert calls == ["init", "shutdown"]
    _fake_nvml(monkeypatch, total=12 * GIB)  # the 12 GB card: its profile as is
    assert plan_for(gpu="auto", height=512, width=512).target.usable_bytes > 11.5 * GIB


@pytest.mark.parametrize(
    "fake, message",
    [
        (dict(count=0), "NVML started but sees 0 GPU(s)"),
        (dict(init_error=RuntimeError("NVML Shared Library Not Found")), "found no NVIDIA driver"),
        (dict(name="NVIDIA Quadro Z9000"), "the local GPU 'NVIDIA Quadro Z9000' (8.0 GiB) has no vramplan profile"),
    ],
)
def test_auto_without_a_usable_gpu(monkeypatch, fake, message):
    _fake_nvml(monkeypatch, **fake)
    with pytest.raises(VramplanError) as info:
        plan_for(gpu="auto")
    assert message in str(info.value)


def test_auto_without_nvml_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(VramplanError, match="needs nvidia-ml-py"):
        plan_for(gpu="auto")


# ---------------------------------------------------------------------------- plan files
@pytest.fixture(scope="module")
def svd_plan() -> Plan:
    """SVD at 512x512, its image encoder made unsliced (as a stage that runs whole: every SVD stage is planned)."""
    plan = plan_for(gpu="2080Ti", height=512, width=512, vram_gb=5)
    whole = plan.component("image_encoder").model_copy(
        update={"shape": None, "slices": {}, "groups": [], "host": [], "streamed": [], "recompute": []})
    return plan.model_copy(update={"components": [whole if c.component == "image_encoder" else c
                                                  for c in plan.components]})


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


PLAN_FILE_CASES = [
    ("not UTF-8", lambda p, plan: _write(p, "latin1.json", plan.to_json().replace('"svd"', '"svd\xe9"').encode("latin-1")),
     "is not UTF-8 text"),
    ("deeply nested", lambda p, plan: _write(p, "deep.json", b"[" * 200_000 + b"]" * 200_000),
     "nests deeper than 32 levels"),
    ("huge", lambda p, plan: _write(p, "huge.json", b" " * (schema.MAX_FILE_BYTES + 1)), "is larger than 64 MiB"),
    ("/dev/zero", lambda p, plan: "/dev/zero", "is larger than 64 MiB"),
    ("a folder", lambda p, plan: p, "is a folder, not a plan file"),
    ("missing", lambda p, plan: p / "nope.json", "cannot read plan file"),
    ("not JSON", lambda p, plan: _write(p, "text.json", b"hello"), "is not valid JSON"),
    ("a list", lambda p, plan: _write(p, "list.json", b"[1, 2]"), "must hold a JSON object, not list"),
    ("future version", lambda p, plan: _write(p, "v9.json", json.dumps({**json.loads(plan.to_json()),
                                                                        "schema_version": 9}).encode()),
     "upgrade vramplan"),
    ("SVD plan claiming AnimateDiffPipeline",
     lambda p, plan: _write(p, "claim.json", plan.to_json().replace("StableVideoDiffusionPipeline",
                                                                    "AnimateDiffPipeline").encode()),
     "the plan says AnimateDiffPipeline, whose components are unet, vae, text_encoder, vae_rows, but it has image_encoder"),
    ("unknown pipeline", lambda p, plan: _write(p, "unknown.json", plan.to_json().replace(
        "StableVideoDiffusionPipeline", "CogVideoXPipeline").encode()),
     "vramplan does not know the pipeline 'CogVideoXPipeline'"),
    ("zero steps", lambda p, plan: _write(p, "steps.json", plan.to_json().replace('"steps": 25', '"steps": 0').encode()),
     "field 'target.steps': Input should be greater than or equal to 1"),
    ("negative frames", lambda p, plan: _write(p, "frames.json", plan.to_json().replace('"frames": 14', '"frames": -14', 1)
                                               .encode()), "greater than or equal to 1"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in PLAN_FILE_CASES], ids=[c[0] for c in PLAN_FILE_CASES])
def test_bad_plan_files(tmp_path, svd_plan, make, message):
    path = make(tmp_path, svd_plan)
    with pytest.raises(PlanFormatError) as info:
        load_plan(path)
    assert message in str(info.value)


def test_plan_files_are_written_atomically(tmp_path, svd_plan, monkeypatch):
    path = svd_plan.save(tmp_path / "plan.json")
    before = path.read_text()
    replaced = []
    import os

    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append((a, b)) or real_replace(a, b))
    svd_plan.save(path)
    assert replaced and replaced[0][1] == path and replaced[0][0] != str(path)

    def crash(a, b):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_atomic(path, "half")
    assert path.read_text() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind


def test_describe_names_components_without_a_shape(svd_plan):
    """A whole-pipeline plan's unsliced components (image encoder) describe themselves without a shape."""
    comp = svd_plan.component("image_encoder")
    assert comp.describe().startswith("image_encoder: svd (CLIPVisionModelWithProjection") and "(not sliced)" in comp.describe()
    only_encoder = Plan(components=[comp])
    assert "not sliced" in only_encoder.describe()


def test_negative_sizes_in_a_profile_are_refused(tmp_path):
    from vramplan.planner.plan import shipped_pipeline_profile

    unet = shipped_pipeline_profile("svd", 512, 512, 14, True, "fp16", "flash").stages[2].profile
    data = json.loads(unet.model_dump_json())
    for field, value in (("weight_bytes", -1), ("original_peak_bytes", -5)):
        bad = {**data, field: value}
        path = _write(tmp_path, f"{field}.json", json.dumps(bad).encode())
        with pytest.raises(PlanFormatError, match=f"field '{field}': Input should be greater than or equal to 0"):
            ModelProfile.load(path)
    data["units"][3]["scratch"]["2"] = -100
    with pytest.raises(PlanFormatError, match="greater than or equal to 0"):
        ModelProfile.load(_write(tmp_path, "scratch.json", json.dumps(data).encode()))


def test_unknown_hugging_face_id_is_not_downloaded(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="no model_index.json for it in the local Hugging Face cache"):
        plan_for(gpu="2080Ti", model="someone/not-cached-video-model")


def test_local_folder_without_component_configs(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableVideoDiffusionPipeline"}))
    with pytest.raises(UnsupportedModelError, match="lacks unet/config.json, vae/config.json, image_encoder/config.json"):
        plan_for(gpu="2080Ti", model=str(tmp_path), frames=4)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    with pytest.raises(UnsupportedModelError, match="does not know the pipeline 'CogVideoXPipeline'"):
        plan_for(gpu="2080Ti", model=str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    with pytest.raises(UnsupportedModelError, match="lacks transformer/config.json, vae/config.json"):
        plan_for(gpu="RTX 4090", model=str(tmp_path), dtype="bf16")


def test_input_file_errors_are_value_errors():
    assert issubclass(InputFileError, VramplanError) and issubclass(PlanMismatchError, ValueError)
    assert issubclass(ProfileCacheError, OSError)


# ---------------------------------------------------------------------------- the profile cache (runtime)
TINY_SHAPE = dict(batch=1, frames=3, latent_height=8, latent_width=8, dtype="fp32")


@pytest.fixture(scope="module")
def meta_unet():
    torch = pytest.importorskip("torch")
    from diffusers import UNetSpatioTemporalConditionModel
    from tiny import SVD_TINY
    from vramplan.runtime import empty_model

    return empty_model(UNetSpatioTemporalConditionModel, SVD_TINY, torch.float32)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "profiles"


def _count_profiles(monkeypatch):
    from vramplan.runtime import profiler

    calls = []
    real = profiler.profile
    monkeypatch.setattr(profiler, "profile", lambda *a, **k: calls.append(k.get("max_k")) or real(*a, **k))
    return calls


def test_cache_key_has_every_option_and_profiler_version(meta_unet, cache, monkeypatch):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import profiler

    shape = SampleShape(**TINY_SHAPE)
    calls = _count_profiles(monkeypatch)
    small = profiler.cached_profile(meta_unet, shape, "cpu_flash", max_k=1)
    big = profiler.cached_profile(meta_unet, shape, "cpu_flash", max_k=4)
    again = profiler.cached_profile(meta_unet, shape, "cpu_flash", max_k=4)
    assert calls == [1, 4]  # max_k=4 is not served the max_k=1 profile; the second max_k=4 is cached
    assert max(max(u.scratch) for u in small.units) == 1 < max(max(u.scratch) for u in big.units)
    assert again == big
    names = sorted(p.name for p in cache.iterdir())
    assert len(names) == 2 and all(f"-v{profiler.PROFILER_VERSION}.json" in n for n in names)
    assert any("-k1-" in n for n in names) and any("-k4-" in n for n in names)


@pytest.mark.parametrize("max_k", [0, -4, 2.5, "8"])
def test_max_k_is_checked(meta_unet, cache, max_k):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import profiler

    with pytest.raises(InvalidArgumentError, match="max_k="):
        profiler.cached_profile(meta_unet, SampleShape(**TINY_SHAPE), "cpu_flash", max_k=max_k)
    with pytest.raises(InvalidArgumentError, match="max_k="):
        profiler.profile(meta_unet, SampleShape(**TINY_SHAPE), "cpu_flash", max_k=max_k)
    assert not cache.exists() or not list(cache.iterdir())


@pytest.fixture(scope="module")
def good_profile(meta_unet):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import profiler

    return profiler.profile(meta_unet, SampleShape(**TINY_SHAPE), "cpu_flash", max_k=1)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda text: text[: len(text) // 2],  # half written
        lambda text: text.replace('"output_bytes": ', '"output_bytes": -', 1),  # a negative size
        lambda text: "\udcff".encode("utf-8", "surrogateescape").decode("latin-1") + text,  # not UTF-8
        lambda text: text.replace('"frames": 3', '"frames": 4', 1),  # another shape under this key
    ],
    ids=["truncated", "negative size", "not UTF-8", "another shape"],
)
def test_corrupt_cache_entry_is_profiled_again_with_a_warning(meta_unet, good_profile, cache, monkeypatch, caplog,
                                                              corrupt):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import fingerprint, profiler

    shape = SampleShape(**TINY_SHAPE)
    good = good_profile
    path = profiler.cache_path(fingerprint(meta_unet), shape, "cpu_flash", max_k=1)
    path.parent.mkdir(parents=True)
    path.write_bytes(corrupt(good.model_dump_json(indent=1)).encode("latin-1", "surrogateescape"))
    calls = _count_profiles(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = profiler.cached_profile(meta_unet, shape, "cpu_flash", max_k=1)
    assert calls == [1] and again == good
    assert "profile cache entry" in caplog.text and "profiling again" in caplog.text
    assert ModelProfile.load(path) == good  # rewritten


def test_cache_folder_that_is_a_file_fails_before_profiling(meta_unet, tmp_path, monkeypatch):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import profiler

    blocker = tmp_path / "cachefile"
    blocker.write_text("not a folder")
    monkeypatch.setenv("VRAMPLAN_CACHE", str(blocker))
    calls = _count_profiles(monkeypatch)
    with pytest.raises(ProfileCacheError, match=f"{blocker} is a file. Set VRAMPLAN_CACHE to a writable folder"):
        profiler.cached_profile(meta_unet, SampleShape(**TINY_SHAPE), "cpu_flash", max_k=2)
    with pytest.raises(ProfileCacheError, match="is a file"):
        profiler.cached_pipeline_profile("svd", 768, 768, 14, True, "fp16", "flash")
    assert calls == []


def test_read_only_cache_fails_before_profiling(meta_unet, cache, monkeypatch):
    """Tests run as root, which ignores permission bits: the probe's PermissionError is simulated."""
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import profiler

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(profiler.tempfile, "NamedTemporaryFile", denied)
    calls = _count_profiles(monkeypatch)
    with pytest.raises(ProfileCacheError, match="is not writable \\(Permission denied\\)"):
        profiler.cached_profile(meta_unet, SampleShape(**TINY_SHAPE), "cpu_flash", max_k=2)
    assert calls == []


def test_cache_write_failing_after_profiling_keeps_the_profile(meta_unet, cache, monkeypatch, caplog):
    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import profiler

    def full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ModelProfile, "save", full)
    with caplog.at_level(logging.WARNING):
        prof = profiler.cached_profile(meta_unet, SampleShape(**TINY_SHAPE), "cpu_flash", max_k=1)
    assert prof.units and "the profile is returned uncached" in caplog.text


def test_profiling_shows_a_progress_bar_on_a_terminal(meta_unet, monkeypatch, caplog):
    import io

    from vramplan.planner.schema import SampleShape
    from vramplan.runtime import profiler

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with caplog.at_level(logging.INFO, logger="vramplan.runtime.profiler"):
        profiler.profile(meta_unet, SampleShape(**TINY_SHAPE), "cpu_flash", max_k=2)
    assert "profiling unet" in term.getvalue() and "trace" in term.getvalue()
    assert "slice target" in caplog.text  # and the log gets the steps
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar
    assert isinstance(profiler._progress_bar(5, "x"), profiler._NoBar)


# ---------------------------------------------------------------------------- run() and apply_plan (runtime)
def test_run_with_zero_steps_is_refused():
    pytest.importorskip("torch")
    from vramplan.runtime import run, uniform_pipeline_plan
    from vramplan.runtime.tiny import tiny_svd_pipeline

    pipe = tiny_svd_pipeline()
    plan = uniform_pipeline_plan(pipe, 2, 32, 32, 3)
    for steps in (0, -2, 1.5):
        with pytest.raises(InvalidArgumentError, match="a run needs at least one denoising step"):
            run(plan, pipe=pipe, image=None, num_inference_steps=steps, progress=False)
    assert "forward" not in pipe.unet.__dict__


def test_apply_plan_with_no_matching_component_names_them(svd_plan):
    """A whole-pipeline plan none of whose components is this model: the error lists what it was made for."""
    pytest.importorskip("torch")
    from tiny import tiny_svd_unet
    from vramplan.runtime import apply_plan

    with pytest.raises(PlanMismatchError) as info:
        apply_plan(tiny_svd_unet(), svd_plan)
    message = str(info.value)
    assert "unet: svd (UNetSpatioTemporalConditionModel" in message and "image_encoder: svd (CLIPVision" in message
    assert "(not sliced)" in message


def test_apply_plan_with_an_unsliced_component_plan_says_so(svd_plan):
    """A component plan with no shape (a stage that runs whole) given for another model: a mismatch, not
    an AttributeError while writing the message."""
    pytest.importorskip("torch")
    from tiny import tiny_svd_unet
    from vramplan.runtime import apply_plan

    with pytest.raises(PlanMismatchError, match=r"image_encoder: .*\(not sliced\)"):
        apply_plan(tiny_svd_unet(), svd_plan.component("image_encoder"))


# ---------------------------------------------------------------------------- a local pipeline folder
def test_plan_for_a_local_pipeline_folder(tmp_path, monkeypatch):
    """``model=<folder written by save_pretrained>``: configs read (the latent scale from the VAE's),
    components built on meta, profiled with progress bars, cached; the plan verifies against the folder
    and runs the pipeline itself; the same configs under a cached Hugging Face id reuse the profile."""
    torch = pytest.importorskip("torch")
    import io

    from PIL import Image
    from vramplan.runtime import run
    from vramplan.runtime.tiny import tiny_svd_pipeline
    from vramplan.runtime.verify import failures, verify_all

    pipe = tiny_svd_pipeline()
    folder = tmp_path / "tiny-svd"
    pipe.save_pretrained(folder)
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)  # a new shape on a terminal: progress bars
    plan = plan_for(gpu="2080Ti", model=str(folder), height=32, width=32, dtype="fp32")
    monkeypatch.setattr(sys, "stderr", sys.__stderr__)
    assert f"profiling {folder}" in term.getvalue() and "profiling unet" in term.getvalue()
    assert "profiling vae" in term.getvalue()
    assert plan.pipeline == "StableVideoDiffusionPipeline" and plan.frames == 5  # the UNet config's num_frames
    assert plan.component("unet").shape.latent_height == 16  # the tiny VAE halves once (diffusers: 2 ** (2 - 1))
    cached = list((tmp_path / "cache" / "profiles").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("StableVideoDiffusionPipeline-")
    from vramplan import InfeasibleError

    with pytest.raises(InfeasibleError) as info:  # the smallest reachable peak (the CUDA context dominates)
        plan_for(gpu="2080Ti", model=str(folder), height=32, width=32, dtype="fp32", vram_gb=0.1)
    usable = info.value.min_peak_bytes / 0.98 + 2**20  # just above it, the 2% margin included
    tight = plan_for(gpu="2080Ti", model=str(folder), height=32, width=32, dtype="fp32", vram_gb=usable / GIB)
    assert tight.prediction.peak_bytes < plan.prediction.peak_bytes
    assert tight.component("unet").slices and tight.component("vae").slices
    reports = verify_all(tight)
    assert {r.component for r in reports} >= {"unet", "vae"}
    assert failures(tight, reports, tolerance=0.05) == []

    image = Image.new("RGB", (32, 32), (90, 160, 30))
    result = run(tight, pipe=pipe, image=image, num_inference_steps=1, output_type="pt", progress=False,
                 generator=torch.Generator().manual_seed(0))
    expected = pipe(image=image, height=32, width=32, num_frames=5, decode_chunk_size=5, num_inference_steps=1,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    torch.testing.assert_close(result.frames, expected, rtol=1e-5, atol=1e-5)

    # The same configs as a Hugging Face id in the local cache (laid out as huggingface_hub does):
    # read from the cache, never downloaded; same configs, so the cached profile is reused.
    import shutil

    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--someone--tiny-svd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40), ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    by_id = plan_for(gpu="2080Ti", model="someone/tiny-svd", height=32, width=32, dtype="fp32")
    assert by_id.model_name == "someone/tiny-svd" and by_id.prediction == plan.prediction
    assert len(list((tmp_path / "cache" / "profiles").iterdir())) == 1



def test_profiler_refuses_shapes_the_pipeline_cannot_take():
    """Called directly, the profiler checks the pipeline's shape rules before building anything."""
    pytest.importorskip("torch")
    from vramplan.runtime.profiler import pipeline_profile

    with pytest.raises(InvalidArgumentError, match="motion_max_seq_length=32"):
        pipeline_profile("animatediff", 512, 512, 40)
    with pytest.raises(InvalidArgumentError, match="height=500 is not a multiple of 8"):
        pipeline_profile("svd", 500, 512, 14)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(videos_per_hour=-5), "videos_per_hour=-5 must be > 0"),
        (dict(videos_per_hour=math.inf), "videos_per_hour=inf must be a finite number"),
        (dict(videos_per_hour="10"), "videos_per_hour='10' must be a number"),
        (dict(steps=0), "steps=0 must be >= 1"),
    ],
)
def test_fleet_capacity_refuses_bad_rates(kwargs, message):
    """Was: rate -5 -> "GPUs needed 0", rate inf -> OverflowError."""
    from vramplan.planner.fleet import capacity

    with pytest.raises(InvalidArgumentError) as info:
        capacity(model="svd", gpus=["2080Ti"], **kwargs)
    assert message in str(info.value)
