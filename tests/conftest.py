"""Shared fixtures: one Ray per test session, small generated datasets."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session (the first start takes ~30 s here)."""
    import ray

    from laion_ray.ray_env import ensure_ray

    # More logical CPUs than cores so fractional-CPU actors and read tasks overlap.
    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()
