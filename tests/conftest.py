"""Shared test configuration: the ``gpu`` marker skips cleanly without a CUDA device."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return 0


def pytest_collection_modifyitems(config, items):
    if cuda_device_count() > 0:
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device (CuPy reports none or is not installed)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def launcher():
    """The CPU emulation harness's launcher (tests/emulator), shared by every emulated
    test. Skips without a host C++ compiler, or fails where CI demands these tests
    (CUPYDCN_REQUIRE_EMULATED=1)."""
    import os

    from emulator.host_launcher import HostLauncher, compiler_missing

    reason = compiler_missing()
    if reason is not None:
        if os.environ.get("CUPYDCN_REQUIRE_EMULATED") == "1":
            pytest.fail(f"{reason} (CUPYDCN_REQUIRE_EMULATED=1 forbids skipping)", pytrace=False)
        pytest.skip(reason)
    return HostLauncher()
