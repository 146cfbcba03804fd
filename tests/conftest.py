"""Shared fixtures: a seeded generator and the devices to run on (CUDA only where present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20231)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
