"""Test session setup: Triton runs in its interpreter when there is no GPU; `gpu` tests skip;
the `gen` fixture gives each test a freshly seeded generator."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (fused_losses imports it lazily).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen():
    """Random generator with a fresh seed per test case; the seed is printed to reproduce a failure."""
    seed = torch.seed() % 2**31
    print(f"input seed: {seed}")
    return torch.Generator().manual_seed(seed)
