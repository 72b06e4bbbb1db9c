"""Shared fixtures: seeded generators only, no global state. Under pytest-xdist each worker's torch gets its share
of the cores (``pyproject.toml`` runs one worker per core), so two workers do not oversubscribe them."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
