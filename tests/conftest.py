"""Shared test configuration.

Tests that need a CUDA GPU carry the `gpu` marker; on a machine without one they are
skipped with a reason saying so (never counted as passed). `scripts/gpu-check` runs the
whole suite on a GPU machine and writes reports/gpu-check.json.
"""

from __future__ import annotations

import functools
import os

import pytest
from hypothesis import HealthCheck, Phase, settings

# Not derandomized: every run draws fresh examples, so the tests must hold for any draw.
# print_blob: a failure in CI prints the @reproduce_failure line that replays it exactly.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# On a leased GPU machine: no shrinking (it re-runs kernels for minutes); report every
# distinct failure with its falsifying example instead.
settings.register_profile(
    "gpu",
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    report_multiple_bugs=True,
    print_blob=True,
)
settings.load_profile(os.environ.get("CUFLASH_HYPOTHESIS_PROFILE", "default"))


@functools.lru_cache(maxsize=None)
def gpu_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # noqa: BLE001 - no CuPy, no driver, or no device
        return 0


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with that reason, where there is none)")


def pytest_collection_modifyitems(config, items):
    if gpu_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def full_path_calls(monkeypatch) -> list[str]:
    """The entry point of each cuflash call that takes the full path (DLPack import,
    validation, the Params record) rather than a cached plan, in order."""
    from cuflash import _api

    calls = []
    real = _api._Call
    monkeypatch.setattr(_api, "_Call", lambda where, *a, **kw: calls.append(where) or real(where, *a, **kw))
    return calls
