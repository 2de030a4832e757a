"""Shared test configuration.

* The ``gpu`` marker skips cleanly without a CUDA device.
* ``launcher``: the KernelLauncher the kernel tests run on, parametrised over the CPU
  emulator (tests/emulator; id ``emulator``, marked ``emulated``) and CuPy on a device (id
  ``cupy``, marked ``gpu``): the emulated tests are the GPU tests. A test using it must
  not carry the ``emulated`` mark itself (CI fails on skipped ``emulated`` tests, and the
  ``cupy`` variant skips without a device).
* ``host_launcher``: the emulator's launcher only, for tests of emulator-specific
  behaviour (checked mode, sanitizers, thread order); such tests carry ``emulated``.
"""

from __future__ import annotations

import functools
import os

import pytest


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return 0


NO_DEVICE = "no CUDA device (CuPy reports none or is not installed)"


def pytest_collection_modifyitems(config, items):
    if cuda_device_count() > 0:
        return
    skip_gpu = pytest.mark.skip(reason=NO_DEVICE)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def host_launcher():
    """The CPU emulation harness's launcher (tests/emulator), shared by every emulated
    test. Skips without a host C++ compiler, or fails where CI demands these tests
    (CUPYDCN_REQUIRE_EMULATED=1)."""
    from emulator.host_launcher import HostLauncher, compiler_missing

    reason = compiler_missing()
    if reason is not None:
        if os.environ.get("CUPYDCN_REQUIRE_EMULATED") == "1":
            pytest.fail(f"{reason} (CUPYDCN_REQUIRE_EMULATED=1 forbids skipping)", pytrace=False)
        pytest.skip(reason)
    return HostLauncher()


LAUNCHERS = [
    pytest.param("emulator", marks=pytest.mark.emulated, id="emulator"),
    pytest.param("cupy", marks=pytest.mark.gpu, id="cupy"),
]


@pytest.fixture(scope="session", params=LAUNCHERS)
def launcher(request):
    """The emulator's launcher, or CuPy's on the current device (recording its launches
    like the emulator's)."""
    if request.param == "emulator":
        return request.getfixturevalue("host_launcher")
    if cuda_device_count() == 0:
        pytest.skip(NO_DEVICE)
    from cupydcn.cuda.cupy_launcher import cupy_launcher
    from support import RecordingLauncher

    return RecordingLauncher(cupy_launcher())


@pytest.fixture
def im2col_only():
    """deform_conv2d's CUDA path forced to its column algorithm (im2col, GEMMs, col2im):
    for the files that test that path, whose small grouped cases "auto" would send to the
    depthwise kernels (tested in tests/test_conv_depthwise_emulated.py)."""
    from cupydcn.deform_conv.algorithm import conv_algorithm

    with conv_algorithm("im2col"):
        yield
