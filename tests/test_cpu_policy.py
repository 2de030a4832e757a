"""The BLAS threading policy (cupydcn/core/threads.py): its logic, with and without
threadpoolctl. No timings."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from cupydcn.core import threads


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch):
    """Each test starts from "not chosen" and the real controller lookup."""
    monkeypatch.setattr(threads, "_policy", None)
    monkeypatch.setattr(threads, "_controller_cache", [])
    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    yield


@pytest.mark.parametrize(
    "value, expected",
    [
        ("auto", "auto"),
        (" AUTO ", "auto"),
        ("blas", "blas"),
        ("1", 1),
        ("8", 8),
        (3, 3),
        (np.int64(2), 2) if isinstance(np.int64(2), int) else (2, 2),
    ],
)
def test_parse_policy(value, expected):
    assert threads.parse_policy(value) == expected


@pytest.mark.parametrize("value", ["", "0", "-1", "two", "1.5", 0, -3, True, None, 2.0])
def test_parse_policy_refuses(value):
    with pytest.raises(ValueError, match=threads.ENV_VAR):
        threads.parse_policy(value)


def test_threads_for():
    small, large = threads.SMALL_GEMM_FLOPS - 1, threads.SMALL_GEMM_FLOPS
    assert threads.threads_for(small, "auto") == 1
    assert threads.threads_for(large, "auto") is None
    assert threads.threads_for(small, "blas") is None
    assert threads.threads_for(large, "blas") is None
    assert threads.threads_for(small, 3) == 3
    assert threads.threads_for(large, 3) == 3


def test_default_and_environment(monkeypatch):
    assert threads.get_blas_threads() == "auto"
    monkeypatch.setattr(threads, "_policy", None)
    monkeypatch.setenv(threads.ENV_VAR, "blas")
    assert threads.get_blas_threads() == "blas"
    monkeypatch.setattr(threads, "_policy", None)
    monkeypatch.setenv(threads.ENV_VAR, "2")
    assert threads.get_blas_threads() == 2


def test_bad_environment_warns_and_means_auto(monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, "lots")
    with pytest.warns(RuntimeWarning, match="using 'auto'"):
        assert threads.get_blas_threads() == "auto"


def test_set_blas_threads_overrides_environment(monkeypatch):
    monkeypatch.setenv(threads.ENV_VAR, "blas")
    assert threads.set_blas_threads(4) == "blas"
    assert threads.get_blas_threads() == 4
    assert threads.set_blas_threads(None) == 4  # back to the variable
    assert threads.get_blas_threads() == "blas"
    with pytest.raises(ValueError):
        threads.set_blas_threads("many")
    assert threads.get_blas_threads() == "blas"


class FakeLib:
    def __init__(self, num_threads):
        self.num_threads = num_threads


class FakeController:
    """Records the limits asked for, like threadpoolctl's ThreadpoolController.select()."""

    def __init__(self, *counts):
        self.lib_controllers = [FakeLib(n) for n in counts]
        self.limits = []

    @contextlib.contextmanager
    def limit(self, *, limits, user_api):
        assert user_api == "blas"
        self.limits.append(limits)
        saved = [lib.num_threads for lib in self.lib_controllers]
        for lib in self.lib_controllers:
            lib.num_threads = limits
        try:
            yield
        finally:
            for lib, n in zip(self.lib_controllers, saved):
                lib.num_threads = n


def use(monkeypatch, controller):
    monkeypatch.setattr(threads, "_controller_cache", [controller])


def test_auto_limits_small_products_only(monkeypatch):
    fake = FakeController(2)
    use(monkeypatch, fake)
    with threads.blas_threads_for(threads.SMALL_GEMM_FLOPS // 2):
        assert fake.lib_controllers[0].num_threads == 1
    assert fake.lib_controllers[0].num_threads == 2  # undone after the product
    with threads.blas_threads_for(threads.SMALL_GEMM_FLOPS):
        assert fake.lib_controllers[0].num_threads == 2
    assert fake.limits == [1]


def test_blas_policy_never_touches(monkeypatch):
    fake = FakeController(2)
    use(monkeypatch, fake)
    threads.set_blas_threads("blas")
    with threads.blas_threads_for(1):
        pass
    assert fake.limits == []


def test_integer_policy_limits_every_product(monkeypatch):
    fake = FakeController(8, 4)
    use(monkeypatch, fake)
    threads.set_blas_threads(3)
    with threads.blas_threads_for(10 * threads.SMALL_GEMM_FLOPS):
        assert [lib.num_threads for lib in fake.lib_controllers] == [3, 3]
    assert fake.limits == [3]


def test_already_within_the_limit_is_a_no_op(monkeypatch):
    fake = FakeController(1)
    use(monkeypatch, fake)
    with threads.blas_threads_for(1):
        pass
    assert fake.limits == []


def test_without_threadpoolctl(monkeypatch):
    """No threadpoolctl (or no BLAS found): every policy is a no-op, nothing fails."""
    use(monkeypatch, None)
    assert not threads.has_thread_control()
    for policy in ("auto", "blas", 2):
        threads.set_blas_threads(policy)
        with threads.blas_threads_for(1):
            pass


def test_controller_lookup_without_threadpoolctl(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_threadpoolctl(name, *args, **kwargs):
        if name == "threadpoolctl":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_threadpoolctl)
    assert threads._controller() is None
    assert threads._controller() is None  # looked up once


def test_real_controller_if_installed():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    controller = threads._controller()
    if controller is None:
        pytest.skip("threadpoolctl finds no BLAS library")
    before = [lib.num_threads for lib in controller.lib_controllers]
    threads.set_blas_threads(1)
    with threads.blas_threads_for(1):
        assert all(
            i["num_threads"] == 1
            for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"
        )
    assert [lib.num_threads for lib in controller.lib_controllers] == before


def test_conv_backend_runs_its_products_under_the_policy(monkeypatch):
    """The NumPy conv backend asks the policy once per call, with the FLOP count of one of
    its BLAS products (per image and weight group)."""
    from cupydcn.deform_conv import numpy_backend
    from cupydcn.deform_conv.spec import conv_geometry

    asked = []

    def record(flops):
        asked.append(flops)
        return contextlib.nullcontext()

    monkeypatch.setattr(numpy_backend, "blas_threads_for", record)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 6, 7))
    offset = rng.standard_normal((2, 18, 6, 7))
    weight = rng.standard_normal((5, 4, 3, 3))
    geom = conv_geometry(x, offset, weight, None, None, stride=1, padding=1, dilation=1)
    numpy_backend.conv_forward(x, offset, weight, None, None, geom, workspace_bytes=1 << 30)
    assert asked == [2 * 5 * 36 * 42]  # one product: C_out 5, C*K 36, P 42
    asked.clear()
    numpy_backend.conv_backward(
        np.ones((2, 5, 6, 7)),
        x,
        offset,
        weight,
        None,
        geom,
        wrt=frozenset({"input", "weight"}),
        workspace_bytes=1 << 30,
    )
    assert asked == [2 * 5 * 36 * 42]
