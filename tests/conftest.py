import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

try:
    import torch

    # Tiny models: one thread is faster (no sync overhead) and far faster when the cores are shared.
    torch.set_num_threads(1)
except ImportError:  # the planner tests run without torch
    torch = None


@pytest.fixture(scope="session")
def tiny_unet():
    from tiny import tiny_svd_unet

    return tiny_svd_unet()


# Tiny SVD models shared by the executor tests (recompute, placement, depth).
@pytest.fixture(scope="module")
def vae_case():
    from tiny import CASES

    return CASES["AutoencoderKLTemporalDecoder"]()


@pytest.fixture(scope="module")
def meta_vae(vae_case):
    """The tiny SVD VAE's configuration built on meta (fp32): what ``verify`` runs plans on."""
    from vramplan.runtime.models import meta_from_config

    model = vae_case.model
    return meta_from_config({**model.config, "_class_name": type(model).__name__}, "fp32")


@pytest.fixture(scope="module")
def unet_case():
    from tiny import CASES

    return CASES["UNetSpatioTemporalConditionModel"]()


# The tiny SVD pipeline and a 32x32 conditioning image of the pipeline-level tests (run, rehash, calibrate).
@pytest.fixture(scope="module")
def pipe():
    from vramplan.runtime.tiny import tiny_svd_pipeline

    return tiny_svd_pipeline()


@pytest.fixture(scope="module")
def image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def weights():
    """The small trained model that ships with vramplan; tests that run it skip without its files."""
    from vramplan.planner.errors import InputFileError
    from vramplan.runtime import trained

    try:
        trained._check_files(trained.trained_dir())
    except InputFileError as err:
        pytest.skip(f"the trained model is not installed: {err}")
