"""Second-order terms of deform_conv2d along an offset direction (NumPy, CPU).

The backward of deform_conv2d, ``(gx, go, gW, gm, gb) = B(gy; x, o, W, m)``, is linear in
``gy``, in ``x``, in ``W`` and in ``m`` separately, so the derivatives of ``<v, B>`` along
the cotangents ``v = (vx, vo, vW, vm, vb)`` of its outputs are, except for the ``vo``
terms, deform_conv2d forward and backward calls again (cupydcn.torch and cupydcn.jax build
their double backward from those). What is left needs the second derivatives of bilinear
sampling and is computed here: with ``T = dS/dp . vo`` (the derivative of every sampled
value S along the offset direction ``vo``), ``colgrad = W^T gy`` (the gradient of the
im2col columns) and ``m`` the mask (ones without one),

    grad_output  sum_k W * (m T)                 (the JVP of the output along vo)
    weight       gy (m T)^T
    mask         sum_c colgrad T
    input        the corners' weights of T, times colgrad m, scattered to the corners
    offset       sum_c colgrad m d2S/dpy dpx (vx, vy)   (bilinear: d2S/dp2 = 0)

of the scalar ``<gy, sum_k W m T>``, i.e. ``<go, vo>`` differentiated with respect to
each argument (grad_output included).

Conventions: those of the first-order backends for finite points with padding_mode
"zeros" (corners ``floor(p) + {0, 1}``, corners outside the map read 0, the derivative at
an integer coordinate is that of the cell ``floor(p)``). Not covered: padding_mode
"border"/"reflection" (a CupydcnValueError says so); a non-finite sample point
contributes nothing here (the first-order ops give NaN there). NumPy arrays are computed
here in float64 (any input dtype) and returned in the input dtype; other arrays (CuPy,
torch, JAX, any DLPack array) go through cupydcn's dispatch: on a CUDA device to the
kernels of cupydcn/cuda/kernels/deform_conv_second_order.cu
(:mod:`cupydcn.deform_conv.second_order_cuda`, in the accumulation dtype), on the CPU to
this NumPy code.
"""

from __future__ import annotations

import numpy as np

from cupydcn.core.errors import value_error
from cupydcn.deform_conv.spec import conv_geometry

OP = "deform_conv2d_offset_second_order"
TERM_NAMES = ("grad_output", "input", "offset", "weight", "mask")


def offset_second_order(
    grad_output,
    input,
    offset,
    weight,
    mask,
    offset_tangent,
    *,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode: str = "zeros",
    wrt=TERM_NAMES,
) -> dict:
    """The derivatives of ``<grad_offset, offset_tangent>`` (grad_offset of
    ``deform_conv2d_backward(grad_output, input, offset, weight, mask)``) with respect to
    the names in ``wrt`` (of :data:`TERM_NAMES`; "mask" only with a mask), as a dict of
    arrays shaped like those arguments: NumPy arrays for NumPy arguments, otherwise the
    caller's array type (computed on the arrays' device, see the module docstring)."""
    arrays = {
        "grad_output": grad_output,
        "input": input,
        "offset": offset,
        "weight": weight,
        "mask": mask,
        "offset_tangent": offset_tangent,
    }
    options = dict(
        stride=stride, padding=padding, dilation=dilation, padding_mode=padding_mode, wrt=wrt
    )
    if any(a is not None and not isinstance(a, np.ndarray) for a in arrays.values()):
        return _dispatched(arrays, options)
    geom = checked_geometry(*arrays.values(), **options)
    return _numpy_terms(*arrays.values(), geom, wrt)


def _dispatched(arrays: dict, options: dict) -> dict:
    """offset_second_order of non-NumPy arrays through cupydcn's dispatch (the CUDA
    kernels on a device, the NumPy code on the CPU), as a dict in the caller's type."""
    from cupydcn.core.dispatch import Backends, Prepared, dispatch

    wrt = options["wrt"]
    names = tuple(n for n in TERM_NAMES if n in wrt and (n != "mask" or arrays["mask"] is not None))

    def prepare(native):
        return Prepared(checked_geometry(*native.values(), **options), {})

    def on_numpy(*args):
        *values, geom = args
        terms = _numpy_terms(*values, geom, wrt)
        return tuple(terms[n] for n in names)

    def on_cuda(launcher, *args):
        from cupydcn.deform_conv.second_order_cuda import offset_second_order_terms

        *values, geom = args
        terms = offset_second_order_terms(launcher, *values, geom, wrt)
        return tuple(terms[n] for n in names)

    result = dispatch(
        OP,
        arrays,
        required=("grad_output", "input", "offset", "weight", "offset_tangent"),
        prepare=prepare,
        backends=Backends(numpy=on_numpy, cuda=on_cuda),
    )
    return dict(zip(names, result))


def checked_geometry(
    grad_output,
    input,
    offset,
    weight,
    mask,
    offset_tangent,
    *,
    stride,
    padding,
    dilation,
    padding_mode,
    wrt,
):
    """Every check of an offset_second_order call; its geometry (shared by the NumPy and
    CUDA versions)."""
    if padding_mode != "zeros":
        raise value_error(
            OP,
            f"second derivatives along the offsets are implemented for "
            f"padding_mode='zeros' only; got {padding_mode!r}",
        )
    geom = conv_geometry(
        input,
        offset,
        weight,
        None,
        mask,
        stride=stride,
        padding=padding,
        dilation=dilation,
        op=OP,
        grad_output=grad_output,
    )
    if offset_tangent.shape != offset.shape:
        raise value_error(
            OP,
            f"offset_tangent has shape {offset_tangent.shape}; expected the "
            f"offset shape {offset.shape}",
        )
    unknown = set(wrt) - set(TERM_NAMES)
    if unknown:
        raise value_error(OP, f"unknown wrt names {sorted(unknown)}; expected {TERM_NAMES}")
    return geom


def _numpy_terms(grad_output, input, offset, weight, mask, offset_tangent, geom, wrt) -> dict:
    """The NumPy computation of offset_second_order (checked arguments)."""
    f8 = np.float64
    n, c, h, w = geom.input_shape
    g, k, kw = geom.offset_groups, geom.taps, geom.kernel_w
    ow, p = geom.out_w, geom.out_h * geom.out_w
    cg = c // g  # channels per offset group
    gr, c_out = geom.groups, geom.out_channels
    cin, cout = c // gr, c_out // gr  # channels per convolution group

    # Sample points py, px [n, g, k, p] and the tangent (vy, vx) of each.
    taps_i, taps_j = np.divmod(np.arange(k), kw)
    oy, ox = np.divmod(np.arange(p), ow)
    base_y = oy[None, :] * geom.stride_h - geom.pad_h + taps_i[:, None] * geom.dil_h
    base_x = ox[None, :] * geom.stride_w - geom.pad_w + taps_j[:, None] * geom.dil_w
    off = offset.astype(f8).reshape(n, g, k, 2, p)
    tan = offset_tangent.astype(f8).reshape(n, g, k, 2, p)
    py, px = base_y + off[:, :, :, 0], base_x + off[:, :, :, 1]
    vy, vx = tan[:, :, :, 0], tan[:, :, :, 1]
    finite = np.isfinite(py) & np.isfinite(px)
    py, px = np.where(finite, py, 0.0), np.where(finite, px, 0.0)
    y0, x0 = np.floor(py), np.floor(px)
    ly, lx = py - y0, px - x0
    m = np.ones((n, g, k, p)) if mask is None else mask.astype(f8).reshape(n, g, k, p)

    planes = input.astype(f8).reshape(n, g, cg, h * w)
    corners = []  # (flat index, valid, a_y, a_x, da_y, da_x, values [n, g, cg, k, p])
    for dy in (0, 1):
        for dx in (0, 1):
            cy, cx = y0 + dy, x0 + dx
            valid = finite & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
            index = (np.clip(cy, 0, h - 1) * w + np.clip(cx, 0, w - 1)).astype(np.int64)
            values = np.take_along_axis(planes, index.reshape(n, g, 1, k * p), axis=3)
            values = values.reshape(n, g, cg, k, p) * valid[:, :, None]
            a_y, da_y = (1.0 - ly, -1.0) if dy == 0 else (ly, 1.0)
            a_x, da_x = (1.0 - lx, -1.0) if dx == 0 else (lx, 1.0)
            corners.append((index, valid, a_y, a_x, da_y, da_x, values))

    # T = dS/dp . v, per channel [n, g, cg, k, p]; the coefficient of each corner's value.
    coefficients = [da_y * a_x * vy + a_y * da_x * vx for _, _, a_y, a_x, da_y, da_x, _ in corners]
    t = sum(values * coef[:, :, None] for (*_, values), coef in zip(corners, coefficients))

    def by_conv_group(a):  # [n, g, cg, k, p] -> [n, gr, cin * k, p]
        return a.reshape(n, c, k, p).reshape(n, gr, cin * k, p)

    gy = grad_output.astype(f8).reshape(n, gr, cout, p)
    wg = weight.astype(f8).reshape(gr, cout, cin * k)
    columns = m[:, :, None] * t
    out = {}
    if "grad_output" in wrt:
        out["grad_output"] = (
            np.einsum("goq,ngqp->ngop", wg, by_conv_group(columns))
            .reshape(grad_output.shape)
            .astype(grad_output.dtype)
        )
    if "weight" in wrt:
        out["weight"] = (
            np.einsum("ngop,ngqp->goq", gy, by_conv_group(columns))
            .reshape(weight.shape)
            .astype(weight.dtype)
        )
    if not {"mask", "input", "offset"} & set(wrt):
        return out
    colgrad = np.einsum("goq,ngop->ngqp", wg, gy).reshape(n, g, cg, k, p)
    if "mask" in wrt and mask is not None:
        out["mask"] = (colgrad * t).sum(axis=2).reshape(mask.shape).astype(mask.dtype)
    a = colgrad * m[:, :, None]
    if "offset" in wrt:
        cross = sum(values * (da_y * da_x) for _, _, _, _, da_y, da_x, values in corners)
        grad = np.empty((n, g, k, 2, p))
        grad[:, :, :, 0] = (a * cross).sum(axis=2) * vx
        grad[:, :, :, 1] = (a * cross).sum(axis=2) * vy
        out["offset"] = grad.reshape(offset.shape).astype(offset.dtype)
    if "input" in wrt:
        planes_index = np.arange(n * g * cg).reshape(n, g, cg, 1) * (h * w)
        total = np.zeros(n * g * cg * h * w)
        for (index, valid, *_), coef in zip(corners, coefficients):
            contribution = a * (coef * valid)[:, :, None]
            flat = planes_index + index.reshape(n, g, 1, k * p)
            total += np.bincount(
                flat.ravel(),
                weights=contribution.reshape(n, g, cg, k * p).ravel(),
                minlength=total.size,
            )
        out["input"] = total.reshape(input.shape).astype(input.dtype)
    return out
