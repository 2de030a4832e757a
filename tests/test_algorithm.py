"""deform_conv2d's CUDA algorithm: the setting, its scope, the argument, and that the
orchestration follows it (recorded with the null launcher, no GPU needed)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import cupydcn
from cupydcn.cuda.launch import NullLauncher, record_calls
from cupydcn.deform_conv import cuda_backend
from cupydcn.deform_conv.algorithm import current_conv_algorithm
from cupydcn.deform_conv.spec import ConvGeometry


def _depthwise_geometry() -> ConvGeometry:
    return ConvGeometry(
        batch=2,
        in_channels=8,
        height=6,
        width=6,
        out_channels=8,
        groups=8,
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


def _forward_kernels(**kwargs) -> set[str]:
    geom = _depthwise_geometry()
    z = np.zeros
    with record_calls() as calls:
        cuda_backend.conv_forward(
            NullLauncher(),
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


def test_setting_scope_and_argument():
    assert current_conv_algorithm() == "auto"
    assert _forward_kernels() == {"deform_conv_depthwise_forward"}
    assert _forward_kernels(algorithm="im2col") == {"deform_conv_im2col"}
    with cupydcn.conv_algorithm("im2col"):
        assert _forward_kernels() == {"deform_conv_im2col"}
        assert _forward_kernels(algorithm="auto") == {"deform_conv_depthwise_forward"}
        seen = []
        thread = threading.Thread(target=lambda: seen.append(current_conv_algorithm()))
        thread.start()
        thread.join()
        assert seen == ["auto"]  # the scope is per thread
    try:
        cupydcn.set_conv_algorithm("im2col")
        assert _forward_kernels() == {"deform_conv_im2col"}
    finally:
        cupydcn.set_conv_algorithm("auto")
    assert current_conv_algorithm() == "auto"


@pytest.mark.emulated
def test_deterministic_backward_takes_the_column_path(host_launcher):
    """(The emulator, not the null launcher: the deterministic scatter reads back the
    slot counts its first kernel writes.)"""
    geom = _depthwise_geometry()
    z = lambda s: np.zeros(s, np.float32)  # noqa: E731
    args = (z(geom.output_shape), z(geom.input_shape), z(geom.offset_shape))
    for deterministic, kernel in (
        (False, "deform_conv_depthwise_backward_data"),
        (True, "deform_conv_col2im_input_slots"),
    ):
        with record_calls() as calls:
            cuda_backend.conv_backward(
                host_launcher,
                *args,
                z(geom.weight_shape),
                None,
                geom,
                wrt=frozenset({"input"}),
                workspace_bytes=1 << 20,
                deterministic=deterministic,
            )
        assert kernel in calls.launches


@pytest.mark.parametrize(
    "bad, error", [("fast", cupydcn.CupydcnValueError), (2, cupydcn.CupydcnTypeError)]
)
def test_bad_settings_are_refused(bad, error):
    with pytest.raises(error, match="algorithm must be"):
        cupydcn.set_conv_algorithm(bad)
    with pytest.raises(error, match="algorithm must be"):
        with cupydcn.conv_algorithm(bad):
            pass
    assert current_conv_algorithm() == "auto"
