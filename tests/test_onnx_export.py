"""ONNX export of cupydcn.torch: deform_conv2d as the standard ONNX DeformConv (opset 19).

Each exported model is run with ``onnx.reference`` (its DeformConv implements the 2-D
case) and with onnxruntime where the installed release has a DeformConv kernel, and
compared with cupydcn's own output: offset groups, groups, mask and bias, stride,
padding and dilation that differ in H and W, through the functional op and the layers,
by the dynamo exporter (plain ``torch.onnx.export``, ``cupydcn.torch.onnx.export_onnx``, and
``onnx_translation_table`` for ExportedPrograms that hold the custom op) and the
TorchScript exporter. What the standard op cannot express is refused with a
CupydcnValueError: padding_mode other than "zeros", the RoI pools.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
from onnx.reference import ReferenceEvaluator  # noqa: E402

import cupydcn.torch as ct  # noqa: E402
import cupydcn.torch.onnx as cto  # noqa: E402
from cupydcn.core.errors import CupydcnValueError  # noqa: E402

pytestmark = [
    # torch's dynamo ONNX exporter (torch 2.13/2.14) pickles a pytree spec through
    # copyreg, which calls the deprecated `isinstance(treespec, LeafSpec)` inside torch;
    # harmless here (torch's internals, not cupydcn's API).
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]
F64 = torch.float64


def _out(size, k, s, p, d):
    return (size + 2 * p - (d * (k - 1) + 1)) // s + 1


CONFIGS = {
    # DCNv2 with bias, 2 groups, 2 offset groups, every geometric option differing in H, W
    "dcnv2-groups-bias": dict(
        n=2,
        c=4,
        h=6,
        w=7,
        c_out=4,
        k=(2, 3),
        groups=2,
        offset_groups=2,
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        mask=True,
        bias=True,
    ),
    # DCNv1 without bias (empty B, no mask), strided in W, dilated in H
    "dcnv1-nobias": dict(
        n=1,
        c=3,
        h=7,
        w=6,
        c_out=2,
        k=(3, 2),
        groups=1,
        offset_groups=1,
        stride=(1, 2),
        padding=(2, 0),
        dilation=(2, 1),
        mask=False,
        bias=False,
    ),
    # DCNv2 without bias (empty B, then mask), 4 offset groups
    "dcnv2-nobias-og4": dict(
        n=1,
        c=4,
        h=5,
        w=5,
        c_out=2,
        k=(3, 3),
        groups=1,
        offset_groups=4,
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        mask=True,
        bias=False,
    ),
}


class Functional(torch.nn.Module):
    """cupydcn.torch.deform_conv2d with its weight and bias as parameters."""

    def __init__(self, cfg, dtype, g):
        super().__init__()
        kh, kw = cfg["k"]
        self.options = {k: cfg[k] for k in ("stride", "padding", "dilation")}
        self.weight = torch.nn.Parameter(
            torch.randn(cfg["c_out"], cfg["c"] // cfg["groups"], kh, kw, generator=g).to(dtype)
        )
        self.bias = (
            torch.nn.Parameter(torch.randn(cfg["c_out"], generator=g).to(dtype))
            if cfg["bias"]
            else None
        )

    def forward(self, input, offset, mask=None):
        return ct.deform_conv2d(input, offset, self.weight, self.bias, mask=mask, **self.options)


def _inputs(cfg, dtype, g):
    kh, kw = cfg["k"]
    out_h = _out(cfg["h"], kh, cfg["stride"][0], cfg["padding"][0], cfg["dilation"][0])
    out_w = _out(cfg["w"], kw, cfg["stride"][1], cfg["padding"][1], cfg["dilation"][1])
    taps = cfg["offset_groups"] * kh * kw
    inputs = [
        torch.randn(cfg["n"], cfg["c"], cfg["h"], cfg["w"], generator=g),
        2.0 * torch.randn(cfg["n"], 2 * taps, out_h, out_w, generator=g),
    ]
    if cfg["mask"]:
        inputs.append(torch.rand(cfg["n"], taps, out_h, out_w, generator=g))
    return tuple(t.to(dtype) for t in inputs)


def _problem(name, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = CONFIGS[name]
    return Functional(cfg, dtype, g).eval(), _inputs(cfg, dtype, g)


def _export(model, inputs) -> onnx.ModelProto:
    return cto.export_onnx(model, inputs, verbose=False).model_proto


def _export_torchscript(model, inputs) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated as a whole: it warns so on every call, and
        # its own internals call deprecated torch functions (select_model_mode_for_export);
        # these tests use it on purpose.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(model, inputs, f, dynamo=False, opset_version=19)
    return onnx.load_from_string(f.getvalue())


def _feeds(model: onnx.ModelProto, inputs) -> dict:
    return {i.name: t.numpy() for i, t in zip(model.graph.input, inputs)}


def _expected(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(*inputs).numpy()


def _deform_conv_node(model: onnx.ModelProto, cfg) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type == "DeformConv"]
    assert node.domain == ""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    ph, pw = cfg["padding"]
    assert attrs == {
        "dilations": list(cfg["dilation"]),
        "group": cfg["groups"],
        "kernel_shape": list(cfg["k"]),
        "offset_group": cfg["offset_groups"],
        "pads": [ph, pw, ph, pw],
        "strides": list(cfg["stride"]),
    }
    assert [d.version for d in model.opset_import if d.domain == ""] == [19]
    return node


# onnx.reference samples through GridSample in float32 arithmetic in places: its error
# against a float64 computation is about float32's.
REFERENCE_TOL = {F64: 1e-5, torch.float32: 1e-4}


def _assert_reference(model, inputs, expected, dtype):
    got = ReferenceEvaluator(model).run(None, _feeds(model, inputs))[0]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=REFERENCE_TOL[dtype], atol=REFERENCE_TOL[dtype])
    return float(np.abs(got - expected).max())


def _ort_session(model):
    ort = pytest.importorskip("onnxruntime")
    try:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # an onnxruntime release without a DeformConv CPU kernel
        if "NOT_IMPLEMENTED" in str(e) and "DeformConv" in str(e):
            pytest.skip(f"onnxruntime {ort.__version__} has no DeformConv kernel: {e}")
        raise


@pytest.mark.parametrize(
    "name, dtype",
    [(name, F64) for name in CONFIGS] + [("dcnv2-groups-bias", torch.float32)],
    ids=[*CONFIGS, "dcnv2-groups-bias-float32"],
)
def test_dynamo_export_matches_cupydcn(name, dtype):
    model, inputs = _problem(name, dtype)
    proto = _export(model, inputs)
    node = _deform_conv_node(proto, CONFIGS[name])
    # ONNX's input order X, W, offset, B, mask; an absent bias is an empty name.
    assert len(node.input) == (5 if CONFIGS[name]["mask"] else 4 if CONFIGS[name]["bias"] else 3)
    if CONFIGS[name]["mask"] and not CONFIGS[name]["bias"]:
        assert node.input[3] == ""
    onnx.checker.check_model(proto, full_check=True)
    expected = _expected(model, inputs)
    _assert_reference(proto, inputs, expected, dtype)

    session = _ort_session(proto)
    got = session.run(None, _feeds(proto, inputs))[0]
    tol = 1e-12 if dtype == F64 else 1e-5
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["dcnv2-groups-bias", "dcnv2-nobias-og4", "dcnv1-nobias"])
def test_torchscript_export_matches_cupydcn(name):
    """The deprecated TorchScript exporter (dynamo=False) gets the same DeformConv node
    through the symbolic that ``import cupydcn.torch`` registers."""
    model, inputs = _problem(name)
    proto = _export_torchscript(model, inputs)
    _deform_conv_node(proto, CONFIGS[name])
    _assert_reference(proto, inputs, _expected(model, inputs), F64)


def _randomised(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer.eval()


def test_layers_export():
    """ModulatedDeformConv2dPack (offsets and sigmoid mask predicted by conv_offset,
    randomised so that they are not zero) and DeformConv2d with a mask, in one model, in
    float32 (onnxruntime has no float64 Conv kernel for conv_offset)."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pack = ct.ModulatedDeformConv2dPack(
                4,
                4,
                (3, 2),
                stride=(1, 2),
                padding=(1, 0),
                dilation=(2, 1),
                groups=2,
                deform_groups=2,
            )
            self.conv = ct.DeformConv2d(4, 2, 3, padding=1, groups=2)

        def forward(self, x, offset, mask):
            return self.conv(torch.relu(self.pack(x)), offset, mask)

    model = _randomised(Net())
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 7, 8, generator=g)
    with torch.no_grad():
        h, w = model.pack(x).shape[2:]
    inputs = (x, torch.randn(2, 18, h, w, generator=g), torch.rand(2, 9, h, w, generator=g))
    proto = _export(model, inputs)
    assert [n.op_type for n in proto.graph.node].count("DeformConv") == 2
    expected = _expected(model, inputs)
    _assert_reference(proto, inputs, expected, torch.float32)
    got = _ort_session(proto).run(None, _feeds(proto, inputs))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_plain_torch_onnx_export():
    """torch.onnx.export(..., dynamo=True) needs no table for cupydcn.torch's functions
    and layers (they return the DeformConv node while traced)."""
    model, inputs = _problem("dcnv1-nobias")
    program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    node = [n for n in program.model_proto.graph.node if n.op_type == "DeformConv"]
    assert len(node) == 1
    _assert_reference(program.model_proto, inputs, _expected(model, inputs), F64)


@pytest.mark.parametrize("name", ["dcnv1-nobias", "dcnv2-nobias-og4"])
def test_translation_table_for_exported_programs(name):
    """A graph that holds the custom op (torch.export.export first) needs the table (the
    onnxscript translation; an absent bias before a mask is an empty input); without it
    torch says which op has no ONNX function."""
    model, inputs = _problem(name)
    exported = torch.export.export(model, inputs)
    assert "cupydcn.deform_conv2d" in str(exported.graph)
    program = torch.onnx.export(
        exported,
        inputs,
        dynamo=True,
        verbose=False,
        opset_version=19,
        custom_translation_table=cto.onnx_translation_table(),
    )
    _deform_conv_node(program.model_proto, CONFIGS[name])
    onnx.checker.check_model(program.model_proto, full_check=True)
    expected = _expected(model, inputs)
    _assert_reference(program.model_proto, inputs, expected, F64)
    got = _ort_session(program.model_proto).run(None, _feeds(program.model_proto, inputs))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    if name == "dcnv1-nobias":
        with pytest.raises(Exception, match="cupydcn.deform_conv2d"):
            torch.onnx.export(exported, inputs, dynamo=True, verbose=False)


def test_padding_mode_refused():
    layer = ct.DeformConv2d(2, 2, 3, padding=1, padding_mode="border").eval()
    inputs = (torch.randn(1, 2, 4, 4), torch.zeros(1, 18, 4, 4))
    message = "padding_mode='border' cannot be exported"
    with pytest.warns(UserWarning, match=message), pytest.raises(Exception, match=message):
        cto.export_onnx(layer, inputs, verbose=False)
    # plain torch.onnx.export: the reason as a warning, then torch's error
    with pytest.warns(UserWarning, match="padding_mode='border' cannot be exported"):
        with pytest.raises(Exception, match="cupydcn.deform_conv2d"):
            torch.onnx.export(layer, inputs, dynamo=True, verbose=False)
    with pytest.raises(CupydcnValueError, match="padding_mode='border' cannot be exported"):
        _export_torchscript(layer, inputs)


class _RoiPool(torch.nn.Module):
    def forward(self, x, rois):
        return ct.deform_roi_pool(x, rois, output_size=2)


class _PSRoiPool(torch.nn.Module):
    def forward(self, x, rois):
        return ct.deform_psroi_pool(x, rois, output_dim=2, group_size=1, pooled_size=2)[0]


@pytest.mark.parametrize(
    "module, op", [(_RoiPool, "deform_roi_pool"), (_PSRoiPool, "deform_psroi_pool")]
)
def test_roi_pools_refused(module, op):
    inputs = (torch.randn(1, 2, 5, 5), torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]]))
    message = f"{op} has no standard ONNX operator"
    with pytest.warns(UserWarning, match=message), pytest.raises(Exception, match=message):
        cto.export_onnx(module().eval(), inputs, verbose=False)
    with pytest.raises(CupydcnValueError, match=message):
        _export_torchscript(module().eval(), inputs)
    # plain torch.onnx.export: the reason as a warning, then torch's error naming the op
    with pytest.warns(UserWarning, match=message):
        with pytest.raises(Exception, match=f"cupydcn.{op}"):
            torch.onnx.export(module().eval(), inputs, dynamo=True, verbose=False)


# torch's exporter says that it names the offset's axes after the input's (the same
# dims): informational, and what this test means.
@pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")
def test_dynamic_batch_and_size():
    """Batch, height and width may be dynamic (only the channels and the kernel fix
    DeformConv's attributes): the model runs on another batch and size than exported."""
    layer = ct.DeformConv2d(2, 2, 3, padding=1).eval()
    g = torch.Generator().manual_seed(5)
    inputs = (torch.randn(2, 2, 4, 5, generator=g), torch.randn(2, 18, 4, 5, generator=g))
    n, h, w = torch.export.Dim("n"), torch.export.Dim("h", min=2), torch.export.Dim("w", min=2)
    proto = cto.export_onnx(
        layer, inputs, verbose=False, dynamic_shapes=({0: n, 2: h, 3: w}, {0: n, 2: h, 3: w})
    ).model_proto
    other = (torch.randn(3, 2, 5, 3, generator=g), torch.randn(3, 18, 5, 3, generator=g))
    _assert_reference(proto, other, _expected(layer, other), torch.float32)


def test_bfloat16_needs_opset_22():
    layer = ct.DeformConv2d(2, 2, 3, padding=1).eval().to(torch.bfloat16)
    inputs = (torch.randn(1, 2, 4, 4).bfloat16(), torch.randn(1, 18, 4, 4).bfloat16())
    proto = cto.export_onnx(layer, inputs, opset_version=22, verbose=False).model_proto
    onnx.checker.check_model(proto, full_check=True)
    (node,) = [n for n in proto.graph.node if n.op_type == "DeformConv"]
    assert [d.version for d in proto.opset_import if d.domain == ""] == [22]
    with pytest.raises(Exception, match="less than node version: 22"):
        cto.export_onnx(layer, inputs, verbose=False)
