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
def unet_case():
    from tiny import CASES

    return CASES["UNetSpatioTemporalConditionModel"]()
