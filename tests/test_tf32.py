"""The TF32 opt-in (cupydcn.set_allow_tf32 / allow_tf32) and cupydcn.torch following
PyTorch's float32 matmul setting. What the flag does to the GEMMs is tested in
tests/test_gemm.py (the error bound) and tests/test_call_records.py (it reaches them)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import cupydcn


def test_default_off_global_and_scoped():
    assert cupydcn.is_tf32_allowed() is False
    try:
        cupydcn.set_allow_tf32(True)
        assert cupydcn.is_tf32_allowed()
        with cupydcn.allow_tf32(False):
            assert not cupydcn.is_tf32_allowed()
        assert cupydcn.is_tf32_allowed()
    finally:
        cupydcn.set_allow_tf32(False)
    with cupydcn.allow_tf32():
        assert cupydcn.is_tf32_allowed()
        seen = []
        thread = threading.Thread(target=lambda: seen.append(cupydcn.is_tf32_allowed()))
        thread.start()
        thread.join()
        assert seen == [False]  # the scope is per thread
    assert not cupydcn.is_tf32_allowed()


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_refuses_non_bools(bad):
    with pytest.raises(cupydcn.CupydcnTypeError, match="enabled must be a bool"):
        cupydcn.set_allow_tf32(bad)
    with pytest.raises(cupydcn.CupydcnTypeError, match="enabled must be a bool"):
        with cupydcn.allow_tf32(bad):
            pass


def test_numpy_results_ignore_the_setting():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    offset = rng.standard_normal((1, 18, 6, 6)).astype(np.float32)
    weight = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    exact = cupydcn.deform_conv2d(x, offset, weight, padding=1)
    with cupydcn.allow_tf32():
        assert cupydcn.deform_conv2d(x, offset, weight, padding=1).tobytes() == exact.tobytes()


@pytest.mark.parametrize(
    "allow, precision, expected",
    [
        (False, "highest", False),
        (True, "highest", True),
        (False, "high", True),
        (False, "medium", True),
    ],
)
def test_torch_ops_follow_pytorch(monkeypatch, allow, precision, expected):
    torch = pytest.importorskip("torch")
    from cupydcn.torch import _ops

    seen = []
    real = cupydcn.deform_conv2d

    def spy(*args, **kwargs):
        seen.append(cupydcn.is_tf32_allowed())
        return real(*args, **kwargs)

    monkeypatch.setattr(cupydcn, "deform_conv2d", spy)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)  # (resets allow_tf32 on some releases)
        if allow:
            torch.backends.cuda.matmul.allow_tf32 = True
        assert _ops.torch_allows_tf32() is expected
        x = torch.randn(1, 2, 5, 5)
        offset = torch.zeros(1, 18, 5, 5)
        weight = torch.randn(3, 2, 3, 3)
        import cupydcn.torch as ct

        ct.deform_conv2d(x, offset, weight, padding=1)
    finally:
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
    assert seen == [expected]
    assert not cupydcn.is_tf32_allowed()  # only during the op
