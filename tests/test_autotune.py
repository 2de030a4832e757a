"""The "auto" choice of deform_conv2d's CUDA algorithm (cupydcn/deform_conv/autotune.py):
timed once per problem, remembered in memory and on disk, heuristic without a timer, and
the explicit algorithms refused where they do not apply. A fake timer stands in for CUDA
events (the null launcher runs nothing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cupydcn
from cupydcn.cuda.launch import NullLauncher, record_calls
from cupydcn.deform_conv import autotune, cuda_backend
from cupydcn.deform_conv.spec import ConvGeometry


class TimedNullLauncher(NullLauncher):
    """A null launcher whose ``time_call`` runs the call once under a recorder and
    reports the time listed for the first kernel it launched."""

    def __init__(self, seconds: dict[str, float]):
        super().__init__()
        self.seconds = seconds
        self.timed: list[str] = []

    def time_call(self, fn) -> float:
        with record_calls() as calls:
            fn()
        first = calls.sequence[0][0]
        self.timed.append(first)
        return self.seconds[first]


@pytest.fixture(autouse=True)
def fresh_choices(monkeypatch):
    monkeypatch.delenv("CUPYDCN_AUTOTUNE_CACHE", raising=False)
    autotune.forget_choices()
    yield
    autotune.forget_choices()


def _geometry(groups: int = 8, batch: int = 2) -> ConvGeometry:
    return ConvGeometry(
        batch=batch,
        in_channels=8,
        height=6,
        width=6,
        out_channels=8,
        groups=groups,
        offset_groups=1,
        kernel_h=3,
        kernel_w=3,
        stride_h=1,
        stride_w=1,
        pad_h=1,
        pad_w=1,
        dil_h=1,
        dil_w=1,
        out_h=6,
        out_w=6,
        has_mask=False,
        has_bias=False,
        dtype_name="float32",
    )


def _forward(launcher, geom, **kwargs) -> set[str]:
    z = np.zeros
    with record_calls() as calls:
        cuda_backend.conv_forward(
            launcher,
            z(geom.input_shape, np.float32),
            z(geom.offset_shape, np.float32),
            z(geom.weight_shape, np.float32),
            None,
            None,
            geom,
            workspace_bytes=1 << 20,
            **kwargs,
        )
    return set(calls.launches)


FAST_COLUMNS = {"deform_conv_im2col": 1e-3, "deform_conv_depthwise_forward": 2e-3}
FAST_DEPTHWISE = {"deform_conv_im2col": 2e-3, "deform_conv_depthwise_forward": 1e-3}


@pytest.mark.parametrize(
    "seconds, expected",
    [(FAST_COLUMNS, "deform_conv_im2col"), (FAST_DEPTHWISE, "deform_conv_depthwise_forward")],
)
def test_auto_takes_the_fastest_and_remembers(seconds, expected):
    launcher = TimedNullLauncher(seconds)
    first = _forward(launcher, _geometry())  # (the recorder also sees the timed runs)
    assert first == set(seconds)
    assert sorted(launcher.timed) == sorted(seconds)  # both candidates timed, once
    assert _forward(launcher, _geometry()) == {expected}
    assert len(launcher.timed) == 2  # the second call of the problem is not timed again
    (choice,) = autotune.remembered_choices().values()
    assert choice == {"deform_conv_im2col": "im2col"}.get(expected, "depthwise")
    # another problem (batch 3) is timed afresh
    _forward(launcher, _geometry(batch=3))
    assert len(launcher.timed) == 4


def test_one_candidate_is_not_timed():
    launcher = TimedNullLauncher(FAST_DEPTHWISE)
    assert _forward(launcher, _geometry(groups=1)) == {"deform_conv_im2col"}  # 8 per group
    assert launcher.timed == []


def test_disk_cache_is_written_and_read(tmp_path, monkeypatch):
    path = tmp_path / "choices.json"
    monkeypatch.setenv("CUPYDCN_AUTOTUNE_CACHE", str(path))
    _forward(TimedNullLauncher(FAST_COLUMNS), _geometry())
    stored = json.loads(path.read_text())
    assert list(stored.values()) == ["im2col"]
    autotune.forget_choices()  # a new process: only the disk knows
    fresh = TimedNullLauncher(FAST_DEPTHWISE)  # would now pick depthwise if it timed
    assert _forward(fresh, _geometry()) == {"deform_conv_im2col"}
    assert fresh.timed == []
    path.write_text("not json")  # a broken cache is ignored, then rewritten
    autotune.forget_choices()
    _forward(fresh, _geometry())
    assert sorted(fresh.timed) == sorted(FAST_DEPTHWISE)
    assert list(json.loads(path.read_text()).values()) == ["depthwise"]
    assert _forward(fresh, _geometry()) == {"deform_conv_depthwise_forward"}


def test_heuristic_never_times():
    launcher = TimedNullLauncher(FAST_COLUMNS)
    with cupydcn.conv_algorithm("heuristic"):
        assert _forward(launcher, _geometry()) == {"deform_conv_depthwise_forward"}
    assert launcher.timed == []
    # without a timer "auto" is the heuristic choice too
    assert _forward(NullLauncher(), _geometry()) == {"deform_conv_depthwise_forward"}


def test_explicit_algorithms():
    assert _forward(NullLauncher(), _geometry(), algorithm="im2col") == {"deform_conv_im2col"}
    assert _forward(NullLauncher(), _geometry(), algorithm="depthwise") == {
        "deform_conv_depthwise_forward"
    }
    with pytest.raises(cupydcn.CupydcnValueError, match="algorithm='depthwise' does not apply"):
        _forward(NullLauncher(), _geometry(groups=1), algorithm="depthwise")


def test_candidates_of_the_deterministic_backward():
    geom = _geometry()
    why = cuda_backend.candidates(geom, "float32")
    assert why["im2col"] is None and why["depthwise"] is None
    assert "float16 / bfloat16" in why["fused"]  # float32 stays off the tensor-core kernels
    why = cuda_backend.candidates(geom, "float32", deterministic=True)
    assert why["im2col"] is None
    assert "deterministic" in why["depthwise"] and "deterministic" in why["fused"]
    half = ConvGeometry(**{**_geometry(groups=1).__dict__, "in_channels": 16, "out_channels": 16})
    assert cuda_backend.candidates(half, "float16")["fused"] is None
    assert "sm_80" in cuda_backend.candidates(half, "float16", compute_capability=75)["fused"]
