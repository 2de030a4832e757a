"""cupydcn.torch's deformable-attention ops and layers on the CPU: the custom operators
against the functional API, gradcheck in float64, only the needed gradients computed,
torch.library.opcheck, autocast, torch.compile (fullgraph, aot_eager) of a model with each
layer, and checkpoint compatibility of the layers with transcriptions of the upstream
modules (mmcv's MultiScaleDeformableAttention, InternImage's DCNv3, the DCNv4
repository's DCNv4): the upstream parameter layout and forward math, with
``torch.nn.functional.grid_sample`` as the sampling core, as upstream's pure-PyTorch
references do."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import cupydcn  # noqa: E402
import cupydcn.torch as ct  # noqa: E402

F64 = torch.float64

# Not ours: torch >= 2.14's opcheck clones requires_grad inputs before fakeifying them and
# reads the clones' .grad (see tests/test_torch_adapter.py, TORCH_OPCHECK_NON_LEAF_GRAD).
TORCH_OPCHECK_NON_LEAF_GRAD = pytest.mark.filterwarnings(
    r"ignore:The \.grad attribute of a Tensor that is not a leaf Tensor is being "
    r"accessed:UserWarning"
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- problems
SHAPES = ((3, 4), (2, 2))


def _fractional(base: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``base`` (integers) plus a fraction in [0.2, 0.8]: no sample point near a kink of
    the bilinear weights, so finite differences are exact there."""
    return base + 0.2 + 0.6 * torch.rand(base.shape, generator=g, dtype=F64)


def msda_problem(
    dtype=F64, seed=0, shapes=SHAPES, n=2, heads=2, dim=3, queries=3, points=2
) -> dict:
    g = _gen(seed)
    levels, keys = len(shapes), sum(h * w for h, w in shapes)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=F64).view(1, 1, 1, levels, 1, 2)
    loc_shape = (n, queries, heads, levels, points, 2)
    # pixel coordinates k + f with k in [-1, size - 1]: inside, on the edges and out
    base = torch.floor(torch.rand(loc_shape, generator=g, dtype=F64) * (size + 1)) - 1
    pixels = _fractional(base, g)
    args = dict(
        value=torch.randn(n, keys, heads, dim, generator=g, dtype=F64),
        sampling_locations=(pixels + 0.5) / size,
        attention_weights=torch.rand(loc_shape[:-1], generator=g, dtype=F64),
    )
    return {k: v.to(dtype) for k, v in args.items()}


DCN_CASES = {
    # kernel, stride, padding, dilation, offset_scale, remove_center, group, group_channels
    "3x3-same": dict(
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
        offset_scale=1.0,
        remove_center=False,
        group=2,
        group_channels=3,
    ),
    "2x3-strided-scaled": dict(
        kernel_size=(2, 3),
        stride=(2, 1),
        padding=(1, 0),
        dilation=(1, 2),
        offset_scale=0.5,
        remove_center=False,
        group=1,
        group_channels=2,
    ),
    "3x3-remove-center": dict(
        kernel_size=3,
        stride=1,
        padding=(1, 2),
        dilation=1,
        offset_scale=1.0,
        remove_center=True,
        group=2,
        group_channels=1,
    ),
}


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def dcn_geometry(case: dict, h: int, w: int):
    (kh, kw), (sh, sw) = _pair(case["kernel_size"]), _pair(case["stride"])
    (ph, pw), (dh, dw) = _pair(case["padding"]), _pair(case["dilation"])
    out_h = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    out_w = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return out_h, out_w, kh * kw - int(case["remove_center"])


def dcn_problem(case: dict, dtype=F64, seed=0, n=2, h=4, w=5) -> dict:
    g = _gen(seed)
    out_h, out_w, points = dcn_geometry(case, h, w)
    group = case["group"]
    offset_shape = (n, out_h, out_w, group * points * 2)
    whole = torch.randint(-2, 2, offset_shape, generator=g).to(F64)
    args = dict(
        input=torch.randn(n, h, w, group * case["group_channels"], generator=g, dtype=F64),
        offset=_fractional(whole, g),
        mask=0.2 + 0.8 * torch.rand(n, out_h, out_w, group * points, generator=g, dtype=F64),
    )
    return {k: v.to(dtype) for k, v in args.items()}


def pack(offset: torch.Tensor, mask: torch.Tensor, group: int, extra: int = 3) -> torch.Tensor:
    """DCNv4's offset_mask: per group 2P offsets then P mask values, ``extra`` padding
    columns (filled with garbage: never read)."""
    n, ho, wo, _ = mask.shape
    packed = torch.cat(
        [offset.reshape(n, ho, wo, group, -1), mask.reshape(n, ho, wo, group, -1)], -1
    ).reshape(n, ho, wo, -1)
    return torch.cat([packed, torch.full((n, ho, wo, extra), 7.0, dtype=packed.dtype)], -1)


def _options(case: dict) -> dict:
    return dict(case)


def _leaves(args: dict, names=None) -> dict:
    return {k: v.clone().requires_grad_(names is None or k in names) for k, v in args.items()}


# ---------------------------------------------------------------------------- registration
def test_ops_and_layers_are_exported():
    for name in (
        "multi_scale_deformable_attn",
        "dcnv3",
        "dcnv4",
        "MultiScaleDeformableAttention",
        "DCNv3",
        "DCNv4",
    ):
        assert getattr(ct, name).__doc__
    for op in ("multi_scale_deformable_attn", "dcnv3", "dcnv4"):
        assert hasattr(torch.ops.cupydcn, op) and hasattr(torch.ops.cupydcn, op + "_backward")


@pytest.mark.parametrize("name", ["dcnv3", "dcnv4"])
def test_schemas_and_signatures_follow_the_options(name):
    """The op schemas take one argument per field of the options dataclass, in order; the
    public functions take each with its declared default."""
    import dataclasses
    import inspect

    from cupydcn.deform_attn.spec import Dcnv3Options, Dcnv4Options

    fields = dataclasses.fields(Dcnv3Options if name == "dcnv3" else Dcnv4Options)
    for op_name in (name, f"{name}_backward"):
        arguments = getattr(torch.ops.cupydcn, op_name).default._schema.arguments
        names = [a.name for a in arguments if "Tensor" not in str(a.type)]
        assert names == [f.name for f in fields] + (
            ["output_mask"] if "backward" in op_name else []
        )
    parameters = inspect.signature(getattr(ct, name)).parameters
    for f in fields:
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert parameters[f.name].default == default, f.name


def test_functional_api_points_to_the_differentiable_ops():
    a = _leaves(msda_problem())
    with pytest.raises(
        cupydcn.CupydcnTypeError, match="use cupydcn.torch.multi_scale_deformable_attn"
    ):
        cupydcn.multi_scale_deformable_attn(
            a["value"], SHAPES, None, a["sampling_locations"], a["attention_weights"]
        )
    d = _leaves(dcn_problem(DCN_CASES["3x3-same"]))
    with pytest.raises(cupydcn.CupydcnTypeError, match="use cupydcn.torch.dcnv3"):
        cupydcn.dcnv3(d["input"], d["offset"], d["mask"], **DCN_CASES["3x3-same"])


# ---------------------------------------------------------------------------- forward
@pytest.mark.parametrize("form", ["tuple", "tensor", "list-with-starts"])
def test_msda_forward_equals_the_functional_api(form):
    a = msda_problem(dtype=torch.float32)
    expected = cupydcn.multi_scale_deformable_attn(
        a["value"].numpy(),
        SHAPES,
        None,
        a["sampling_locations"].numpy(),
        a["attention_weights"].numpy(),
    )
    shapes, starts = SHAPES, None
    if form == "tensor":
        shapes, starts = torch.tensor(SHAPES), torch.tensor([0, 12])
    elif form == "list-with-starts":
        shapes, starts = [list(s) for s in SHAPES], [0, 12]
    got = ct.multi_scale_deformable_attn(
        a["value"], shapes, starts, a["sampling_locations"], a["attention_weights"]
    )
    assert got.dtype == torch.float32 and got.shape == (2, 3, 6)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_msda_level_checks():
    a = msda_problem()
    args = (a["value"], SHAPES)
    rest = (a["sampling_locations"], a["attention_weights"])
    with pytest.raises(cupydcn.CupydcnValueError, match="level_start_index is"):
        ct.multi_scale_deformable_attn(*args, (0, 11), *rest)
    with pytest.raises(cupydcn.CupydcnValueError, match="level_start_index is"):
        ct.multi_scale_deformable_attn(*args, torch.tensor([0, 11]), *rest)  # checked by the op
    with pytest.raises(cupydcn.CupydcnValueError, match="level_start_index has 1 entries"):
        ct.multi_scale_deformable_attn(*args, [0], *rest)
    with pytest.raises(cupydcn.CupydcnValueError, match="sum"):
        ct.multi_scale_deformable_attn(a["value"], ((3, 4), (2, 3)), None, *rest)
    with pytest.raises(cupydcn.CupydcnTypeError, match="spatial_shapes"):
        ct.multi_scale_deformable_attn(a["value"], None, None, *rest)
    with pytest.raises(cupydcn.CupydcnTypeError, match="spatial_shapes"):
        ct.multi_scale_deformable_attn(a["value"], torch.tensor(SHAPES, dtype=F64), None, *rest)


@pytest.mark.parametrize("case_name", list(DCN_CASES))
def test_dcn_forward_equals_the_functional_api(case_name):
    case = DCN_CASES[case_name]
    d = dcn_problem(case, dtype=torch.float32)
    expected = cupydcn.dcnv3(d["input"].numpy(), d["offset"].numpy(), d["mask"].numpy(), **case)
    got = ct.dcnv3(d["input"], d["offset"], d["mask"], **case)
    np.testing.assert_array_equal(got.numpy(), expected)
    offset_mask = pack(d["offset"], d["mask"], case["group"])
    got4 = ct.dcnv4(d["input"], offset_mask, **case)
    np.testing.assert_array_equal(got4.numpy(), expected)


def test_dcn_option_checks():
    d = dcn_problem(DCN_CASES["3x3-same"])
    case = dict(DCN_CASES["3x3-same"])
    with pytest.raises(cupydcn.CupydcnValueError, match="stride"):
        ct.dcnv3(d["input"], d["offset"], d["mask"], **{**case, "stride": 0})
    with pytest.raises(cupydcn.CupydcnTypeError, match="remove_center must be a bool"):
        ct.dcnv3(d["input"], d["offset"], d["mask"], **{**case, "remove_center": "yes"})
    with pytest.raises(cupydcn.CupydcnValueError, match="group_channels"):
        ct.dcnv3(d["input"], d["offset"], d["mask"], **{**case, "group_channels": 2})
    with pytest.raises(cupydcn.CupydcnTypeError, match="offset must be a torch.Tensor"):
        ct.dcnv3(d["input"], d["offset"].numpy(), d["mask"], **case)


# ---------------------------------------------------------------------------- gradients
def test_msda_gradcheck():
    a = _leaves(msda_problem(n=1))
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ct.multi_scale_deformable_attn(v, SHAPES, None, loc, w),
        (a["value"], a["sampling_locations"], a["attention_weights"]),
    )


@pytest.mark.parametrize("case_name", list(DCN_CASES))
def test_dcn_gradcheck(case_name):
    case = DCN_CASES[case_name]
    d = _leaves(dcn_problem(case, n=1, h=3, w=5))
    # fast mode: the Jacobian against random vectors (full Jacobians take seconds here)
    assert torch.autograd.gradcheck(
        lambda x, o, m: ct.dcnv3(x, o, m, **case),
        (d["input"], d["offset"], d["mask"]),
        fast_mode=True,
    )
    offset_mask = pack(d["offset"].detach(), d["mask"].detach(), case["group"]).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, om: ct.dcnv4(x, om, **case), (d["input"], offset_mask), fast_mode=True
    )
    # the padding of offset_mask is never read: its gradient is 0
    ct.dcnv4(d["input"], offset_mask, **case).sum().backward()
    assert torch.count_nonzero(offset_mask.grad[..., -3:]) == 0


def _recording(monkeypatch, name):
    calls = []
    original = getattr(cupydcn, name)

    def record(*args, wrt, **kwargs):
        calls.append(tuple(wrt))
        return original(*args, wrt=wrt, **kwargs)

    monkeypatch.setattr(cupydcn, name, record)
    return calls


def test_only_the_needed_gradients_are_computed(monkeypatch):
    calls = _recording(monkeypatch, "multi_scale_deformable_attn_backward")
    a = _leaves(msda_problem(), ("sampling_locations",))
    ct.multi_scale_deformable_attn(
        a["value"], SHAPES, None, a["sampling_locations"], a["attention_weights"]
    ).sum().backward()
    assert calls == [("sampling_locations",)]
    assert a["value"].grad is None and a["sampling_locations"].grad is not None

    calls = _recording(monkeypatch, "dcnv3_backward")
    case = DCN_CASES["3x3-same"]
    d = _leaves(dcn_problem(case), ("input", "mask"))
    ct.dcnv3(d["input"], d["offset"], d["mask"], **case).sum().backward()
    assert calls == [("input", "mask")]

    calls = _recording(monkeypatch, "dcnv4_backward")
    offset_mask = pack(d["offset"], d["mask"].detach(), case["group"]).requires_grad_()
    ct.dcnv4(d["input"].detach(), offset_mask, **case).sum().backward()
    assert calls == [("offset_mask",)]


# ---------------------------------------------------------------------------- opcheck
def _dcn_schema_options(case: dict) -> tuple:
    return (
        list(_pair(case["kernel_size"])),
        case["group"],
        case["group_channels"],
        list(_pair(case["stride"])),
        list(_pair(case["padding"])),
        list(_pair(case["dilation"])),
        case["offset_scale"],
        case["remove_center"],
    )


@TORCH_OPCHECK_NON_LEAF_GRAD
def test_opcheck():
    ops = torch.ops.cupydcn
    flat = [v for row in SHAPES for v in row]
    a = _leaves(msda_problem(dtype=torch.float32))
    torch.library.opcheck(
        ops.multi_scale_deformable_attn.default,
        (a["value"], flat, torch.tensor([0, 12]), a["sampling_locations"], a["attention_weights"]),
    )
    torch.library.opcheck(
        ops.multi_scale_deformable_attn.default,
        (a["value"], flat, None, a["sampling_locations"], a["attention_weights"]),
    )
    b = msda_problem(dtype=torch.float32)
    grad = torch.randn(2, 3, 6, generator=_gen(3))
    torch.library.opcheck(
        ops.multi_scale_deformable_attn_backward.default,
        (
            grad,
            b["value"],
            flat,
            b["sampling_locations"],
            b["attention_weights"],
            [True, False, True],
        ),
    )

    case = DCN_CASES["2x3-strided-scaled"]
    options = _dcn_schema_options(case)
    d = _leaves(dcn_problem(case, dtype=torch.float32))
    torch.library.opcheck(ops.dcnv3.default, (d["input"], d["offset"], d["mask"], *options))
    om = pack(d["offset"].detach(), d["mask"].detach(), case["group"]).requires_grad_()
    torch.library.opcheck(ops.dcnv4.default, (d["input"], om, *options))
    e = dcn_problem(case, dtype=torch.float32)
    grad = torch.randn(2, *dcn_geometry(case, 4, 5)[:2], 2, generator=_gen(4))
    torch.library.opcheck(
        ops.dcnv3_backward.default,
        (grad, e["input"], e["offset"], e["mask"], *options, [False, True, True]),
    )
    torch.library.opcheck(
        ops.dcnv4_backward.default,
        (grad, e["input"], pack(e["offset"], e["mask"], case["group"]), *options, [True, True]),
    )


# ---------------------------------------------------------------------------- autocast
def test_autocast_runs_in_the_autocast_dtype():
    a = msda_problem(dtype=torch.float32)
    case = DCN_CASES["3x3-same"]
    d = dcn_problem(case, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.multi_scale_deformable_attn(
            a["value"], SHAPES, None, a["sampling_locations"], a["attention_weights"]
        )
        out3 = ct.dcnv3(d["input"], d["offset"], d["mask"], **case)
        out4 = ct.dcnv4(d["input"], pack(d["offset"], d["mask"], case["group"]), **case)
    assert out.dtype == out3.dtype == out4.dtype == torch.bfloat16
    bf = {k: v.to(torch.bfloat16) for k, v in a.items()}
    expected = ct.multi_scale_deformable_attn(
        bf["value"], SHAPES, None, bf["sampling_locations"], bf["attention_weights"]
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        out3.float(), ct.dcnv3(d["input"], d["offset"], d["mask"], **case), rtol=0.05, atol=0.05
    )


# ============================================================================ upstream layers
# Transcriptions of the upstream modules' parameter layouts and forward math (not their
# code), with grid_sample as the sampling core.
def grid_sample_msda(value, shapes, locations, weights):
    """mmcv's multi_scale_deformable_attn_pytorch: per level grid_sample(bilinear, zeros,
    align_corners=False) of value [N*M, D, H_l, W_l] at 2 * loc - 1, weighted sum."""
    n, _, m, d = value.shape
    _, q, _, levels, p, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        v = per_level[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        g = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(
            F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    a = weights.transpose(1, 2).reshape(n * m, 1, q, levels * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * a).sum(-1).view(n, m * d, q)
    return out.transpose(1, 2).contiguous()


def grid_sample_dcnv3(
    x, offset, mask, k, stride, pad, dilation, group, group_channels, offset_scale, remove_center
):
    """InternImage's dcnv3_core_pytorch (square kernel, equal pads): reference points at
    the centred grid + 0.5 of the padded map, the x-major dilation grid (minus the centre
    tap with remove_center), offsets scaled and normalised, grid_sample."""
    x = F.pad(x, [0, 0, pad, pad, pad, pad])
    n, h_in, w_in, _ = x.shape
    _, h_out, w_out, _ = offset.shape
    c = (dilation * (k - 1)) // 2
    ref_y = (c + 0.5 + torch.arange(h_out, dtype=x.dtype) * stride) / h_in
    ref_x = (c + 0.5 + torch.arange(w_out, dtype=x.dtype) * stride) / w_in
    ry, rx = torch.meshgrid(ref_y, ref_x, indexing="ij")
    ref = torch.stack((rx, ry), -1).reshape(1, h_out, w_out, 1, 2)
    gx, gy = torch.meshgrid(
        (-c + torch.arange(k, dtype=x.dtype) * dilation) / w_in,
        (-c + torch.arange(k, dtype=x.dtype) * dilation) / h_in,
        indexing="ij",
    )
    taps = torch.stack((gx, gy), -1).reshape(-1, 2)
    if remove_center:
        taps = torch.cat([taps[: k * k // 2], taps[k * k // 2 + 1 :]])
    points = taps.shape[0]
    grid = taps.repeat(group, 1).reshape(1, 1, 1, group * points, 2)
    norm = torch.tensor([w_in, h_in], dtype=x.dtype)
    loc = (ref + grid * offset_scale) + offset.reshape(
        n, h_out, w_out, group * points, 2
    ) * offset_scale / norm
    x_ = (
        x.reshape(n, h_in * w_in, group * group_channels)
        .transpose(1, 2)
        .reshape(n * group, group_channels, h_in, w_in)
    )
    g_ = (2 * loc - 1).reshape(n, h_out * w_out, group, points, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(x_, g_, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = (
        mask.reshape(n, h_out * w_out, group, points)
        .transpose(1, 2)
        .reshape(n * group, 1, h_out * w_out, points)
    )
    out = (sampled * m).sum(-1).view(n, group * group_channels, h_out * w_out)
    return out.transpose(1, 2).reshape(n, h_out, w_out, -1)


class UpstreamMSDA(nn.Module):
    """mmcv's MultiScaleDeformableAttention: parameters and forward math."""

    def __init__(self, embed_dims, num_heads, num_levels, num_points, batch_first):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.batch_first = batch_first
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)

    def forward(
        self, query, value, reference_points, spatial_shapes, key_padding_mask=None, query_pos=None
    ):
        identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
        bs, nq, _ = query.shape
        nv = value.shape[1]
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(bs, nv, m, -1)
        offsets = self.sampling_offsets(query).view(bs, nq, m, lv, p, 2)
        weights = (
            self.attention_weights(query).view(bs, nq, m, lv * p).softmax(-1).view(bs, nq, m, lv, p)
        )
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            loc = (
                reference_points[:, :, None, :, None, :]
                + offsets / normalizer[None, None, None, :, None, :]
            )
        else:
            loc = (
                reference_points[:, :, None, :, None, :2]
                + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        shapes = [tuple(int(v) for v in row) for row in spatial_shapes]
        out = self.output_proj(grid_sample_msda(value, shapes, loc, weights))
        if not self.batch_first:
            out = out.permute(1, 0, 2)
        return out + identity


class _Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class UpstreamDCNv3(nn.Module):
    """InternImage's DCNv3: parameters (dw_conv = Conv2d, build_norm_layer(LN | BN,
    channels_first -> channels_last), GELU) and forward math."""

    def __init__(
        self,
        channels,
        kernel_size,
        group,
        pad,
        norm_layer,
        center_feature_scale,
        remove_center,
        offset_scale,
    ):
        super().__init__()
        self.k, self.group, self.pad, self.gc = kernel_size, group, pad, channels // group
        self.offset_scale, self.remove_center = offset_scale, int(remove_center)
        self.center_feature_scale = center_feature_scale
        points = kernel_size * kernel_size - self.remove_center
        norm = (
            [_Permute(0, 2, 3, 1), nn.LayerNorm(channels, eps=1e-6)]
            if norm_layer == "LN"
            else [nn.BatchNorm2d(channels), _Permute(0, 2, 3, 1)]
        )
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, 1, (kernel_size - 1) // 2, groups=channels),
            nn.Sequential(*norm),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

    def forward(self, input):
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        x1 = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(x1)
        mask = F.softmax(self.mask(x1).reshape(n, h, w, self.group, -1), -1).reshape(n, h, w, -1)
        x = grid_sample_dcnv3(
            x,
            offset,
            mask,
            self.k,
            1,
            self.pad,
            1,
            self.group,
            self.gc,
            self.offset_scale,
            self.remove_center,
        )
        if self.center_feature_scale:
            s = F.linear(
                x1, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
            ).sigmoid()
            s = s[..., None].repeat(1, 1, 1, 1, self.gc).flatten(-2)
            x = x * (1 - s) + x_proj * s
        return self.output_proj(x)


class UpstreamDCNv4(nn.Module):
    """The DCNv4 repository's DCNv4: parameters (offset_mask_dw, offset_mask padded to a
    multiple of 8, value_proj, output_proj) and forward math (no softmax)."""

    def __init__(
        self, channels, kernel_size, group, pad, dw_kernel_size, remove_center, center_feature_scale
    ):
        super().__init__()
        self.k, self.group, self.pad, self.gc = kernel_size, group, pad, channels // group
        self.remove_center, self.dw = int(remove_center), dw_kernel_size
        self.center_feature_scale = center_feature_scale
        self.points = kernel_size * kernel_size - self.remove_center
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(
                channels, channels, dw_kernel_size, 1, (dw_kernel_size - 1) // 2, groups=channels
            )
        self.offset_mask = nn.Linear(channels, int(math.ceil(group * self.points * 3 / 8) * 8))
        self.value_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))

    def forward(self, input, shape):
        n, length, c = input.shape
        h, w = shape
        x = self.value_proj(input).reshape(n, h, w, -1)
        features = input
        if self.dw is not None:
            features = self.offset_mask_dw(input.view(n, h, w, c).permute(0, 3, 1, 2))
            features = features.permute(0, 2, 3, 1).reshape(n, length, c)
        om = self.offset_mask(features).reshape(n, h, w, -1)
        g, p = self.group, self.points
        per_group = om[..., : g * 3 * p].reshape(n, h, w, g, 3 * p)
        offset = per_group[..., : 2 * p].reshape(n, h, w, -1)
        mask = per_group[..., 2 * p :].reshape(n, h, w, -1)
        x_proj = x
        x = grid_sample_dcnv3(
            x, offset, mask, self.k, 1, self.pad, 1, g, self.gc, 1.0, self.remove_center
        )
        if self.center_feature_scale:
            s = F.linear(
                x, self.center_feature_scale_proj_weight, self.center_feature_scale_proj_bias
            ).sigmoid()
            s = s[..., None].repeat(1, 1, 1, 1, self.gc).flatten(-2)
            x = x * (1 - s) + x_proj * s
        return self.output_proj(x.reshape(n, length, -1))


def _randomise(module: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Every parameter random (upstream's initialisation zeroes the offsets, which would
    make the comparison trivial)."""
    g = _gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def _compare(upstream, ours, inputs: dict, call_upstream, call_ours, rtol=1e-5, atol=2e-5):
    """Same outputs, and the same gradients for every input and parameter."""
    ours.load_state_dict(upstream.state_dict(), strict=True)
    results = []
    for module, call in ((upstream, call_upstream), (ours, call_ours)):
        leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
        out = call(module, leaves)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
        grads.update({k: p.grad.clone() for k, p in module.named_parameters()})
        module.zero_grad()
        results.append((out.detach(), grads))
    (up_out, up_grads), (our_out, our_grads) = results
    torch.testing.assert_close(our_out, up_out, rtol=rtol, atol=atol)
    assert up_grads.keys() == our_grads.keys()
    for name in up_grads:
        torch.testing.assert_close(
            our_grads[name],
            up_grads[name],
            rtol=rtol,
            atol=atol,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    return (our_out - up_out).abs().max().item()


MSDA_LAYER = dict(embed_dims=16, num_heads=2, num_levels=2, num_points=3)
LEVELS = ((6, 8), (3, 4))


def _msda_inputs(batch_first: bool, seed=0, ref_dim=2) -> dict:
    g = _gen(seed)
    n, nq, nv, e = 2, 5, sum(h * w for h, w in LEVELS), MSDA_LAYER["embed_dims"]
    query = torch.randn(n, nq, e, generator=g)
    value = torch.randn(n, nv, e, generator=g)
    if not batch_first:
        query, value = query.transpose(0, 1), value.transpose(0, 1)
    ref = torch.rand(n, nq, len(LEVELS), ref_dim, generator=g)
    if ref_dim == 4:
        ref[..., 2:] = 0.2 + 0.5 * ref[..., 2:]
    mask = torch.zeros(n, nv, dtype=torch.bool)
    mask[1, -5:] = True
    return dict(
        query=query,
        value=value,
        reference_points=ref,
        key_padding_mask=mask,
        query_pos=0.1 * torch.randn(query.shape, generator=g),
    )


@pytest.mark.parametrize("batch_first,ref_dim", [(False, 2), (True, 4)])
def test_msda_layer_loads_an_upstream_checkpoint(batch_first, ref_dim):
    upstream = UpstreamMSDA(**MSDA_LAYER, batch_first=batch_first)
    _randomise(upstream, seed=1)
    ours = ct.MultiScaleDeformableAttention(**MSDA_LAYER, dropout=0.0, batch_first=batch_first)
    shapes_t = torch.tensor(LEVELS)
    starts_t = torch.tensor([0, 48])

    def up(m, a):
        return m(
            a["query"],
            a["value"],
            a["reference_points"],
            shapes_t,
            key_padding_mask=a["key_padding_mask"],
            query_pos=a["query_pos"],
        )

    def mine(m, a):  # mmcv's call convention: key, value, ... as keywords
        return m(
            a["query"],
            key=None,
            value=a["value"],
            query_pos=a["query_pos"],
            key_padding_mask=a["key_padding_mask"],
            reference_points=a["reference_points"],
            spatial_shapes=shapes_t,
            level_start_index=starts_t,
        )

    error = _compare(upstream, ours, _msda_inputs(batch_first, ref_dim=ref_dim), up, mine)
    assert error < 2e-5


def test_msda_layer_initialisation_is_mmcvs():
    layer = ct.MultiScaleDeformableAttention(embed_dims=32, num_heads=4, num_levels=2, num_points=3)
    bias = layer.sampling_offsets.bias.detach().view(4, 2, 3, 2)
    # head h points along angle 2 pi h / 4 (max-normalised), point p at p + 1 times that
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    for p in range(3):
        torch.testing.assert_close(bias[:, 0, p], directions * (p + 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(bias[:, 1, p], directions * (p + 1), atol=1e-6, rtol=0)
    assert not layer.sampling_offsets.weight.any()
    assert not layer.attention_weights.weight.any() and not layer.attention_weights.bias.any()
    assert not layer.value_proj.bias.any() and layer.value_proj.weight.abs().max() <= math.sqrt(
        6 / 64
    )
    assert sorted(layer.state_dict()) == sorted(
        f"{m}.{p}"
        for m in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for p in ("weight", "bias")
    )
    with pytest.raises(cupydcn.CupydcnValueError, match="divisible"):
        ct.MultiScaleDeformableAttention(embed_dims=30, num_heads=4)


DCNV3_LAYERS = {
    "LN": dict(
        channels=8,
        kernel_size=3,
        group=2,
        pad=1,
        norm_layer="LN",
        center_feature_scale=False,
        remove_center=False,
        offset_scale=1.0,
    ),
    "BN-cfs-remove-center": dict(
        channels=6,
        kernel_size=3,
        group=3,
        pad=1,
        norm_layer="BN",
        center_feature_scale=True,
        remove_center=True,
        offset_scale=0.7,
    ),
}


@pytest.mark.parametrize("name", list(DCNV3_LAYERS))
def test_dcnv3_layer_loads_an_upstream_checkpoint(name):
    cfg = DCNV3_LAYERS[name]
    upstream = UpstreamDCNv3(**cfg)
    _randomise(upstream, seed=2)
    ours = ct.DCNv3(**cfg)
    upstream.eval(), ours.eval()  # BatchNorm: the loaded running statistics
    with torch.no_grad():  # BatchNorm buffers random too
        for buffer in upstream.buffers():
            if buffer.is_floating_point():
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=_gen(3)))
    x = torch.randn(2, 5, 6, cfg["channels"], generator=_gen(4))
    error = _compare(
        upstream, ours, {"input": x}, lambda m, a: m(a["input"]), lambda m, a: m(a["input"])
    )
    assert error < 2e-5


def test_dcnv3_layer_initialisation_is_internimages():
    layer = ct.DCNv3(channels=16, kernel_size=3, group=4, center_feature_scale=True)
    keys = set(layer.state_dict())
    assert {
        "dw_conv.0.weight",
        "dw_conv.0.bias",
        "dw_conv.1.1.weight",
        "dw_conv.1.1.bias",
        "offset.weight",
        "mask.weight",
        "input_proj.weight",
        "output_proj.bias",
        "center_feature_scale_proj_weight",
        "center_feature_scale_proj_bias",
    } <= keys
    assert layer.offset.weight.shape == (4 * 9 * 2, 16) and layer.mask.weight.shape == (36, 16)
    for p in (
        layer.offset.weight,
        layer.offset.bias,
        layer.mask.weight,
        layer.mask.bias,
        layer.input_proj.bias,
        layer.output_proj.bias,
    ):
        assert not p.any()
    # zero offsets, uniform mask: the layer starts as a 3 x 3 box filter of input_proj
    x = torch.randn(1, 4, 4, 16, generator=_gen(5))
    expected = layer.output_proj(
        F.avg_pool2d(
            layer.input_proj(x).permute(0, 3, 1, 2), 3, 1, 1, count_include_pad=True
        ).permute(0, 2, 3, 1)
    )
    ours = ct.DCNv3(channels=16, kernel_size=3, group=4)
    ours.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if "center_feature_scale" not in k}
    )
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


DCNV4_LAYERS = {
    "dw": dict(
        channels=8,
        kernel_size=3,
        group=2,
        pad=1,
        dw_kernel_size=3,
        remove_center=False,
        center_feature_scale=False,
    ),
    "no-dw-cfs-remove-center": dict(
        channels=6,
        kernel_size=3,
        group=2,
        pad=1,
        dw_kernel_size=None,
        remove_center=True,
        center_feature_scale=True,
    ),
}


@pytest.mark.parametrize("name", list(DCNV4_LAYERS))
def test_dcnv4_layer_loads_an_upstream_checkpoint(name):
    cfg = DCNV4_LAYERS[name]
    upstream = UpstreamDCNv4(**cfg)
    _randomise(upstream, seed=6)
    ours = ct.DCNv4(**cfg)
    x = torch.randn(2, 5 * 6, cfg["channels"], generator=_gen(7))
    error = _compare(
        upstream,
        ours,
        {"input": x},
        lambda m, a: m(a["input"], (5, 6)),
        lambda m, a: m(a["input"], shape=(5, 6)),
    )
    assert error < 2e-5


def test_dcnv4_layer_parameters_are_the_repositorys():
    layer = ct.DCNv4(channels=32, kernel_size=3, group=2, dw_kernel_size=3, output_bias=False)
    assert layer.offset_mask.weight.shape == (56, 32)  # ceil(2 * 9 * 3 / 8) * 8
    assert layer.output_proj.bias is None and layer.offset_mask_dw.groups == 32
    assert not layer.offset_mask.weight.any() and not layer.value_proj.bias.any()
    bare = ct.DCNv4(channels=6, group=3, without_pointwise=True)
    assert sorted(bare.state_dict()) == ["offset_mask.bias", "offset_mask.weight"]
    x = torch.randn(1, 9, 6, generator=_gen(8))
    torch.testing.assert_close(bare(x), torch.zeros(1, 9, 6))
    for layer, bad in (
        (ct.DCNv3, {"stride": 0}),
        (ct.DCNv4, {"dilation": 0}),
        (ct.DCNv3, {"channels": 7}),
        (ct.DCNv4, {"kernel_size": 2, "remove_center": True}),
    ):
        with pytest.raises(cupydcn.CupydcnValueError):
            layer(**{"channels": 8, "group": 2, **bad})


# ---------------------------------------------------------------------------- torch.compile
class _Model(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "msda":
            self.layer = ct.MultiScaleDeformableAttention(
                **MSDA_LAYER, dropout=0.0, batch_first=True
            )
        elif kind == "dcnv3":
            self.layer = ct.DCNv3(**DCNV3_LAYERS["LN"])
        else:
            self.layer = ct.DCNv4(**DCNV4_LAYERS["dw"])
        _randomise(self.layer, seed=9, scale=0.2)

    def forward(self, x, y=None, ref=None):
        if self.kind == "msda":
            return self.layer(x, value=y, reference_points=ref, spatial_shapes=LEVELS).square()
        if self.kind == "dcnv3":
            return self.layer(x).square()
        return self.layer(x, shape=(5, 6)).square()


@pytest.mark.parametrize("kind", ["msda", "dcnv3", "dcnv4"])
def test_compile_fullgraph_aot_eager(kind):
    torch._dynamo.reset()
    model = _Model(kind)
    g = _gen(10)
    if kind == "msda":
        a = _msda_inputs(batch_first=True)
        args = (a["query"], a["value"], a["reference_points"])
    elif kind == "dcnv3":
        args = (torch.randn(2, 5, 6, 8, generator=g),)
    else:
        args = (torch.randn(2, 30, 8, generator=g),)
    results = []
    for fn in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        leaves = [a.clone().requires_grad_() for a in args]
        out = fn(*leaves)
        out.sum().backward()
        results.append(
            (out.detach(), [t.grad for t in leaves], [p.grad.clone() for p in model.parameters()])
        )
        model.zero_grad()
    (eager, eager_in, eager_p), (compiled, comp_in, comp_p) = results
    torch.testing.assert_close(compiled, eager)
    for e, c in zip(eager_in + eager_p, comp_in + comp_p):
        torch.testing.assert_close(c, e)


def test_compile_dynamic_shapes():
    """dynamic=True: the DCNv3 layer compiles once for two input heights; the MSDA op
    takes spatial_shapes as a tuple (traced as a static argument of the op)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    layer = ct.DCNv3(**DCNV3_LAYERS["LN"])
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True, dynamic=True)
    for h in (5, 7):
        x = torch.randn(2, h, 6, 8, generator=_gen(h))
        torch.testing.assert_close(compiled(x), layer(x))
    assert counter.frame_count == 1

    a = msda_problem(dtype=torch.float32)

    def f(v, loc, w):
        return ct.multi_scale_deformable_attn(v, SHAPES, (0, 12), loc, w)

    out = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)(*a.values())
    torch.testing.assert_close(out, f(*a.values()))


@pytest.mark.parametrize("kind", ["msda", "dcnv3", "dcnv4"])
def test_layers_in_bfloat16_and_under_autocast(kind):
    model = _Model(kind)
    if kind == "msda":
        a = _msda_inputs(batch_first=True)
        args = (a["query"], a["value"], a["reference_points"])
    else:
        args = (torch.randn((2, 5, 6, 8) if kind == "dcnv3" else (2, 30, 8), generator=_gen(11)),)
    expected = model(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(*args)
    half = model.to(torch.bfloat16)
    leaves = [t.to(torch.bfloat16).requires_grad_() for t in args]
    out = half(*leaves)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and leaves[0].grad.dtype == torch.bfloat16
    for got in (auto, out):
        torch.testing.assert_close(got.float(), expected, rtol=0.1, atol=0.1)
