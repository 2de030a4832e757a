"""Naive float64 references of the deformable-attention ops, written from
docs/semantics.md §8 alone (and §1.8 for the derivative at the kinks).

Deliberately loop-form and independent of cupydcn: Python loops over images, queries /
output pixels, heads / groups, levels and points (vectorised over channels only), one
scalar bilinear sample at a time. For tiny sizes only. The gradients are written out
analytically:

* a sample at pixel (px, py) of a map [H, W, C] blends the corners of its cell
  floor(p) + {0, 1}^2; corners outside the map read 0 (they are never read);
* d/dpx = (1-ly)(v01 - v00) + ly(v11 - v10), d/dpy = (1-lx)(v10 - v00) + lx(v11 - v01)
  from the same corners, so right-sided at integer coordinates;
* a NaN coordinate samples NaN, has NaN coordinate derivatives and no input-gradient
  corners; an infinite one samples 0 with derivative 0.

Layouts (§8): MSDA value [N, S, M, D], locations [N, Lq, M, L, P, 2] (x, y), weights
[N, Lq, M, L, P]; DCNv3 input [N, H, W, G*Cg], offset [N, Ho, Wo, G*P*2] (x, y) pairs,
mask [N, Ho, Wo, G*P], taps x-major k = iw*kh + ih; DCNv4 offset_mask [N, Ho, Wo, D]
with per group 2P offsets then P mask values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    value: np.ndarray  # [C]
    d_px: np.ndarray  # [C]
    d_py: np.ndarray  # [C]
    corners: list  # [((y, x), weight)] inside the map


def bilinear(plane: np.ndarray, px: float, py: float) -> Sample:
    """plane [H, W, C] sampled at pixel (px, py), zeros outside, with the §1.8
    derivatives."""
    height, width, channels = plane.shape
    if math.isnan(px) or math.isnan(py):
        nan = np.full(channels, math.nan)
        return Sample(nan, nan, nan, [])
    if not (math.isfinite(px) and math.isfinite(py)):
        zero = np.zeros(channels)
        return Sample(zero, zero, zero, [])
    x0, y0 = math.floor(px), math.floor(py)
    lx, ly = px - x0, py - y0

    def read(y, x):
        if 0 <= y < height and 0 <= x < width:
            return plane[y, x].astype(np.float64)
        return np.zeros(channels)

    v00, v01 = read(y0, x0), read(y0, x0 + 1)
    v10, v11 = read(y0 + 1, x0), read(y0 + 1, x0 + 1)
    value = (1 - ly) * (1 - lx) * v00 + (1 - ly) * lx * v01 + ly * (1 - lx) * v10 + ly * lx * v11
    d_px = (1 - ly) * (v01 - v00) + ly * (v11 - v10)
    d_py = (1 - lx) * (v10 - v00) + lx * (v11 - v01)
    corners = [
        ((y, x), w)
        for (y, x), w in (
            ((y0, x0), (1 - ly) * (1 - lx)),
            ((y0, x0 + 1), (1 - ly) * lx),
            ((y0 + 1, x0), ly * (1 - lx)),
            ((y0 + 1, x0 + 1), ly * lx),
        )
        if 0 <= y < height and 0 <= x < width
    ]
    return Sample(value, d_px, d_py, corners)


# ---------------------------------------------------------------------------- MSDA


def msda_reference(value, spatial_shapes, sampling_locations, attention_weights, grad_output=None):
    """(output [N, Lq, M*D], and with ``grad_output`` (grad_value, grad_locations,
    grad_weights)) of multi-scale deformable attention, float64."""
    value = np.asarray(value, dtype=np.float64)
    loc = np.asarray(sampling_locations, dtype=np.float64)
    weights = np.asarray(attention_weights, dtype=np.float64)
    n_img, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = loc.shape
    shapes = [(int(h), int(w)) for h, w in np.asarray(spatial_shapes).reshape(-1, 2)]
    starts = np.concatenate([[0], np.cumsum([h * w for h, w in shapes])])
    out = np.zeros((n_img, queries, heads, dim))
    go = None if grad_output is None else np.asarray(grad_output, np.float64).reshape(out.shape)
    g_value = np.zeros_like(value)
    g_loc = np.zeros_like(loc)
    g_w = np.zeros_like(weights)
    for n in range(n_img):
        for m in range(heads):
            planes = [
                value[n, starts[l] : starts[l + 1], m].reshape(h, w, dim)
                for l, (h, w) in enumerate(shapes)
            ]
            for q in range(queries):
                for l, (h, w) in enumerate(shapes):
                    for p in range(points):
                        x, y = loc[n, q, m, l, p]
                        a = weights[n, q, m, l, p]
                        # grid_sample, align_corners=False: pixel = coordinate * size - 0.5
                        s = bilinear(planes[l], x * w - 0.5, y * h - 0.5)
                        out[n, q, m] += a * s.value
                        if go is None:
                            continue
                        g = go[n, q, m]
                        g_w[n, q, m, l, p] = np.dot(g, s.value)
                        g_loc[n, q, m, l, p, 0] = a * w * np.dot(g, s.d_px)
                        g_loc[n, q, m, l, p, 1] = a * h * np.dot(g, s.d_py)
                        for (yy, xx), cw in s.corners:
                            g_value[n, starts[l] + yy * w + xx, m] += a * cw * g
    out = out.reshape(n_img, queries, heads * dim)
    if go is None:
        return out
    return out, (g_value, g_loc, g_w)


# ---------------------------------------------------------------------------- DCNv3 / v4


def _pair(v):
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def dcn_taps(kernel_size, remove_center=False):
    """(iw, ih) of each point in channel order: x-major, centre dropped if asked."""
    kh, kw = _pair(kernel_size)
    taps = [(iw, ih) for iw in range(kw) for ih in range(kh)]
    if remove_center:
        taps.remove((kw // 2, kh // 2))
    return taps


def dcn_output_size(height, width, kernel_size, stride=1, padding=0, dilation=1):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    return (
        (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1,
        (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1,
    )


def dcnv3_points(
    out_h, out_w, kernel_size, stride, padding, dilation, offset_scale, remove_center, offset_xy
):
    """Pixel coordinates [Ho, Wo, P, 2] (x, y) of one image and group, given its offsets
    offset_xy [Ho, Wo, P, 2]: the §8 formula, written per axis as
    o*stride - pad + c + (i*dil - c + offset) * offset_scale, c = (dil*(k-1)) // 2."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = map(_pair, (kernel_size, stride, padding, dilation))
    ch, cw = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    taps = dcn_taps((kh, kw), remove_center)
    pts = np.zeros((out_h, out_w, len(taps), 2))
    for oy in range(out_h):
        for ox in range(out_w):
            for k, (iw, ih) in enumerate(taps):
                dx, dy = offset_xy[oy, ox, k]
                pts[oy, ox, k, 0] = ox * sw - pw + cw + (iw * dw - cw + dx) * offset_scale
                pts[oy, ox, k, 1] = oy * sh - ph + ch + (ih * dh - ch + dy) * offset_scale
    return pts


def dcnv3_reference(
    input,
    offset,
    mask,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group,
    group_channels,
    offset_scale=1.0,
    remove_center=False,
    grad_output=None,
):
    """(output [N, Ho, Wo, G*Cg], and with ``grad_output`` (grad_input, grad_offset,
    grad_mask)) of DCNv3, float64."""
    x = np.asarray(input, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    mask = np.asarray(mask, dtype=np.float64)
    n_img, height, width, _ = x.shape
    out_h, out_w = dcn_output_size(height, width, kernel_size, stride, padding, dilation)
    taps = dcn_taps(kernel_size, remove_center)
    npts = len(taps)
    off = offset.reshape(n_img, out_h, out_w, group, npts, 2)
    msk = mask.reshape(n_img, out_h, out_w, group, npts)
    out = np.zeros((n_img, out_h, out_w, group, group_channels))
    go = None if grad_output is None else np.asarray(grad_output, np.float64).reshape(out.shape)
    g_in = np.zeros((n_img, height, width, group, group_channels))
    g_off = np.zeros_like(off)
    g_mask = np.zeros_like(msk)
    planes = x.reshape(n_img, height, width, group, group_channels)
    for n in range(n_img):
        for g in range(group):
            pts = dcnv3_points(
                out_h,
                out_w,
                kernel_size,
                stride,
                padding,
                dilation,
                offset_scale,
                remove_center,
                off[n, :, :, g],
            )
            plane = planes[n, :, :, g]
            for oy in range(out_h):
                for ox in range(out_w):
                    for k in range(npts):
                        s = bilinear(plane, pts[oy, ox, k, 0], pts[oy, ox, k, 1])
                        m = msk[n, oy, ox, g, k]
                        out[n, oy, ox, g] += m * s.value
                        if go is None:
                            continue
                        gg = go[n, oy, ox, g]
                        g_mask[n, oy, ox, g, k] = np.dot(gg, s.value)
                        g_off[n, oy, ox, g, k, 0] = offset_scale * m * np.dot(gg, s.d_px)
                        g_off[n, oy, ox, g, k, 1] = offset_scale * m * np.dot(gg, s.d_py)
                        for (yy, xx), cw in s.corners:
                            g_in[n, yy, xx, g] += m * cw * gg
    out = out.reshape(n_img, out_h, out_w, group * group_channels)
    if go is None:
        return out
    return out, (g_in.reshape(x.shape), g_off.reshape(offset.shape), g_mask.reshape(mask.shape))


def pack_offset_mask(offset, mask, group, points, padded_dim=None):
    """DCNv4's offset_mask [N, Ho, Wo, D] from DCNv3's offset and mask: per group 2P
    offsets (x, y pairs) then P mask values; D = padded_dim (>= G*3P), padding zero."""
    n, ho, wo, _ = offset.shape
    per_group = np.concatenate(
        [
            np.asarray(offset).reshape(n, ho, wo, group, 2 * points),
            np.asarray(mask).reshape(n, ho, wo, group, points),
        ],
        axis=-1,
    )
    packed = per_group.reshape(n, ho, wo, group * 3 * points)
    dim = group * 3 * points if padded_dim is None else padded_dim
    out = np.zeros((n, ho, wo, dim), dtype=packed.dtype)
    out[..., : group * 3 * points] = packed
    return out


def unpack_offset_mask(offset_mask, group, points):
    """(offset [N, Ho, Wo, G*P*2], mask [N, Ho, Wo, G*P]) of a packed offset_mask."""
    n, ho, wo, _ = offset_mask.shape
    per_group = np.asarray(offset_mask)[..., : group * 3 * points].reshape(
        n, ho, wo, group, 3 * points
    )
    return (
        per_group[..., : 2 * points].reshape(n, ho, wo, group * 2 * points),
        per_group[..., 2 * points :].reshape(n, ho, wo, group * points),
    )


def dcnv4_reference(
    input, offset_mask, *, group, kernel_size, remove_center=False, grad_output=None, **options
):
    """DCNv4 = DCNv3 on the unpacked offsets and mask; the gradient of the padding is 0."""
    points = len(dcn_taps(kernel_size, remove_center))
    offset, mask = unpack_offset_mask(offset_mask, group, points)
    result = dcnv3_reference(
        input,
        offset,
        mask,
        group=group,
        kernel_size=kernel_size,
        remove_center=remove_center,
        grad_output=grad_output,
        **options,
    )
    if grad_output is None:
        return result
    out, (g_in, g_off, g_mask) = result
    return out, (g_in, pack_offset_mask(g_off, g_mask, group, points, offset_mask.shape[-1]))


def dcn_options(**changes):
    """DCNv3 / DCNv4 options of the test cases: a 3 x 3 kernel with padding 1 in 2 groups
    of 3 channels, updated by ``changes``."""
    base = dict(
        kernel_size=3,
        stride=1,
        padding=1,
        dilation=1,
        group=2,
        group_channels=3,
        offset_scale=1.0,
        remove_center=False,
    )
    base.update(changes)
    return base
