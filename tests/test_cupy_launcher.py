"""The CuPy launcher without a GPU: argument packing and checking, the memoised kernel
functions, and a launch through a fake kernel function."""

from __future__ import annotations

import types

import numpy as np
import pytest

from cupydcn.core.errors import CupydcnError, CupydcnTypeError, CupydcnValueError
from cupydcn.cuda import cupy_launcher as cl
from cupydcn.cuda.kernel_source import KERNEL_PARAMETERS, kernel_parameters
from cupydcn.cuda.launch import kernel_arguments, launch_config, size_arguments


class FakeArray:
    """Stands in for cupy.ndarray: a dtype, a shape and C-contiguity."""

    def __init__(self, dtype, shape=(4,), c_contiguous=True):
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self.flags = types.SimpleNamespace(c_contiguous=c_contiguous)


def _convert_args(**overrides):
    values = dict(input=FakeArray("float32"), output=FakeArray("float32"), total=4)
    values.update(overrides)
    return kernel_arguments("widen_to_acc", **values)


def _pack(args, kernel="widen_to_acc", dtype_name="float32", index_bits=32):
    return cl.pack_arguments(kernel, dtype_name, index_bits, args, FakeArray)


@pytest.mark.parametrize("value", [7, np.int8(7), np.int32(7), np.int64(7), np.uint16(7)])
@pytest.mark.parametrize("index_bits, scalar", [(32, np.int32), (64, np.int64)])
def test_integral_scalars_become_the_index_type(value, index_bits, scalar):
    packed = _pack(_convert_args(total=value), index_bits=index_bits)
    assert type(packed[2]) is scalar and packed[2] == 7


def test_arrays_pass_and_none_is_a_null_pointer():
    source = FakeArray("float32")
    packed = _pack(
        kernel_arguments(
            "deform_conv_im2col",
            input=source,
            offset=source,
            mask=None,
            columns=FakeArray("float32"),
            **dict.fromkeys(_conv_sizes(), 1),
        ),
        kernel="deform_conv_im2col",
    )
    assert packed[0] is source and packed[1] is source
    assert type(packed[2]) is np.uint64 and packed[2] == 0


def _conv_sizes():
    return [p.name for p in kernel_parameters("deform_conv_im2col") if not p.pointer]


@pytest.mark.parametrize(
    "value, error, message",
    [
        (4.0, CupydcnTypeError, "must be an integer; got float 4.0"),
        (np.float32(4), CupydcnTypeError, "must be an integer; got float32"),
        (True, CupydcnTypeError, "must be an integer; got bool"),
        (np.bool_(True), CupydcnTypeError, "must be an integer; got bool"),
        ("4", CupydcnTypeError, "must be an integer; got str"),
        (np.array(4), CupydcnTypeError, "must be an integer; got ndarray"),
        (None, CupydcnTypeError, "must be an integer; got NoneType"),
        (2**31, CupydcnValueError, "= 2147483648 does not fit int32"),
        (-(2**31) - 1, CupydcnValueError, "does not fit int32"),
    ],
)
def test_bad_index_arguments_name_kernel_and_position(value, error, message):
    with pytest.raises(error, match=message) as caught:
        _pack(_convert_args(total=value))
    assert "cupydcn::widen_to_acc<float, int>: argument 2 (I total)" in str(caught.value)
    assert isinstance(caught.value, CupydcnError)


def test_int64_range():
    assert _pack(_convert_args(total=2**31), index_bits=64)[2] == 2**31
    with pytest.raises(CupydcnValueError, match="does not fit int64"):
        _pack(_convert_args(total=2**63), index_bits=64)


@pytest.mark.parametrize(
    "value, error, message",
    [
        (
            np.zeros(4, np.float32),
            CupydcnTypeError,
            r"argument 0 \(const T\* input\) must be a .*FakeArray or None; got numpy.ndarray",
        ),
        (
            FakeArray("float64"),
            CupydcnTypeError,
            r"argument 0 \(const T\* input\) must have dtype float32; got float64",
        ),
        (
            FakeArray("float32", c_contiguous=False),
            CupydcnValueError,
            r"argument 0 \(const T\* input\) of shape \(4,\) is not C-contiguous",
        ),
        (3, CupydcnTypeError, r"argument 0 \(const T\* input\) must be a"),
    ],
)
def test_bad_array_arguments(value, error, message):
    with pytest.raises(error, match=message):
        _pack(_convert_args(input=value))


def test_pointer_dtypes_follow_the_specialisation():
    # widen_to_acc<__half>: reads float16 (T), writes float32 (A)
    args = _convert_args(input=FakeArray("float16"), output=FakeArray("float32"))
    assert len(_pack(args, dtype_name="float16")) == 3
    with pytest.raises(
        CupydcnTypeError, match=r"argument 1 \(A\* output\) must have dtype float32"
    ):
        _pack(
            _convert_args(input=FakeArray("float16"), output=FakeArray("float16")),
            dtype_name="float16",
        )
    count = FakeArray("int32")
    psroi = {
        p.name: (FakeArray("float32") if p.pointer else 1)
        for p in kernel_parameters("deform_psroi_pool_forward")
    }
    psroi["count"] = count
    packed = _pack(
        kernel_arguments("deform_psroi_pool_forward", **psroi), kernel="deform_psroi_pool_forward"
    )
    assert packed[5] is count


def test_argument_count():
    with pytest.raises(
        CupydcnTypeError,
        match=r"takes 3 arguments \(const T\* input, A\* output, "
        r"I total\); got 2",
    ):
        _pack(_convert_args()[:2])


def test_kernel_arguments_orders_by_name_and_rejects_strays():
    a, b = FakeArray("float32"), FakeArray("float32")
    assert kernel_arguments("widen_to_acc", total=3, output=b, input=a) == [a, b, 3]
    with pytest.raises(
        TypeError,
        match=r"missing arguments \['total'\], unknown arguments "
        r"\['count'\]",
    ):
        kernel_arguments("widen_to_acc", input=a, output=b, count=3)


def test_every_declared_parameter_parses():
    for kernel in KERNEL_PARAMETERS:
        names = [p.name for p in kernel_parameters(kernel)]
        assert len(set(names)) == len(names), kernel


# ---------------------------------------------------------------- memoisation and launch


class FakeFunction:
    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args):
        self.calls.append((grid, block, args))


class FakeModule:
    def __init__(self):
        self.requests = []
        self.functions = {}

    def get_function(self, expression):
        self.requests.append(expression)
        return self.functions.setdefault(expression, FakeFunction())


@pytest.fixture
def fake_modules(monkeypatch):
    """cupy_launcher._module replaced by fake modules, one per key; caches emptied."""
    modules: dict[tuple, FakeModule] = {}

    def module(*key):
        return modules.setdefault(key, FakeModule())

    cl._function.cache_clear()
    monkeypatch.setattr(cl, "_module", module)
    yield modules
    cl._function.cache_clear()


def test_kernel_function_is_memoised_per_device_and_expression(fake_modules):
    first = cl._function(0, "widen_to_acc", "float32", 32, ())
    assert cl._function(0, "widen_to_acc", "float32", 32, ()) is first
    module = fake_modules[(0, "convert.cu", "float32", 32, ())]
    assert module.requests == ["cupydcn::widen_to_acc<float, int>"]

    cl._function(0, "round_to_output", "float32", 32, ())
    cl._function(1, "widen_to_acc", "float32", 32, ())
    cl._function(0, "widen_to_acc", "float32", 64, ())
    assert module.requests == [
        "cupydcn::widen_to_acc<float, int>",
        "cupydcn::round_to_output<float, int>",
    ]
    assert fake_modules[(1, "convert.cu", "float32", 32, ())].requests == [
        "cupydcn::widen_to_acc<float, int>"
    ]
    assert fake_modules[(0, "convert.cu", "float32", 64, ())].requests == [
        "cupydcn::widen_to_acc<float, long long>"
    ]


def _fake_launcher(monkeypatch):
    cupy = pytest.importorskip("cupy")
    launcher = object.__new__(cl.CupyLauncher)
    launcher.xp = types.SimpleNamespace(ndarray=FakeArray, cuda=cupy.cuda)
    monkeypatch.setattr(cl, "_current_device_id", lambda: 0)
    return launcher


def test_launch_packs_once_and_reuses_the_function(fake_modules, monkeypatch):
    launcher = _fake_launcher(monkeypatch)
    args = _convert_args(total=np.int64(1000))
    launcher.launch("widen_to_acc", "float32", 32, 1000, args)
    launcher.launch("widen_to_acc", "float32", 32, 1000, args)
    module = fake_modules[(0, "convert.cu", "float32", 32, ())]
    assert module.requests == ["cupydcn::widen_to_acc<float, int>"]
    calls = module.functions["cupydcn::widen_to_acc<float, int>"].calls
    blocks, threads = launch_config(1000)
    assert [(grid, block) for grid, block, _ in calls] == [((blocks, 1, 1), (threads, 1, 1))] * 2
    packed = calls[0][2]
    assert packed[:2] == tuple(args[:2]) and type(packed[2]) is np.int32 and packed[2] == 1000


def test_launch_refuses_bad_arguments_before_compiling(fake_modules, monkeypatch):
    launcher = _fake_launcher(monkeypatch)
    with pytest.raises(CupydcnTypeError, match=r"widen_to_acc<float, int>: argument 2"):
        launcher.launch("widen_to_acc", "float32", 32, 4, _convert_args(total=4.0))
    assert fake_modules == {}


def test_empty_launch_does_nothing(fake_modules, monkeypatch):
    launcher = _fake_launcher(monkeypatch)
    launcher.launch("widen_to_acc", "float32", 32, 0, [])
    assert fake_modules == {}


def test_size_arguments_come_from_the_geometry_by_name():
    geom = types.SimpleNamespace(
        num_rois=3, channels=4, height=5, width=6, pooled_h=7, pooled_w=8, sampling_ratio=2
    )
    sizes = size_arguments("deform_roi_pool_forward", geom, channels=9)
    assert sizes == dict(
        num_rois=3, channels=9, height=5, width=6, pooled_h=7, pooled_w=8, sampling_ratio=2
    )
    with pytest.raises(TypeError, match=r"\['input'\] are not size parameters"):
        size_arguments("deform_roi_pool_forward", geom, input=1)
