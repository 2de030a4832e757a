"""Layers of the deformable-attention family, with the parameter names, shapes,
initialisation and forward signatures of the upstream modules, so that their
checkpoints load:

* :class:`MultiScaleDeformableAttention` — mmcv's (``mmcv.ops.multi_scale_deform_attn``);
* :class:`DCNv3` — InternImage's (``ops_dcnv3/modules/dcnv3.py``);
* :class:`DCNv4` — the DCNv4 repository's (``DCNv4_op/DCNv4/modules/dcnv4.py``).

They compute with the custom ops of :mod:`cupydcn.torch._deform_attn` (CPU and CUDA,
every floating dtype, any head dim / group_channels, any batch size), so upstream's
``im2col_step`` and its power-of-two / multiple-of-16 channel requirements do not apply
(``im2col_step`` is accepted and ignored).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from cupydcn.core.errors import value_error

from ._deform_attn import dcn_options, dcnv3, dcnv4, level_shapes, multi_scale_deformable_attn

__all__ = ["DCNv3", "DCNv4", "MultiScaleDeformableAttention"]


# ============================================================================ MSDA
class MultiScaleDeformableAttention(nn.Module):
    """mmcv's ``MultiScaleDeformableAttention`` (Deformable DETR's ``MSDeformAttn`` with
    mmcv's names), computed by ``cupydcn::multi_scale_deformable_attn``.

    Parameters (mmcv's names and shapes; ``E = embed_dims``, ``V = int(E *
    value_proj_ratio)``, M heads, L levels, P points):

        sampling_offsets   Linear(E, M * L * P * 2)  weight 0, bias the grid init
        attention_weights  Linear(E, M * L * P)      weight 0, bias 0
        value_proj         Linear(E, V)              xavier_uniform, bias 0
        output_proj        Linear(V, E)              xavier_uniform, bias 0

    The sampling_offsets bias starts as mmcv's: head h points along the angle
    ``2 pi h / M`` (its (cos, sin) scaled so that the larger component is 1), point p at
    ``p + 1`` times that, on every level.

    ``forward(query, key=None, value=None, identity=None, query_pos=None,
    key_padding_mask=None, reference_points=None, spatial_shapes=None,
    level_start_index=None, **kwargs)`` as mmcv's: query [Lq, N, E] ([N, Lq, E] with
    ``batch_first``), value [S, N, E] (default: query), reference_points [N, Lq, L, 2]
    (normalised x, y) or [N, Lq, L, 4] (boxes cx, cy, w, h), spatial_shapes [L, 2] (a
    tensor, or a tuple of (H_l, W_l) pairs: under torch.compile a tuple),
    level_start_index [L] (a tensor, a sequence or None; checked against spatial_shapes),
    key_padding_mask [N, S] (True: padding, read as 0). Returns ``dropout(output_proj(
    attention)) + identity`` (identity: query before query_pos by default; mmcv 1.x's
    ``residual`` keyword is taken for it). ``key`` and other keyword arguments are
    ignored, as mmcv does.
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        im2col_step: int = 64,
        dropout: float = 0.1,
        batch_first: bool = False,
        norm_cfg=None,
        init_cfg=None,
        value_proj_ratio: float = 1.0,
    ):
        super().__init__()
        name = "cupydcn.torch.MultiScaleDeformableAttention"
        if embed_dims % num_heads != 0:
            raise value_error(
                name, f"embed_dims must be divisible by num_heads; got {embed_dims} and {num_heads}"
            )
        value_proj_size = int(embed_dims * value_proj_ratio)
        if value_proj_size % num_heads != 0:
            raise value_error(
                name,
                f"int(embed_dims * value_proj_ratio) = {value_proj_size} "
                f"must be divisible by num_heads = {num_heads}",
            )
        self.embed_dims = embed_dims
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.im2col_step = im2col_step  # accepted for mmcv's signature; not needed
        self.batch_first = batch_first
        self.norm_cfg = norm_cfg
        self.init_cfg = init_cfg
        self.dropout = nn.Dropout(dropout)
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, value_proj_size)
        self.output_proj = nn.Linear(value_proj_size, embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmcv's initialisation (see the class docstring)."""
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        device = self.sampling_offsets.weight.device
        thetas = torch.arange(heads, dtype=torch.float32, device=device) * (2.0 * math.pi / heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (
            (grid / grid.abs().max(-1, keepdim=True)[0])
            .view(heads, 1, 1, 2)
            .repeat(1, levels, points, 1)
        )
        grid = grid * torch.arange(1, points + 1, dtype=torch.float32, device=device).view(
            1, 1, points, 1
        )
        self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        identity: Tensor | None = None,
        query_pos: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        reference_points: Tensor | None = None,
        spatial_shapes=None,
        level_start_index=None,
        **kwargs,
    ) -> Tensor:
        name = "cupydcn.torch.MultiScaleDeformableAttention"
        if identity is None and "residual" in kwargs:  # mmcv 1.x's name of identity
            identity = kwargs["residual"]
        if value is None:
            value = query
        if identity is None:
            identity = query
        if query_pos is not None:
            query = query + query_pos
        if not self.batch_first:
            query = query.permute(1, 0, 2)
            value = value.permute(1, 0, 2)
        batch, num_query, _ = query.shape
        _, num_value, _ = value.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        shapes = level_shapes("MultiScaleDeformableAttention", spatial_shapes)
        if len(shapes) != levels:
            raise value_error(
                name,
                f"spatial_shapes has {len(shapes)} levels; the layer has num_levels = {levels}",
            )
        if reference_points is None:
            raise value_error(name, "reference_points is required ([N, Lq, L, 2] or [N, Lq, L, 4])")

        value = self.value_proj(value)
        if key_padding_mask is not None:
            value = value.masked_fill(key_padding_mask[..., None], 0.0)
        value = value.view(batch, num_value, heads, -1)
        sampling_offsets = self.sampling_offsets(query).view(
            batch, num_query, heads, levels, points, 2
        )
        attention_weights = (
            self.attention_weights(query)
            .view(batch, num_query, heads, levels * points)
            .softmax(-1)
            .view(batch, num_query, heads, levels, points)
        )
        if reference_points.shape[-1] == 2:
            if isinstance(spatial_shapes, Tensor):
                normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            else:
                normalizer = torch.tensor(
                    [[w, h] for h, w in shapes], device=sampling_offsets.device
                )
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise value_error(
                name,
                f"the last dimension of reference_points must be 2 or 4; "
                f"got shape {tuple(reference_points.shape)}",
            )
        output = multi_scale_deformable_attn(
            value,
            shapes,
            level_start_index,
            sampling_locations.to(value.dtype),
            attention_weights.to(value.dtype),
        )
        output = self.output_proj(output)
        if not self.batch_first:
            output = output.permute(1, 0, 2)
        return self.dropout(output) + identity


# ============================================================================ DCNv3
class _ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


class _ToChannelsFirst(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 3, 1, 2)


def _norm_layer(channels: int, norm_layer: str) -> nn.Sequential:
    """InternImage's ``build_norm_layer(channels, norm_layer, 'channels_first',
    'channels_last')``: the submodule indices (hence the state_dict keys) as upstream."""
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), _ToChannelsLast())
    if norm_layer == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6))
    raise value_error("cupydcn.torch.DCNv3", f"norm_layer must be 'BN' or 'LN'; got {norm_layer!r}")


def _act_layer(act_layer: str) -> nn.Module:
    layers = {
        "ReLU": lambda: nn.ReLU(inplace=True),
        "SiLU": lambda: nn.SiLU(inplace=True),
        "GELU": nn.GELU,
    }
    if act_layer not in layers:
        raise value_error(
            "cupydcn.torch.DCNv3", f"act_layer must be one of {sorted(layers)}; got {act_layer!r}"
        )
    return layers[act_layer]()


def _blend(
    x: Tensor, x_proj: Tensor, features: Tensor, weight: Tensor, bias: Tensor, group_channels: int
) -> Tensor:
    """InternImage's / DCNv4's center_feature_scale: ``x (1 - s) + x_proj s`` with
    ``s = sigmoid(linear(features, weight, bias))`` per group, repeated over the group's
    channels."""
    scale = F.linear(features, weight, bias).sigmoid()  # [N, H, W, G]
    scale = scale[..., None].repeat(1, 1, 1, 1, group_channels).flatten(-2)
    return x * (1 - scale) + x_proj * scale


def _check_dcn_layer(
    layer: str, *, channels, kernel_size, stride, pad, dilation, group, offset_scale, remove_center
) -> None:
    """The constructor checks shared by the DCNv3 and DCNv4 layers."""
    if channels % group != 0:
        raise value_error(
            f"cupydcn.torch.{layer}",
            f"channels must be divisible by group; got {channels} and {group}",
        )
    if remove_center and kernel_size % 2 == 0:
        raise value_error(
            f"cupydcn.torch.{layer}", f"remove_center needs an odd kernel_size; got {kernel_size}"
        )
    dcn_options(
        layer,
        kernel_size=kernel_size,
        stride=stride,
        padding=pad,
        dilation=dilation,
        group=group,
        group_channels=channels // group,
        offset_scale=offset_scale,
        remove_center=remove_center,
    )


class DCNv3(nn.Module):
    """InternImage's ``DCNv3`` module (channels last: input and output [N, H, W, C]),
    computed by ``cupydcn::dcnv3``.

    Parameters (InternImage's names; C channels, G = group, P = k * k - remove_center):

        dw_conv.0           Conv2d(C, C, dw_kernel_size, groups=C, padding=(dw - 1) // 2)
        dw_conv.1.1         LayerNorm(C, eps=1e-6) (norm_layer "LN"; "BN": dw_conv.1.0
                            BatchNorm2d(C)), then the activation dw_conv.2 (act_layer)
        offset              Linear(C, G * P * 2)   weight 0, bias 0
        mask                Linear(C, G * P)       weight 0, bias 0
        input_proj          Linear(C, C)           xavier_uniform, bias 0
        output_proj         Linear(C, C)           xavier_uniform, bias 0
        center_feature_scale_proj_weight [G, C], center_feature_scale_proj_bias [G]
                            (zeros; with ``center_feature_scale``)

    forward: ``x = input_proj(input)``; the offsets and the mask come from
    ``dw_conv(input)`` (the mask softmax-normalised over each group's P points); the DCNv3
    core samples x with kernel_size, stride, pad, dilation, offset_scale and remove_center;
    with center_feature_scale the result is blended with x per group; ``output_proj``.
    As upstream, the offsets are computed at the input's pixels, so the layer needs an
    output size equal to the input size (stride 1, ``pad = dilation * (k - 1) // 2``).
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
    ):
        super().__init__()
        _check_dcn_layer(
            "DCNv3",
            channels=channels,
            kernel_size=kernel_size,
            stride=stride,
            pad=pad,
            dilation=dilation,
            group=group,
            offset_scale=offset_scale,
            remove_center=remove_center,
        )
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.offset_scale = offset_scale
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad = pad
        self.group = group
        self.group_channels = channels // group
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        points = kernel_size * kernel_size - self.remove_center

        self.dw_conv = nn.Sequential(
            nn.Conv2d(
                channels,
                channels,
                kernel_size=dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            ),
            _norm_layer(channels, norm_layer),
            _act_layer(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(
                torch.zeros((group, channels), dtype=torch.float)
            )
            self.center_feature_scale_proj_bias = nn.Parameter(
                torch.zeros((group,), dtype=torch.float)
            )

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        for linear in (self.offset, self.mask):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, input: Tensor) -> Tensor:
        n, h, w, _ = input.shape
        x = self.input_proj(input)
        x_proj = x
        features = self.dw_conv(input.permute(0, 3, 1, 2))  # [N, H, W, C]
        offset = self.offset(features)
        mask = self.mask(features).reshape(n, h, w, self.group, -1)
        mask = F.softmax(mask, -1).reshape(n, h, w, -1).type(x.dtype)
        x = dcnv3(
            x,
            offset.to(x.dtype),
            mask,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.pad,
            dilation=self.dilation,
            group=self.group,
            group_channels=self.group_channels,
            offset_scale=self.offset_scale,
            remove_center=bool(self.remove_center),
        )
        if self.center_feature_scale:
            x = _blend(
                x,
                x_proj,
                features,
                self.center_feature_scale_proj_weight,
                self.center_feature_scale_proj_bias,
                self.group_channels,
            )
        return self.output_proj(x)


# ============================================================================ DCNv4
class DCNv4(nn.Module):
    """The DCNv4 repository's ``DCNv4`` module (input and output [N, L, C] with
    ``L = H * W``), computed by ``cupydcn::dcnv4``.

    Parameters (upstream's names; C channels, G = group, K = G * (k * k - remove_center)):

        offset_mask_dw   Conv2d(C, C, dw_kernel_size, groups=C, padding=(dw - 1) // 2)
                         (only with ``dw_kernel_size``)
        offset_mask      Linear(C, ceil(3K / 8) * 8)   weight 0, bias 0 (the columns past
                         3K are padding: never read)
        value_proj       Linear(C, C)                  xavier_uniform, bias 0
        output_proj      Linear(C, C, bias=output_bias) xavier_uniform, bias 0
                         (value_proj / output_proj absent with ``without_pointwise``)
        center_feature_scale_proj_weight [G, C], center_feature_scale_proj_bias [G]
                         (zeros; with ``center_feature_scale``)

    ``forward(input, shape=None)``: ``shape`` = (H, W) (default: a square map,
    ``H = W = int(sqrt(L))``). ``x = value_proj(input)`` as [N, H, W, C]; ``offset_mask``
    (of ``offset_mask_dw(input)`` when present, else of input) packs per group 2P offsets
    and P mask values, used as they are (DCNv4 has no softmax); the DCNv4 core; with
    center_feature_scale the result is blended with x (scale from the core's output, as
    upstream); ``output_proj``. Any kernel size and any ``C / group`` (upstream asserts a
    multiple of 16).
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
        **kwargs,
    ):
        super().__init__()
        _check_dcn_layer(
            "DCNv4",
            channels=channels,
            kernel_size=kernel_size,
            stride=stride,
            pad=pad,
            dilation=dilation,
            group=group,
            offset_scale=offset_scale,
            remove_center=remove_center,
        )
        self.offset_scale = offset_scale
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        self.pad = pad
        self.group = group
        self.group_channels = channels // group
        self.dw_kernel_size = dw_kernel_size
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.without_pointwise = without_pointwise
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(
                channels,
                channels,
                dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            )
        self.offset_mask = nn.Linear(channels, int(math.ceil((self.K * 3) / 8) * 8))
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self._reset_parameters()
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(
                torch.zeros((group, channels), dtype=torch.float)
            )
            self.center_feature_scale_proj_bias = nn.Parameter(
                torch.zeros((group,), dtype=torch.float)
            )

    @torch.no_grad()
    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            nn.init.xavier_uniform_(self.value_proj.weight)
            nn.init.zeros_(self.value_proj.bias)
            nn.init.xavier_uniform_(self.output_proj.weight)
            if self.output_proj.bias is not None:
                nn.init.zeros_(self.output_proj.bias)

    def forward(self, input: Tensor, shape=None) -> Tensor:
        n, length, channels = input.shape
        if shape is not None:
            h, w = shape
        else:
            h = w = int(length**0.5)
        x = input
        if not self.without_pointwise:
            x = self.value_proj(x)
        x = x.reshape(n, h, w, -1)
        if self.dw_kernel_size is not None:
            features = self.offset_mask_dw(input.view(n, h, w, channels).permute(0, 3, 1, 2))
            features = features.permute(0, 2, 3, 1).reshape(n, length, channels)
        else:
            features = input
        offset_mask = self.offset_mask(features).reshape(n, h, w, -1)
        x_proj = x
        x = dcnv4(
            x,
            offset_mask.to(x.dtype),
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.pad,
            dilation=self.dilation,
            group=self.group,
            group_channels=self.group_channels,
            offset_scale=self.offset_scale,
            remove_center=bool(self.remove_center),
        )
        if self.center_feature_scale:
            x = _blend(
                x,
                x_proj,
                x,
                self.center_feature_scale_proj_weight,
                self.center_feature_scale_proj_bias,
                self.group_channels,
            )
        x = x.reshape(n, length, -1)
        if not self.without_pointwise:
            x = self.output_proj(x)
        return x
