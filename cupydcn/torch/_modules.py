"""Drop-in ``nn.Module`` layers built on cupydcn's custom ops.

Names, arguments, parameter names and initialisation follow the layers users know:

- :class:`DeformConv2d` is ``torchvision.ops.DeformConv2d`` (offsets, and optionally a
  mask, from the caller; ``weight`` and ``bias`` initialised as torchvision does), so a
  torchvision state_dict loads into it and gives the same outputs.
- :class:`DeformConv2dPack` and :class:`ModulatedDeformConv2dPack` are mmcv's
  (``conv_offset``, a zero-initialised ``nn.Conv2d``, predicts the offsets, and for the
  modulated layer a sigmoid mask, from the input; weights initialised as mmcv does).
- :class:`DeformRoIPool`, :class:`DeformRoIPoolPack` and
  :class:`ModulatedDeformRoIPoolPack` are mmcv's (``offset_fc`` and ``mask_fc``, whose
  last layers start at zero, predict normalised offsets and a mask from plainly pooled
  features).
- :class:`DeformPSRoIPool` wraps deformable position-sensitive RoI pooling (R-FCN).

The constructors check their arguments (CupydcnValueError / CupydcnTypeError naming the
layer and the argument), so that a bad layer fails when it is built, not at its first
forward. The RoI layers take rois [K, 5] or torchvision's list of [L, 4] boxes per image.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cupydcn.core.checks import check_positive, int_pair
from cupydcn.core.errors import value_error
from cupydcn.deform_conv.padding import check_padding_mode

from ._ops import (
    conv_pairs,
    deform_conv2d,
    deform_psroi_pool,
    deform_roi_pool,
    psroi_pool_options,
    roi_pool_options,
    rois_tensor,
)

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "DeformPSRoIPool",
]


def _divides(layer: str, groups_name: str, groups: int, **channels: int) -> None:
    for name, count in channels.items():
        if count % groups != 0:
            raise value_error(
                layer, f"{name} ({count}) must be divisible by {groups_name} ({groups})"
            )


class DeformConv2d(nn.Module):
    """Deformable convolution with offsets (and an optional mask) given by the caller;
    ``torchvision.ops.DeformConv2d`` with the same arguments, parameters and
    initialisation.

    ``forward(input, offset, mask=None)``: input [N, C_in, H, W], offset
    [N, 2 * G * kh * kw, H_out, W_out] ((dy, dx) pairs, G offset groups), mask
    [N, G * kh * kw, H_out, W_out] or None (DCNv1).

    Parameters: ``weight`` [C_out, C_in / groups, kh, kw], ``bias`` [C_out] (or None with
    ``bias=False``), initialised by :meth:`reset_parameters` as torchvision does:
    ``kaiming_uniform_(a=sqrt(5))`` and a bias uniform in +-1/sqrt(fan_in).
    ``padding_mode`` (keyword-only; not in torchvision) is that of
    :func:`cupydcn.deform_conv2d`: how sample points outside the map are read.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        *,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        layer = type(self).__name__
        in_channels = check_positive(layer, "in_channels", in_channels)
        out_channels = check_positive(layer, "out_channels", out_channels)
        groups = check_positive(layer, "groups", groups)
        _divides(layer, "groups", groups, in_channels=in_channels, out_channels=out_channels)
        self.padding_mode = check_padding_mode(layer, padding_mode)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = int_pair(layer, "kernel_size", kernel_size, minimum=1)
        pairs = conv_pairs(layer, stride=stride, padding=padding, dilation=dilation)
        self.stride, self.padding, self.dilation = (
            pairs["stride"],
            pairs["padding"],
            pairs["dilation"],
        )
        self.groups = groups
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
            padding_mode=self.padding_mode,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s


class DeformConv2dPack(DeformConv2d):
    """DCNv1 layer that predicts its own offsets, as mmcv's ``DeformConv2dPack`` (a
    drop-in for ``nn.Conv2d``; ``forward(input)``).

    ``conv_offset``, an ``nn.Conv2d`` with the layer's kernel, stride, padding and
    dilation, maps the input to ``2 * deform_groups * kh * kw`` offset channels; its
    weight and bias start at zero, so a fresh layer is a plain convolution and learns
    where to sample. ``weight`` is initialised as mmcv does
    (``kaiming_uniform_(nonlinearity="relu")``); ``bias`` (off by default, as in mmcv)
    starts at zero.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        *,
        padding_mode: str = "zeros",
    ) -> None:
        layer = type(self).__name__
        deform_groups = check_positive(layer, "deform_groups", deform_groups)
        _divides(
            layer,
            "deform_groups",
            deform_groups,
            in_channels=check_positive(layer, "in_channels", in_channels),
        )
        self.deform_groups = deform_groups
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode=padding_mode,
        )
        self.conv_offset = nn.Conv2d(
            in_channels,
            self._offset_channels(),
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        self.init_offset()

    def _offset_channels(self) -> int:
        return self.deform_groups * 2 * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "conv_offset"):
            self.init_offset()

    def init_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        offset = self.conv_offset(input)
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", deform_groups={self.deform_groups}"


class ModulatedDeformConv2dPack(DeformConv2dPack):
    """Modulated (DCNv2) layer that predicts its own offsets and mask, as mmcv's
    ``ModulatedDeformConv2dPack`` (a drop-in for ``nn.Conv2d``; ``forward(input)``).

    ``conv_offset`` maps the input to ``3 * deform_groups * kh * kw`` channels, split in
    thirds as mmcv does: the first two thirds are the offsets, the last, through a
    sigmoid, the mask. It starts at zero (zero offsets, mask 0.5 everywhere). ``weight``
    is uniform in +-1/sqrt(in_channels * kh * kw) and ``bias`` (on by default) zero, as
    in mmcv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        *,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            deform_groups,
            bias,
            padding_mode=padding_mode,
        )

    def _offset_channels(self) -> int:
        return self.deform_groups * 3 * self.kernel_size[0] * self.kernel_size[1]

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "conv_offset"):
            self.init_offset()

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        out = self.conv_offset(input)
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=torch.sigmoid(mask),
            padding_mode=self.padding_mode,
        )


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling with offsets (and an optional mask) from the caller, as
    mmcv's ``DeformRoIPool``; ``forward(input, rois, offset=None, mask=None)`` with
    rois [K, 5] (batch index, x1, y1, x2, y2) or a list of [L, 4] boxes per image, offset
    [K, 2, ph, pw] (x, y; in units of ``gamma`` times the RoI size), mask [K, 1, ph, pw].
    Returns [K, C, ph, pw]."""

    def __init__(
        self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1
    ) -> None:
        super().__init__()
        options = roi_pool_options(
            type(self).__name__,
            output_size=output_size,
            spatial_scale=spatial_scale,
            sampling_ratio=sampling_ratio,
            gamma=gamma,
        )
        self.output_size = options["output_size"]
        self.spatial_scale = options["spatial_scale"]
        self.sampling_ratio = options["sampling_ratio"]
        self.gamma = options["gamma"]

    def _pool(
        self, input: Tensor, rois: Tensor, offset: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        return deform_roi_pool(
            input,
            rois,
            offset,
            mask,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            gamma=self.gamma,
        )

    def forward(
        self, input: Tensor, rois: Tensor, offset: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        return self._pool(input, rois, offset, mask)

    def _rois(self, rois) -> Tensor:
        """rois [K, 5], converted once from a list of boxes per image."""
        return rois_tensor(type(self).__name__, rois)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


def _fc_stack(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    modules: list[nn.Module] = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
    for _ in range(layers - 2):
        modules += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
    modules.append(nn.Linear(hidden, out_features))
    return nn.Sequential(*modules)


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its own offsets, as mmcv's
    ``DeformRoIPoolPack``; ``forward(input, rois)``.

    The RoIs are first pooled plainly; ``offset_fc`` (Linear, ReLU, Linear, ReLU, Linear
    with ``deform_fc_channels`` hidden units; the last layer zero-initialised) maps those
    features to normalised offsets [K, 2, ph, pw], with which the RoIs are pooled again.
    ``output_channels`` is the number of input channels C.
    """

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        layer = type(self).__name__
        self.output_channels = check_positive(layer, "output_channels", output_channels)
        self.deform_fc_channels = check_positive(layer, "deform_fc_channels", deform_fc_channels)
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_stack(bins * output_channels, deform_fc_channels, bins * 2, 3)
        nn.init.zeros_(self.offset_fc[-1].weight)
        nn.init.zeros_(self.offset_fc[-1].bias)

    def _check_channels(self, input: Tensor) -> None:
        if input.shape[1] != self.output_channels:
            raise value_error(
                type(self).__name__,
                f"input has {input.shape[1]} channels; "
                f"expected output_channels = "
                f"{self.output_channels}",
            )

    def _offset(self, features: Tensor) -> Tensor:
        return self.offset_fc(features).view(-1, 2, *self.output_size)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        rois = self._rois(rois)
        features = self._pool(input, rois).flatten(1)
        return self._pool(input, rois, self._offset(features))

    def extra_repr(self) -> str:
        return (
            super().extra_repr() + f", output_channels={self.output_channels}, "
            f"deform_fc_channels={self.deform_fc_channels}"
        )


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Modulated deformable RoI pooling that predicts its own offsets and mask, as mmcv's
    ``ModulatedDeformRoIPoolPack``; ``forward(input, rois)``.

    As :class:`DeformRoIPoolPack`, plus ``mask_fc`` (Linear, ReLU, Linear, Sigmoid; the
    last Linear zero-initialised, so the mask starts at 0.5) predicting a mask
    [K, 1, ph, pw] that multiplies each bin.
    """

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(
            output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma
        )
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = nn.Sequential(
            *_fc_stack(bins * output_channels, deform_fc_channels, bins, 2), nn.Sigmoid()
        )
        nn.init.zeros_(self.mask_fc[2].weight)
        nn.init.zeros_(self.mask_fc[2].bias)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        rois = self._rois(rois)
        features = self._pool(input, rois).flatten(1)
        mask = self.mask_fc(features).view(-1, 1, *self.output_size)
        return self._pool(input, rois, self._offset(features), mask)


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling (R-FCN; MSRA DeformablePSROIPooling).

    ``forward(input, rois, offset=None)`` with input
    [N, output_dim * group_size**2, H, W], rois [K, 5], offset
    [K, 2 * num_classes, part_size, part_size] or None; returns the pooled
    [K, output_dim, pooled_size, pooled_size] (the per-bin sample counts of
    :func:`cupydcn.torch.deform_psroi_pool` are dropped).
    """

    def __init__(
        self,
        output_dim: int,
        group_size: int,
        pooled_size: int,
        part_size: int | None = None,
        sample_per_part: int = 4,
        spatial_scale: float = 1.0,
        trans_std: float = 0.1,
    ) -> None:
        super().__init__()
        options = psroi_pool_options(
            type(self).__name__,
            output_dim=output_dim,
            group_size=group_size,
            pooled_size=pooled_size,
            part_size=part_size,
            sample_per_part=sample_per_part,
            spatial_scale=spatial_scale,
            trans_std=trans_std,
        )
        self.output_dim = options["output_dim"]
        self.group_size = options["group_size"]
        self.pooled_size = options["pooled_size"]
        self.part_size = self.pooled_size if options["part_size"] is None else options["part_size"]
        self.sample_per_part = options["sample_per_part"]
        self.spatial_scale = options["spatial_scale"]
        self.trans_std = options["trans_std"]

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        output, _count = deform_psroi_pool(
            input,
            rois,
            offset,
            output_dim=self.output_dim,
            group_size=self.group_size,
            pooled_size=self.pooled_size,
            part_size=self.part_size,
            sample_per_part=self.sample_per_part,
            spatial_scale=self.spatial_scale,
            trans_std=self.trans_std,
        )
        return output

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, group_size={self.group_size}, "
            f"pooled_size={self.pooled_size}, part_size={self.part_size}, "
            f"sample_per_part={self.sample_per_part}, spatial_scale={self.spatial_scale}, "
            f"trans_std={self.trans_std}"
        )
