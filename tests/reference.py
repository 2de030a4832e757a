"""Naive float64 reference of deform_conv2d, written from docs/semantics.md §1 alone.

Deliberately loop-form and independent of cupydcn: Python loops over the batch, output
channels, output pixels, input channels and kernel taps, and the bilinear value is the
sum over integer points ``G(q, p) = g(q_y, p_y) * g(q_x, p_x)``,
``g(a, b) = max(0, 1 - |a - b|)``, over the in-map points q near p. For tiny sizes only.

One convention the semantics leave to the kernels is written down here explicitly: a
sample point with a NaN coordinate samples NaN. Padding modes (``padding_mode``): each
coordinate of the sample point is mapped by :func:`map_coordinate`, straight from the
formula of docs/semantics.md §4, and the map is then read at the mapped point as above; an
infinite coordinate under reflection maps to NaN (``inf % m`` is NaN: no limit).

Also here, for the test files: :class:`ConvConfig`, a small problem size and its random
float64 arrays.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def map_coordinate(p: float, size: int, padding_mode: str) -> float:
    """Where coordinate p along a dimension of ``size`` pixels is read (docs/semantics.md §4).

    zeros: p itself. border: p clamped into [0, size - 1]. reflection (grid_sample,
    align_corners=True): t = |p| mod 2(size - 1), p' = t if t <= size - 1 else
    2(size - 1) - t. Border and reflection give 0 when size == 1. NaN stays NaN.
    """
    p = float(p)  # Python float arithmetic: inf % m is nan without a NumPy warning
    if padding_mode == "zeros" or math.isnan(p):
        return p
    if size == 1:
        return 0.0
    if padding_mode == "border":
        return min(max(p, 0.0), size - 1.0)
    if padding_mode == "reflection":
        t = abs(p) % (2 * (size - 1))  # nan for an infinite p
        return t if t <= size - 1 else 2 * (size - 1) - t
    raise ValueError(f"unknown padding mode {padding_mode!r}")


def bilinear_value(plane: np.ndarray, py: float, px: float) -> float:
    """x(p) = sum over in-map integer points q of G(q, p) * plane[q]; plane [H, W]."""
    if math.isnan(py) or math.isnan(px):
        return math.nan
    height, width = plane.shape
    if not (-2.0 < py < height + 1.0 and -2.0 < px < width + 1.0):
        return 0.0  # G(q, p) = 0 for every integer point q of the map
    total = 0.0
    for qy in range(math.floor(py) - 1, math.floor(py) + 3):
        weight_y = max(0.0, 1.0 - abs(qy - py))
        if not 0 <= qy < height or weight_y == 0.0:
            continue
        for qx in range(math.floor(px) - 1, math.floor(px) + 3):
            weight_x = max(0.0, 1.0 - abs(qx - px))
            if 0 <= qx < width and weight_x != 0.0:
                total += weight_y * weight_x * float(plane[qy, qx])
    return total


def deform_conv2d_reference(
    input,
    offset,
    weight,
    bias=None,
    mask=None,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    padding_mode="zeros",
) -> np.ndarray:
    """y[n, co, oy, ox] = bias[co] + sum_{ci, i, j} w[co, ci, i, j] * m * x_c(p'), float64,
    p' = the sample point p with each coordinate mapped by ``padding_mode`` (zeros: p).

    input [N, C, H, W], offset [N, 2*G*kh*kw, out_h, out_w] ((dy, dx) per tap, tap
    k = i*kw + j, offset group g = c // (C // G)), weight [C_out, C/groups, kh, kw],
    bias [C_out] or None, mask [N, G*kh*kw, out_h, out_w] or None.
    Returns [N, C_out, out_h, out_w] float64.
    """
    x = np.asarray(input, dtype=np.float64)
    off = np.asarray(offset, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    b = None if bias is None else np.asarray(bias, dtype=np.float64)
    m = None if mask is None else np.asarray(mask, dtype=np.float64)
    stride_h, stride_w = _pair(stride)
    pad_h, pad_w = _pair(padding)
    dil_h, dil_w = _pair(dilation)

    batch, channels, height, width = x.shape
    out_channels, channels_per_group, kernel_h, kernel_w = w.shape
    groups = channels // channels_per_group
    out_per_group = out_channels // groups
    taps = kernel_h * kernel_w
    offset_groups = off.shape[1] // (2 * taps)
    channels_per_offset_group = channels // offset_groups
    out_h = (height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1)) // stride_h + 1
    out_w = (width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1)) // stride_w + 1

    y = np.zeros((batch, out_channels, out_h, out_w))
    for n in range(batch):
        for co in range(out_channels):
            group = co // out_per_group
            for oy in range(out_h):
                for ox in range(out_w):
                    total = 0.0 if b is None else b[co]
                    for ci in range(channels_per_group):
                        c = group * channels_per_group + ci
                        g = c // channels_per_offset_group
                        for i in range(kernel_h):
                            for j in range(kernel_w):
                                k = i * kernel_w + j
                                dy = off[n, g * 2 * taps + 2 * k, oy, ox]
                                dx = off[n, g * 2 * taps + 2 * k + 1, oy, ox]
                                py = oy * stride_h - pad_h + i * dil_h + dy
                                px = ox * stride_w - pad_w + j * dil_w + dx
                                value = bilinear_value(
                                    x[n, c],
                                    map_coordinate(py, height, padding_mode),
                                    map_coordinate(px, width, padding_mode),
                                )
                                modulation = 1.0 if m is None else m[n, g * taps + k, oy, ox]
                                total += w[co, ci, i, j] * modulation * value
                    y[n, co, oy, ox] = total
    return y


# ---------------------------------------------------------------- random test problems
# Problem sizes and random arrays shared by the test files (NumPy only, like the rest).


@dataclass(frozen=True)
class ConvConfig:
    """Sizes and options of one small deform_conv2d problem."""

    batch: int = 2
    in_channels: int = 4
    out_channels: int = 4
    height: int = 5
    width: int = 6
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    with_mask: bool = True
    with_bias: bool = True

    @property
    def out_size(self) -> tuple[int, int]:
        kernel_h, kernel_w = self.kernel
        out_h = (
            self.height + 2 * self.padding[0] - (self.dilation[0] * (kernel_h - 1) + 1)
        ) // self.stride[0] + 1
        out_w = (
            self.width + 2 * self.padding[1] - (self.dilation[1] * (kernel_w - 1) + 1)
        ) // self.stride[1] + 1
        return out_h, out_w

    @property
    def options(self) -> dict[str, tuple[int, int]]:
        """stride / padding / dilation keyword arguments."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}

    def arrays(
        self, rng: np.random.Generator, *, offset_scale: float = 1.5, away_from_kinks: bool = False
    ) -> dict[str, np.ndarray | None]:
        """Random float64 input, offset, weight, bias and mask (None where not wanted).

        Offsets are normal with ``offset_scale``; with ``away_from_kinks`` they are an
        integer in [-3, 2] plus a fraction in [0.2, 0.8], so no sample point lies within
        0.2 of an integer coordinate (where the bilinear weight has a kink).
        """
        kernel_h, kernel_w = self.kernel
        taps = kernel_h * kernel_w
        out_h, out_w = self.out_size
        offset_shape = (self.batch, 2 * self.offset_groups * taps, out_h, out_w)
        if away_from_kinks:
            offset = rng.integers(-3, 3, size=offset_shape) + rng.uniform(0.2, 0.8, offset_shape)
        else:
            offset = rng.normal(scale=offset_scale, size=offset_shape)
        return {
            "input": rng.normal(size=(self.batch, self.in_channels, self.height, self.width)),
            "offset": offset,
            "weight": rng.normal(
                size=(self.out_channels, self.in_channels // self.groups, kernel_h, kernel_w)
            ),
            "bias": rng.normal(size=self.out_channels) if self.with_bias else None,
            "mask": (
                rng.uniform(-0.5, 1.5, size=(self.batch, self.offset_groups * taps, out_h, out_w))
                if self.with_mask
                else None
            ),
        }


def base_points(config: ConvConfig) -> tuple[np.ndarray, np.ndarray]:
    """Undeformed sample coordinates of every tap and output pixel, float64 [kh*kw, out_h,
    out_w] each: ``oy*stride_h - pad_h + i*dil_h`` (y) and likewise x."""
    kernel_h, kernel_w = config.kernel
    out_h, out_w = config.out_size
    i, j = np.divmod(np.arange(kernel_h * kernel_w), kernel_w)
    y = (i * config.dilation[0])[:, None, None] + (
        np.arange(out_h) * config.stride[0] - config.padding[0]
    )[None, :, None]
    x = (j * config.dilation[1])[:, None, None] + (
        np.arange(out_w) * config.stride[1] - config.padding[1]
    )[None, None, :]
    shape = (kernel_h * kernel_w, out_h, out_w)
    return np.broadcast_to(y, shape).astype(np.float64), np.broadcast_to(x, shape).astype(
        np.float64
    )


def offsets_for_points(
    config: ConvConfig, points_y: np.ndarray, points_x: np.ndarray
) -> np.ndarray:
    """The offset [N, 2*G*K, out_h, out_w] whose sample points are (points_y, points_x),
    each [N, G, K, out_h, out_w] (float64; exact for dyadic points)."""
    base_y, base_x = base_points(config)
    offset = np.stack([points_y - base_y, points_x - base_x], axis=3)  # [N, G, K, 2, oh, ow]
    return offset.reshape(points_y.shape[0], -1, *points_y.shape[-2:])


def sample_points_of(config: ConvConfig, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`offsets_for_points`: (py, px), each [N, G, K, out_h, out_w]."""
    kernel_h, kernel_w = config.kernel
    out_h, out_w = config.out_size
    pairs = np.asarray(offset, dtype=np.float64).reshape(
        offset.shape[0], -1, kernel_h * kernel_w, 2, out_h, out_w
    )
    base_y, base_x = base_points(config)
    return base_y + pairs[:, :, :, 0], base_x + pairs[:, :, :, 1]


def far_offsets(
    config: ConvConfig, rng: np.random.Generator, *, away_from_kinks: bool = False
) -> np.ndarray:
    """Offsets putting sample points up to ~3 map sizes beyond every side of the map.

    Dyadic (multiples of 1/64), so sample points are exact in every accumulation dtype
    (and the offsets survive a cast to float16 for maps up to 9 pixels). By default a third of the
    coordinates are integers and a sixth halves (kinks of the bilinear weights and of the
    padding modes' mappings); with ``away_from_kinks`` every coordinate is an integer plus
    a fraction in [0.2, 0.8]."""
    kernel_h, kernel_w = config.kernel
    out_h, out_w = config.out_size
    shape = (config.batch, 2 * config.offset_groups * kernel_h * kernel_w, out_h, out_w)
    reach = 3 * max(config.height, config.width) + 4
    whole = rng.integers(-reach, reach + 1, size=shape).astype(np.float64)
    if away_from_kinks:
        return whole + np.round(rng.uniform(0.2, 0.8, shape) * 64) / 64
    kind = rng.random(shape)
    fraction = np.round(rng.random(shape) * 64) / 64
    fraction[kind < 1 / 3] = 0.0
    fraction[(kind >= 1 / 3) & (kind < 0.5)] = 0.5
    return whole + fraction
