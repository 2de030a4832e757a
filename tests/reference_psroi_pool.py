"""deform_psroi_pool in float64 loops, written straight from docs/semantics.md §3.

Used only by the tests; independent of cupydcn (no import of it). One Python iteration
per (RoI, output channel, bin, sample), so keep problems small. The backward is MSRA's
DeformablePSROIPoolBackwardAccKernel transcribed: bilinear corners floor(p) and ceil(p)
of the clamped sample, so the coordinate derivative is 0 where they coincide (an integer
coordinate, which includes every clamped one), and the count of a bin is a constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def round_half_away(value: float) -> float:
    """C's round(): halves away from zero (Python's round() rounds them to even)."""
    whole = math.trunc(value)
    return whole + (math.copysign(1.0, value) if abs(value - whole) >= 0.5 else 0.0)


@dataclass(frozen=True)
class Options:
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int | None = None
    sample_per_part: int = 4
    spatial_scale: float = 1.0
    trans_std: float = 0.1

    @property
    def parts(self) -> int:
        return self.pooled_size if self.part_size is None else self.part_size


def _bin(roi, offset, k, cls, ph, pw, o: Options):
    """(hstart, wstart, sub_h, sub_w, roi_h, roi_w, part_h, part_w) of bin (ph, pw)."""
    P, S = o.pooled_size, o.parts
    start_w = round_half_away(float(roi[1])) * o.spatial_scale - 0.5
    start_h = round_half_away(float(roi[2])) * o.spatial_scale - 0.5
    end_w = (round_half_away(float(roi[3])) + 1) * o.spatial_scale - 0.5
    end_h = (round_half_away(float(roi[4])) + 1) * o.spatial_scale - 0.5
    roi_w = max(end_w - start_w, 0.1)
    roi_h = max(end_h - start_h, 0.1)
    bin_w, bin_h = roi_w / P, roi_h / P
    part_h, part_w = ph * S // P, pw * S // P  # floor(i / P * S), exactly
    off_x = off_y = 0.0
    if offset is not None:
        off_x = float(offset[k, 2 * cls, part_h, part_w])
        off_y = float(offset[k, 2 * cls + 1, part_h, part_w])
    wstart = pw * bin_w + start_w + o.trans_std * off_x * roi_w
    hstart = ph * bin_h + start_h + o.trans_std * off_y * roi_h
    return (
        hstart,
        wstart,
        bin_h / o.sample_per_part,
        bin_w / o.sample_per_part,
        roi_h,
        roi_w,
        part_h,
        part_w,
    )


def _bins(rois, offset, o: Options):
    """Yield (k, d, ph, pw, batch, channel, cls, bin) for every output element."""
    P, G, D = o.pooled_size, o.group_size, o.output_dim
    num_classes = 1 if offset is None else offset.shape[1] // 2
    for k in range(rois.shape[0]):
        for d in range(D):
            cls = d // (D // num_classes)
            for ph in range(P):
                for pw in range(P):
                    gh = min(max(math.floor(ph * G / P), 0), G - 1)
                    gw = min(max(math.floor(pw * G / P), 0), G - 1)
                    channel = (d * G + gh) * G + gw
                    yield (
                        k,
                        d,
                        ph,
                        pw,
                        int(rois[k, 0]),
                        channel,
                        cls,
                        _bin(rois[k], offset, k, cls, ph, pw, o),
                    )


def _samples(bin_, o: Options, height: int, width: int):
    """Yield the kept samples (h, w), clamped, of one bin."""
    hstart, wstart, sub_h, sub_w = bin_[:4]
    for ih in range(o.sample_per_part):
        for iw in range(o.sample_per_part):
            w = wstart + iw * sub_w
            h = hstart + ih * sub_h
            if w < -0.5 or w > width - 0.5 or h < -0.5 or h > height - 0.5:
                continue
            yield min(max(h, 0.0), height - 1.0), min(max(w, 0.0), width - 1.0)


def _corners(h: float, w: float):
    """MSRA's corners: (y0, y1, x0, x1, dist_y, dist_x) with y1 = ceil(h)."""
    y0, x0 = math.floor(h), math.floor(w)
    return y0, math.ceil(h), x0, math.ceil(w), h - y0, w - x0


def forward(input, rois, offset, o: Options):
    """(output, count) [K, output_dim, P, P] in float64."""
    x = np.asarray(input, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    offset = None if offset is None else np.asarray(offset, dtype=np.float64)
    _, _, height, width = x.shape
    shape = (rois.shape[0], o.output_dim, o.pooled_size, o.pooled_size)
    output, count = np.zeros(shape), np.zeros(shape, dtype=np.int64)
    for k, d, ph, pw, b, c, _, bin_ in _bins(rois, offset, o):
        total, kept = 0.0, 0
        for h, w in _samples(bin_, o, height, width):
            y0, y1, x0, x1, dy, dx = _corners(h, w)
            plane = x[b, c]
            total += (
                (1 - dx) * (1 - dy) * plane[y0, x0]
                + (1 - dx) * dy * plane[y1, x0]
                + dx * (1 - dy) * plane[y0, x1]
                + dx * dy * plane[y1, x1]
            )
            kept += 1
        output[k, d, ph, pw] = total / kept if kept else 0.0
        count[k, d, ph, pw] = kept
    return output, count


def backward(grad_output, input, rois, offset, o: Options):
    """(grad_input, grad_offset or None) in float64, MSRA's backward."""
    x = np.asarray(input, dtype=np.float64)
    g = np.asarray(grad_output, dtype=np.float64)
    rois = np.asarray(rois, dtype=np.float64)
    offset = None if offset is None else np.asarray(offset, dtype=np.float64)
    _, _, height, width = x.shape
    grad_input = np.zeros_like(x)
    grad_offset = None if offset is None else np.zeros_like(offset)
    for k, d, ph, pw, b, c, cls, bin_ in _bins(rois, offset, o):
        samples = list(_samples(bin_, o, height, width))
        if not samples:
            continue
        diff = g[k, d, ph, pw] / len(samples)
        roi_h, roi_w, part_h, part_w = bin_[4:]
        plane = x[b, c]
        for h, w in samples:
            y0, y1, x0, x1, dy, dx = _corners(h, w)
            grad_input[b, c, y0, x0] += (1 - dx) * (1 - dy) * diff
            grad_input[b, c, y1, x0] += (1 - dx) * dy * diff
            grad_input[b, c, y0, x1] += dx * (1 - dy) * diff
            grad_input[b, c, y1, x1] += dx * dy * diff
            if grad_offset is None:
                continue
            u00, u01, u10, u11 = plane[y0, x0], plane[y1, x0], plane[y0, x1], plane[y1, x1]
            d_x = (u11 * dy + u10 * (1 - dy) - u01 * dy - u00 * (1 - dy)) * o.trans_std * diff
            d_y = (u11 * dx + u01 * (1 - dx) - u10 * dx - u00 * (1 - dx)) * o.trans_std * diff
            grad_offset[k, 2 * cls, part_h, part_w] += d_x * roi_w
            grad_offset[k, 2 * cls + 1, part_h, part_w] += d_y * roi_h
    return grad_input, grad_offset


def sample_coordinates(rois, offset, o: Options) -> np.ndarray:
    """[M, 2] every (h, w) sample position before the skip test and the clamp."""
    rois = np.asarray(rois, dtype=np.float64)
    offset = None if offset is None else np.asarray(offset, dtype=np.float64)
    points = []
    for *_, bin_ in _bins(rois, offset, o):
        hstart, wstart, sub_h, sub_w = bin_[:4]
        for ih in range(o.sample_per_part):
            for iw in range(o.sample_per_part):
                points.append((hstart + ih * sub_h, wstart + iw * sub_w))
    return np.array(points).reshape(-1, 2)


# ---------------------------------------------------------------- random test problems
# Problem sizes and random arrays shared by the test files (NumPy and ml_dtypes only).


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# [batch_index, x1, y1, x2, y2] in image coordinates: inside, partly outside, wholly
# outside, degenerate (one pixel), covering the map, reversed corners (size clamped to
# 0.1), and halves that round away from zero.
MIXED_ROIS = [
    [0, 1, 2, 14, 16],
    [1, -6, 4, 8, 80],
    [0, -100, -100, -60, -60],
    [1, 5, 7, 5, 7],
    [0, 0, 0, 40, 34],
    [1, 9, 3, 6, 1],
    [0, 2.5, -2.5, 11.5, 8.5],
]

CONFIGS = {
    # several classes, group_size = pooled_size = part_size
    "basic": dict(
        batch=2,
        height=9,
        width=11,
        output_dim=4,
        group_size=3,
        pooled_size=3,
        part_size=3,
        sample_per_part=2,
        num_classes=2,
        spatial_scale=0.5,
        trans_std=0.3,
        offset_std=1.0,
    ),
    # several bins per offset cell (P > S), group_size != pooled_size
    "parts_coarser": dict(
        batch=2,
        height=8,
        width=10,
        output_dim=3,
        group_size=2,
        pooled_size=4,
        part_size=2,
        sample_per_part=3,
        num_classes=1,
        spatial_scale=0.5,
        trans_std=0.2,
        offset_std=1.0,
    ),
    # offset cells without bins (P < S)
    "parts_finer": dict(
        batch=2,
        height=7,
        width=9,
        output_dim=2,
        group_size=1,
        pooled_size=2,
        part_size=3,
        sample_per_part=2,
        num_classes=2,
        spatial_scale=0.5,
        trans_std=0.25,
        offset_std=1.0,
    ),
    "group_ne_pooled": dict(
        batch=2,
        height=9,
        width=8,
        output_dim=2,
        group_size=2,
        pooled_size=5,
        part_size=5,
        sample_per_part=2,
        num_classes=1,
        spatial_scale=0.5,
        trans_std=0.1,
        offset_std=1.0,
    ),
    # large offsets push bins partly and wholly off the map
    "offsets_off_map": dict(
        batch=2,
        height=6,
        width=7,
        output_dim=2,
        group_size=2,
        pooled_size=2,
        part_size=2,
        sample_per_part=3,
        num_classes=1,
        spatial_scale=0.25,
        trans_std=0.5,
        offset_std=3.0,
    ),
    # a map of one row: every sample is clamped in y
    "one_row_map": dict(
        batch=2,
        height=1,
        width=5,
        output_dim=2,
        group_size=1,
        pooled_size=2,
        part_size=2,
        sample_per_part=2,
        num_classes=2,
        spatial_scale=0.125,
        trans_std=0.1,
        offset_std=1.0,
    ),
    "three_classes": dict(
        batch=2,
        height=8,
        width=8,
        output_dim=6,
        group_size=2,
        pooled_size=3,
        part_size=3,
        sample_per_part=2,
        num_classes=3,
        spatial_scale=0.5,
        trans_std=0.1,
        offset_std=1.0,
    ),
    "no_trans": dict(
        batch=2,
        height=9,
        width=11,
        output_dim=4,
        group_size=2,
        pooled_size=3,
        part_size=3,
        sample_per_part=2,
        num_classes=0,
        spatial_scale=0.5,
        trans_std=0.1,
        offset_std=0.0,
    ),
}

OPTION_NAMES = (
    "output_dim",
    "group_size",
    "pooled_size",
    "part_size",
    "sample_per_part",
    "spatial_scale",
    "trans_std",
)


def options(cfg) -> dict:
    return {name: cfg[name] for name in OPTION_NAMES}


def problem(cfg, dtype_name="float64", seed=0, rois=MIXED_ROIS):
    """(input, rois, offset or None, grad_output) with input/offset/grad in ``dtype_name``."""
    rng = np.random.default_rng(seed)
    dtype = _dtype(dtype_name)
    channels = cfg["output_dim"] * cfg["group_size"] ** 2
    input = rng.standard_normal((cfg["batch"], channels, cfg["height"], cfg["width"]))
    rois = np.array(rois, dtype=np.float64)
    offset = None
    if cfg["num_classes"]:
        shape = (len(rois), 2 * cfg["num_classes"], cfg["part_size"], cfg["part_size"])
        offset = (cfg["offset_std"] * rng.standard_normal(shape)).astype(dtype)
    pooled = cfg["pooled_size"]
    grad_output = rng.standard_normal((len(rois), cfg["output_dim"], pooled, pooled))
    return input.astype(dtype), rois, offset, grad_output.astype(dtype)
