"""Bad input gets a clear ValueError/TypeError naming the argument, before any compute."""

from __future__ import annotations

import numpy as np
import pytest

import cupydcn
from cupydcn.deform_conv import numpy_backend as _numpy_conv


def _args(
    n=2,
    c=4,
    h=7,
    w=6,
    c_out=6,
    kh=3,
    kw=2,
    groups=2,
    offset_groups=2,
    mask=True,
    dtype=np.float32,
    stride=1,
    padding=1,
    dilation=1,
):
    rng = np.random.default_rng(0)
    out_h = (h + 2 * padding - (dilation * (kh - 1) + 1)) // stride + 1
    out_w = (w + 2 * padding - (dilation * (kw - 1) + 1)) // stride + 1
    taps = kh * kw
    return dict(
        input=rng.standard_normal((n, c, h, w)).astype(dtype),
        offset=rng.standard_normal((n, 2 * offset_groups * taps, out_h, out_w)).astype(dtype),
        weight=rng.standard_normal((c_out, c // groups, kh, kw)).astype(dtype),
        bias=rng.standard_normal((c_out,)).astype(dtype),
        mask=rng.uniform(size=(n, offset_groups * taps, out_h, out_w)).astype(dtype)
        if mask
        else None,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """Any call that reaches the backend in this module is a failure of validation."""

    def fail(*args, **kwargs):
        raise AssertionError("validation let bad input reach the backend")

    monkeypatch.setattr(_numpy_conv, "conv_forward", fail)
    monkeypatch.setattr(_numpy_conv, "conv_backward", fail)


def _call(**overrides):
    args = _args()
    args.update(overrides)
    return cupydcn.deform_conv2d(args.pop("input"), args.pop("offset"), args.pop("weight"), **args)


def _raises(exc_type, *fragments, **overrides):
    with pytest.raises(exc_type) as info:
        _call(**overrides)
    assert isinstance(info.value, cupydcn.CupydcnError)
    message = str(info.value)
    assert message.startswith("deform_conv2d: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "{" not in message and "}" not in message, f"unfilled placeholder in {message!r}"
    return message


def test_input_ndim():
    _raises(ValueError, "input must be 4-D", "(4, 7, 6)", input=np.zeros((4, 7, 6), np.float32))


def test_weight_ndim():
    _raises(ValueError, "weight must be 4-D", weight=np.zeros((6, 2, 3), np.float32))


def test_weight_channels_do_not_divide_input():
    _raises(
        ValueError,
        "weight.shape[1] = 3",
        "input channels 4",
        weight=np.zeros((6, 3, 3, 2), np.float32),
    )


def test_out_channels_not_divisible_by_groups():
    _raises(
        ValueError, "weight.shape[0] = 5", "groups = 2", weight=np.zeros((5, 2, 3, 2), np.float32)
    )


def test_offset_channels_not_multiple_of_taps():
    _raises(
        ValueError,
        "offset.shape[1] = 13",
        "2 * kh * kw = 12",
        offset=np.zeros((2, 13, 7, 7), np.float32),
    )


def test_offset_groups_do_not_divide_channels():
    args = _args()
    # 3 offset groups do not divide 4 channels
    _raises(
        ValueError,
        "offset groups = 3",
        "input channels 4",
        offset=np.zeros((2, 36, 7, 7), np.float32),
        mask=None,
    )
    del args


def test_offset_spatial_size_differs_from_output():
    _raises(
        ValueError,
        "offset has shape (2, 24, 6, 7)",
        "expected (2, 24, 7, 7)",
        offset=np.zeros((2, 24, 6, 7), np.float32),
    )


def test_offset_batch_differs():
    _raises(
        ValueError,
        "offset has shape (3, 24, 7, 7)",
        "expected (2, 24, 7, 7)",
        offset=np.zeros((3, 24, 7, 7), np.float32),
    )


def test_mask_shape():
    _raises(
        ValueError,
        "mask has shape (2, 11, 7, 7)",
        "expected (2, 12, 7, 7)",
        mask=np.zeros((2, 11, 7, 7), np.float32),
    )


def test_bias_shape():
    _raises(ValueError, "bias has shape (5,)", "expected (6,)", bias=np.zeros((5,), np.float32))


def test_output_smaller_than_one():
    message = _raises(
        ValueError,
        "output size would be",
        "at least 1 x 1",
        input=np.zeros((2, 4, 1, 6), np.float32),
        padding=0,
    )
    assert "input 1 x 6" in message


@pytest.mark.parametrize(
    "name, value, fragment",
    [
        ("stride", 0, "stride must be >= 1"),
        ("stride", (1, 0), "stride must be >= 1"),
        ("dilation", (0, 1), "dilation must be >= 1"),
        ("padding", -1, "padding must be >= 0"),
    ],
)
def test_bad_hyperparameters(name, value, fragment):
    _raises(ValueError, fragment, str(value) if isinstance(value, tuple) else "", **{name: value})


@pytest.mark.parametrize("value", [1.5, (1, 2, 3), "2", True, None])
def test_hyperparameter_types(value):
    _raises(TypeError, "stride must be an int or a pair", stride=value)


def test_integer_dtype():
    args = _args()
    _raises(
        TypeError,
        "input has dtype int64",
        "expected one of float64, float32",
        input=args["input"].astype(np.int64),
    )


def test_mismatched_dtypes():
    args = _args()
    _raises(
        TypeError,
        "offset has dtype float64",
        "expected float32 like input",
        offset=args["offset"].astype(np.float64),
    )


def test_non_array_argument():
    _raises(TypeError, "weight must be an array supporting DLPack", "list", weight=[[1.0]])


def test_padding_mode():
    _raises(ValueError, "padding_mode must be one of", "'circular'", padding_mode="circular")


@pytest.mark.parametrize("value, exc", [(0, ValueError), (-5, ValueError), (1.0, TypeError)])
def test_workspace_bytes(value, exc):
    _raises(exc, "workspace_bytes", workspace_bytes=value)


def test_mixed_array_libraries():
    torch = pytest.importorskip("torch")
    args = _args()
    _raises(
        TypeError,
        "input is a numpy.ndarray but offset is a torch.Tensor",
        "one library",
        offset=torch.from_numpy(args["offset"]),
    )


def _backward(**overrides):
    args = _args()
    args.pop("bias")
    grad_output = np.ones((2, 6, 7, 7), np.float32)
    args.update(overrides)
    return cupydcn.deform_conv2d_backward(
        args.pop("grad_output", grad_output),
        args.pop("input"),
        args.pop("offset"),
        args.pop("weight"),
        **args,
    )


def test_backward_grad_output_shape():
    with pytest.raises(
        ValueError,
        match=r"deform_conv2d_backward: grad_output has shape "
        r"\(2, 6, 7, 6\); expected the output shape \(2, 6, 7, 7\)",
    ):
        _backward(grad_output=np.ones((2, 6, 7, 6), np.float32))


def test_backward_grad_output_dtype():
    with pytest.raises(TypeError, match="grad_output has dtype float64; expected float32"):
        _backward(grad_output=np.ones((2, 6, 7, 7), np.float64))


def test_backward_unknown_wrt():
    with pytest.raises(ValueError, match=r"wrt names \['offsets'\]"):
        _backward(wrt=("input", "offsets"))


def test_backward_mask_gradient_without_mask():
    with pytest.raises(ValueError, match="wrt names 'mask' but mask is None"):
        _backward(mask=None, wrt=("mask",))


def test_errors_are_builtin_types():
    assert issubclass(cupydcn.CupydcnValueError, ValueError)
    assert issubclass(cupydcn.CupydcnTypeError, TypeError)
