"""The ops past 2^31 elements: cupydcn's 64-bit-index kernels, which only a large GPU can hold.

    python benchmarks/gpu_session/large_index.py [--budget-s 90] [--json FILE] [--cases conv,roi,psroi]
    python benchmarks/gpu_session/large_index.py --small    # the same checks, tiny, on the CPU

Each op runs once, in float16, on a problem with more than 2^31 elements in its input (and,
for deform_conv2d, in its column buffer too: one chunk, ``workspace_bytes`` set high), so
cupydcn picks its 64-bit-index kernels (it does so past 2^31 - 1 - 2^24 elements). The
result is compared with

- the same op on pieces small enough for the 32-bit kernels: deform_conv2d on sub-batches
  (the whole batch, piece by piece; grad_weight and grad_bias as the pieces' sum),
  deform_roi_pool / deform_psroi_pool with the RoIs of each chosen image on that image
  alone (the first image, the one that starts at or past element 2^31, and the last), and
  grad_input checked to be zero in every other image;
- the NumPy backend, in float32 on the same float16 values, for the last image;

forward and backward (the backward only when the time and the memory allow). Only the
public API is used: cupydcn.deform_conv2d, deform_roi_pool, deform_psroi_pool and their
``_backward``, on CuPy arrays.

Sizes (float16): deform_conv2d N=8200, 64 -> 64 channels, 64 x 64, 3 x 3, stride 2, offset
groups 2: input 2.15e9 elements, columns 4.84e9 (float32), about 28 GB for the forward and
62 GB for the backward; the RoI ops share one input [2056, 64, 128, 128] = 2.16e9 elements
(image 2048 starts at element 2^31), about 17 GB with the backward.

``--small`` runs the same code on tiny sizes with NumPy arrays (the test suite does): it
checks the comparisons themselves, not the 64-bit path.

Exit status: 0 every check passed, 1 a check failed, 3 skipped (no CUDA device, too little
memory); the last line is ``RESULT: ok|failed|skipped: ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

LIMIT = 2**31
HALF_TOL = 2e-3  # max |error| / max |reference| for float16 (cupydcn check's tolerance)
SUM_TOL = 5e-3  # gradients summed over pieces: each piece was rounded to float16 once
EXACT = 0.0


@dataclass(frozen=True)
class ConvSize:
    n: int
    c: int
    h: int
    w: int
    c_out: int
    k: int
    stride: int
    pad: int
    offset_groups: int
    piece: int  # images per reference sub-batch

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((s + 2 * self.pad - self.k) // self.stride + 1 for s in (self.h, self.w))

    @property
    def pixels(self) -> int:
        oh, ow = self.out_hw
        return oh * ow

    def elements(self) -> dict[str, int]:
        taps = self.k * self.k
        return {
            "input": self.n * self.c * self.h * self.w,
            "columns": self.n * self.c * taps * self.pixels,
            "output": self.n * self.c_out * self.pixels,
            "offset+mask": self.n * 3 * self.offset_groups * taps * self.pixels,
        }

    def bytes_needed(self, backward: bool) -> int:
        e = self.elements()
        inputs = 2 * (e["input"] + e["offset+mask"])
        if not backward:
            return inputs + 2 * e["output"] + 4 * (e["columns"] + e["output"]) + 2**29
        per_image_grad = 4 * self.n * self.c_out * self.c * self.k * self.k
        # inputs and their gradients, grad_output, the float32 columns and their gradient,
        # grad_input's float32 accumulator, grad_output widened; one more column-sized
        # buffer in case the GEMM with the transposed columns copies them.
        return (
            2 * inputs
            + 2 * e["output"]
            + 4 * (3 * e["columns"] + e["input"] + e["output"])
            + per_image_grad
            + 2**29
        )


@dataclass(frozen=True)
class RoiSize:
    n: int
    c: int
    h: int
    w: int
    rois_per_image: int
    roi_output: tuple[int, int]
    sampling_ratio: int
    output_dim: int  # psroi: c = output_dim * group_size**2
    group_size: int
    pooled_size: int
    sample_per_part: int

    def elements(self) -> dict[str, int]:
        return {"input": self.n * self.c * self.h * self.w}

    def bytes_needed(self, backward: bool) -> int:
        e = self.elements()["input"]
        return (2 * e + (6 * e if backward else 0)) + 2**29

    def images(self) -> list[int]:
        """The first image, the first that starts at or past element 2^31, the last."""
        per_image = self.c * self.h * self.w
        boundary = min(-(-LIMIT // per_image), self.n - 2)
        if boundary * per_image < LIMIT:  # small sizes: no image reaches 2^31
            boundary = self.n // 2
        return sorted({0, boundary, self.n - 1})


FULL_CONV = ConvSize(
    n=8200, c=64, h=64, w=64, c_out=64, k=3, stride=2, pad=1, offset_groups=2, piece=2050
)
SMALL_CONV = ConvSize(n=6, c=4, h=9, w=10, c_out=6, k=3, stride=2, pad=1, offset_groups=2, piece=2)
FULL_ROI = RoiSize(
    n=2056,
    c=64,
    h=128,
    w=128,
    rois_per_image=8,
    roi_output=(7, 7),
    sampling_ratio=2,
    output_dim=4,
    group_size=4,
    pooled_size=4,
    sample_per_part=2,
)
SMALL_ROI = RoiSize(
    n=5,
    c=16,
    h=12,
    w=11,
    rois_per_image=3,
    roi_output=(3, 4),
    sampling_ratio=0,
    output_dim=4,
    group_size=2,
    pooled_size=2,
    sample_per_part=2,
)


# ---------------------------------------------------------------------------- plumbing
def host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


class Device:
    """The array module and what differs between CuPy and NumPy."""

    def __init__(self, xp):
        self.xp = xp
        self.cuda = xp is not np

    def sync(self) -> None:
        if self.cuda:
            self.xp.cuda.Device().synchronize()

    def free(self) -> None:
        if self.cuda:
            self.xp.get_default_memory_pool().free_all_blocks()

    def free_bytes(self) -> int:
        if not self.cuda:
            return 2**62
        self.free()
        return int(self.xp.cuda.Device().mem_info[0])


class Random:
    """float32 draws turned into the array's dtype in pieces (bounded temporaries)."""

    PIECE = 2**27

    def __init__(self, dev: Device, seed: int):
        self.dev = dev
        self.gen = dev.xp.random.RandomState(seed) if dev.cuda else np.random.default_rng(seed)

    def _draw(self, n: int, normal: bool):
        if not self.dev.cuda:
            return (
                self.gen.standard_normal(n, dtype=np.float32)
                if normal
                else self.gen.random(n, dtype=np.float32)
            )
        even = n + (n & 1)  # cuRAND draws normals in pairs
        draw = (
            self.gen.standard_normal(even, dtype=np.float32)
            if normal
            else self.gen.random_sample(even, dtype=np.float32)
        )
        return draw[:n]

    def fill(self, shape, dtype, *, normal: bool = True, scale: float = 1.0):
        out = self.dev.xp.empty(shape, dtype=dtype)
        flat = out.reshape(-1)
        for start in range(0, flat.size, self.PIECE):
            stop = min(flat.size, start + self.PIECE)
            flat[start:stop] = (self._draw(stop - start, normal) * scale).astype(dtype)
        return out


def relative_error(got, ref) -> float:
    """max |got - ref| / max |ref| in float32 (inf when either is not finite)."""
    if hasattr(got, "get") != hasattr(ref, "get"):
        got, ref = host(got), host(ref)
    xp = sys.modules["cupy"] if hasattr(got, "get") else np
    if got.shape != ref.shape:
        return math.inf
    if ref.size == 0:
        return 0.0
    g = got.astype(xp.float32)
    r = ref.astype(xp.float32)
    error = float(xp.abs(g - r).max())
    scale = float(xp.abs(r).max())
    if not (math.isfinite(error) and math.isfinite(scale)):
        return math.inf
    return error / max(scale, 1e-30) if scale > 0 else error


@dataclass
class Check:
    case: str
    what: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return math.isfinite(self.error) and self.error <= self.tolerance


@dataclass
class Session:
    dev: Device
    budget_s: float
    started: float = field(default_factory=time.monotonic)
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def record(self, case: str, what: str, error: float, tolerance: float) -> Check:
        result = Check(case, what, error, tolerance)
        self.checks.append(result)
        self.say(
            f"  {case:6} {what:52} {result.error:10.2e} {tolerance:8.0e}  "
            f"{'ok' if result.ok else 'FAILED'}"
        )
        return result

    def check(self, case: str, what: str, got, ref, tolerance: float) -> Check:
        return self.record(case, what, relative_error(got, ref), tolerance)

    def fail(self, case: str, what: str, exc: BaseException) -> None:
        self.checks.append(
            Check(
                case,
                f"{what}: raised {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''}",
                math.inf,
                0.0,
            )
        )
        self.say(f"  {case:6} {what}: raised {type(exc).__name__}: {exc}")

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        self.say(f"  skipped: {what}")

    def timed(self, function, *args, **kwargs):
        self.dev.sync()
        start = time.monotonic()
        result = function(*args, **kwargs)
        self.dev.sync()
        return result, time.monotonic() - start


def _fits(session: Session, what: str, needed: int) -> bool:
    free = session.dev.free_bytes()
    if needed > free:
        session.skip(f"{what}: needs about {needed / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
        return False
    return True


def _has_time(session: Session, what: str, seconds: float) -> bool:
    if session.left() < seconds:
        session.skip(
            f"{what}: about {seconds:.0f} s needed, {max(session.left(), 0):.0f} s "
            "of the budget left"
        )
        return False
    return True


def _is_oom(exc: BaseException) -> bool:
    return "OutOfMemory" in type(exc).__name__


# ---------------------------------------------------------------------------- deform_conv2d
def conv_case(session: Session, size: ConvSize, dtype) -> None:
    import cupydcn

    dev = session.dev
    e = size.elements()
    session.say(
        f"deform_conv2d: N={size.n}, {size.c} -> {size.c_out} channels, "
        f"{size.h} x {size.w}, {size.k} x {size.k}, stride {size.stride}, offset groups "
        f"{size.offset_groups}; input {e['input']:.3g} elements, columns "
        f"{e['columns']:.3g}, output {e['output']:.3g}"
    )
    if not _fits(session, "deform_conv2d", size.bytes_needed(backward=False)):
        return
    rng = Random(dev, 1)
    taps = size.k * size.k
    oh, ow = size.out_hw
    options = dict(stride=size.stride, padding=size.pad)
    big = dict(workspace_bytes=2**50)  # one chunk: the column buffer holds the whole batch
    inp = rng.fill((size.n, size.c, size.h, size.w), dtype)
    off = rng.fill((size.n, 2 * size.offset_groups * taps, oh, ow), dtype, scale=2.0)
    mask = rng.fill((size.n, size.offset_groups * taps, oh, ow), dtype, normal=False)
    weight = rng.fill(
        (size.c_out, size.c, size.k, size.k), dtype, scale=1 / math.sqrt(size.c * taps)
    )
    bias = rng.fill((size.c_out,), dtype)
    pieces = [(s, min(s + size.piece, size.n)) for s in range(0, size.n, size.piece)]
    last = slice(size.n - 1, size.n)

    def numpy_args(sl):
        return [host(a[sl]).astype(np.float32) for a in (inp, off)] + [
            host(mask[sl]).astype(np.float32)
        ]

    case_start = time.monotonic()
    out, seconds = session.timed(
        cupydcn.deform_conv2d, inp, off, weight, bias, mask=mask, **options, **big
    )
    session.say(f"  forward: {seconds:.2f} s")
    worst = 0.0
    for start, stop in pieces:
        sub = cupydcn.deform_conv2d(
            inp[start:stop], off[start:stop], weight, bias, mask=mask[start:stop], **options
        )
        worst = max(worst, relative_error(out[start:stop], sub))
        del sub
    session.record("conv", f"forward vs {len(pieces)} sub-batches (32-bit)", worst, HALF_TOL)
    x, o, m = numpy_args(last)
    ref = cupydcn.deform_conv2d(
        x, o, host(weight).astype(np.float32), host(bias).astype(np.float32), mask=m, **options
    )
    session.check("conv", "forward, last image vs NumPy backend", out[last], ref, HALF_TOL)
    del out
    dev.free()
    forward_s = time.monotonic() - case_start

    if not _has_time(session, "deform_conv2d backward", 10 + 3 * forward_s):
        return
    if not _fits(session, "deform_conv2d backward", size.bytes_needed(backward=True)):
        return
    go = rng.fill((size.n, size.c_out, oh, ow), dtype)
    grads, seconds = session.timed(
        cupydcn.deform_conv2d_backward, go, inp, off, weight, mask, **options, **big
    )
    session.say(f"  backward: {seconds:.2f} s")
    dev.free()
    errors = {name: 0.0 for name in ("grad_input", "grad_offset", "grad_mask")}
    weight_sum = np.zeros(weight.shape, np.float64)
    bias_sum = np.zeros(bias.shape, np.float64)
    for start, stop in pieces:
        sub = cupydcn.deform_conv2d_backward(
            go[start:stop], inp[start:stop], off[start:stop], weight, mask[start:stop], **options
        )
        for name in errors:
            errors[name] = max(
                errors[name], relative_error(getattr(grads, name)[start:stop], getattr(sub, name))
            )
        weight_sum += host(sub.grad_weight).astype(np.float64)
        bias_sum += host(sub.grad_bias).astype(np.float64)
        del sub
        dev.free()
    for name, error in errors.items():
        session.record("conv", f"{name} vs {len(pieces)} sub-batches (32-bit)", error, HALF_TOL)
    session.check(
        "conv", "grad_weight vs the sub-batches' sum", host(grads.grad_weight), weight_sum, SUM_TOL
    )
    session.check(
        "conv", "grad_bias vs the sub-batches' sum", host(grads.grad_bias), bias_sum, SUM_TOL
    )
    ref = cupydcn.deform_conv2d_backward(
        host(go[last]).astype(np.float32), x, o, host(weight).astype(np.float32), m, **options
    )
    for name in ("grad_input", "grad_offset", "grad_mask"):
        session.check(
            "conv",
            f"{name}, last image vs NumPy backend",
            getattr(grads, name)[last],
            getattr(ref, name),
            HALF_TOL,
        )


# ---------------------------------------------------------------------------- RoI pooling
def _rois(size: RoiSize, images: list[int]) -> np.ndarray:
    gen = np.random.default_rng(7)
    rows = []
    for b in images:
        for _ in range(size.rois_per_image):
            x1 = gen.uniform(-4, 0.8 * size.w)
            y1 = gen.uniform(-4, 0.8 * size.h)
            bw = gen.uniform(2, size.w / 2)
            bh = gen.uniform(2, size.h / 2)
            rows.append((b, x1, y1, x1 + bw, y1 + bh))
    return np.asarray(rows, dtype=np.float32)


def roi_cases(session: Session, size: RoiSize, dtype, which: set[str]) -> None:
    import cupydcn

    xp, dev = session.dev.xp, session.dev
    images = size.images()
    per_image = size.c * size.h * size.w
    session.say(
        f"RoI pooling input [{size.n}, {size.c}, {size.h}, {size.w}] = "
        f"{size.elements()['input']:.3g} elements; RoIs in images {images} (starting at "
        f"elements {', '.join(f'{b * per_image:.4g}' for b in images)})"
    )
    if not _fits(session, "RoI pooling", size.bytes_needed(backward=False)):
        return
    rng = Random(dev, 2)
    inp = rng.fill((size.n, size.c, size.h, size.w), dtype)
    rois_host = _rois(size, images)
    rois = xp.asarray(rois_host)
    # Each image's RoIs are consecutive rows: slices index NumPy and CuPy arrays alike.
    per = size.rois_per_image
    rows = {b: slice(i * per, (i + 1) * per) for i, b in enumerate(images)}
    assert all((rois_host[rows[b], 0] == b).all() for b in images)

    def sub_rois(b):
        r = rois_host[rows[b]].copy()
        r[:, 0] = 0
        return r

    last = images[-1]
    k = len(rois_host)
    roi_opts = dict(
        output_size=size.roi_output,
        spatial_scale=1.0,
        sampling_ratio=size.sampling_ratio,
        gamma=0.1,
    )
    ps_opts = dict(
        output_dim=size.output_dim,
        group_size=size.group_size,
        pooled_size=size.pooled_size,
        part_size=size.pooled_size,
        sample_per_part=size.sample_per_part,
        spatial_scale=1.0,
        trans_std=0.1,
    )
    ph, pw = size.roi_output
    ops = []
    if "roi" in which:
        ops.append(
            (
                "roi",
                (rng.fill((k, 2, ph, pw), dtype), rng.fill((k, 1, ph, pw), dtype, normal=False)),
            )
        )
    if "psroi" in which:
        ops.append(("psroi", (rng.fill((k, 2, size.pooled_size, size.pooled_size), dtype),)))

    for name, extra in ops:
        case_start = time.monotonic()
        try:
            if name == "roi":

                def forward(x, r, o, m):
                    return cupydcn.deform_roi_pool(x, r, o, m, **roi_opts), None

                def backward(g, x, r, o, m):
                    grads = cupydcn.deform_roi_pool_backward(g, x, r, o, m, **roi_opts)
                    return {
                        "grad_input": grads.grad_input,
                        "grad_offset": grads.grad_offset,
                        "grad_mask": grads.grad_mask,
                    }
            else:

                def forward(x, r, o):
                    return cupydcn.deform_psroi_pool(x, r, o, **ps_opts)

                def backward(g, x, r, o):
                    grads = cupydcn.deform_psroi_pool_backward(g, x, r, o, **ps_opts)
                    return {"grad_input": grads.grad_input, "grad_offset": grads.grad_offset}

            (out, count), seconds = session.timed(forward, inp, rois, *extra)
            session.say(f"  {name} forward: {seconds:.2f} s")
            for b in images:
                sub_out, sub_count = forward(
                    inp[b : b + 1], xp.asarray(sub_rois(b)), *(a[rows[b]] for a in extra)
                )
                session.check(
                    name, f"forward, image {b} vs that image alone", out[rows[b]], sub_out, HALF_TOL
                )
                if count is not None:
                    session.check(
                        name,
                        f"count, image {b} vs that image alone",
                        count[rows[b]],
                        sub_count,
                        EXACT,
                    )
            host_extra = [host(a[rows[last]]).astype(np.float32) for a in extra]
            x_last = host(inp[last : last + 1]).astype(np.float32)
            ref_out, ref_count = forward(x_last, sub_rois(last).astype(np.float64), *host_extra)
            session.check(
                name, f"forward, image {last} vs NumPy backend", out[rows[last]], ref_out, HALF_TOL
            )
            if count is not None:
                session.check(
                    name,
                    f"count, image {last} vs NumPy backend",
                    count[rows[last]],
                    ref_count,
                    EXACT,
                )
            forward_s = time.monotonic() - case_start
            if not _has_time(session, f"{name} backward", 10 + 3 * forward_s):
                continue
            if not _fits(session, f"{name} backward", size.bytes_needed(backward=True)):
                continue
            go = rng.fill(out.shape, dtype)
            del out, count
            grads, seconds = session.timed(backward, go, inp, rois, *extra)
            session.say(f"  {name} backward: {seconds:.2f} s")
            dev.free()
            touched = 0
            for b in images:
                sub = backward(
                    go[rows[b]],
                    inp[b : b + 1],
                    xp.asarray(sub_rois(b)),
                    *(a[rows[b]] for a in extra),
                )
                session.check(
                    name,
                    f"grad_input, image {b} vs that image alone",
                    grads["grad_input"][b : b + 1],
                    sub["grad_input"],
                    HALF_TOL,
                )
                for g in grads:
                    if g != "grad_input":
                        session.check(
                            name,
                            f"{g}, image {b} vs that image alone",
                            grads[g][rows[b]],
                            sub[g],
                            HALF_TOL,
                        )
                touched += int(xp.count_nonzero(grads["grad_input"][b : b + 1]))
                del sub
            stray = int(xp.count_nonzero(grads["grad_input"])) - touched
            session.record(
                name, "grad_input: nonzero elements outside those images", float(abs(stray)), EXACT
            )
            ref = backward(
                host(go[rows[last]]).astype(np.float32),
                x_last,
                sub_rois(last).astype(np.float64),
                *host_extra,
            )
            for g in grads:
                got = grads[g][last : last + 1] if g == "grad_input" else grads[g][rows[last]]
                session.check(name, f"{g}, image {last} vs NumPy backend", got, ref[g], HALF_TOL)
            del grads, go
        except Exception as exc:  # a kernel error, out of memory: this op fails, go on
            if _is_oom(exc):
                session.skip(f"{name}: out of GPU memory ({exc})")
            else:
                session.fail(name, "the op", exc)
        finally:
            dev.free()


# ---------------------------------------------------------------------------- main
def _no_gpu_reason() -> str | None:
    try:
        import cupy
    except Exception as exc:
        return f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:
        return f"no CUDA device (CuPy: {type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None if count > 0 else "no CUDA device (CuPy reports 0 devices)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget-s",
        type=float,
        default=90.0,
        help="seconds this run may take; backward passes are skipped when "
        "too little is left (default 90)",
    )
    parser.add_argument(
        "--cases", default="conv,roi,psroi", help="comma-separated subset of conv, roi, psroi"
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="tiny sizes on the NumPy backend (checks the checks, on a CPU)",
    )
    parser.add_argument("--json", help="write the checks here")
    args = parser.parse_args(argv)
    which = {c.strip() for c in args.cases.split(",") if c.strip()}
    unknown = which - {"conv", "roi", "psroi"}
    if unknown:
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")

    if args.small:
        xp = np
        conv_size, roi_size = SMALL_CONV, SMALL_ROI
    else:
        reason = _no_gpu_reason()
        if reason is not None:
            print(f"RESULT: skipped: {reason}")
            return 3
        import cupy as xp

        conv_size, roi_size = FULL_CONV, FULL_ROI
    session = Session(Device(xp), args.budget_s)
    if not args.small:
        props = xp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        session.say(
            f"device: {name}, {props['totalGlobalMem'] / 2**30:.1f} GiB, "
            f"{session.dev.free_bytes() / 2**30:.1f} GiB free"
        )
    session.say(f"{'case':8} {'check':52} {'rel. error':>10} {'tol':>8}")
    dtype = np.float16
    if "conv" in which:
        try:
            conv_case(session, conv_size, dtype)
        except Exception as exc:
            if _is_oom(exc):
                session.skip(f"conv: out of GPU memory ({exc})")
            else:
                session.fail("conv", "the op", exc)
        finally:
            session.dev.free()
    if which & {"roi", "psroi"}:
        if _has_time(session, "RoI pooling", 10):
            try:
                roi_cases(session, roi_size, dtype, which)
            except Exception as exc:
                if _is_oom(exc):
                    session.skip(f"RoI pooling: out of GPU memory ({exc})")
                else:
                    session.fail("roi", "setting up", exc)
            finally:
                session.dev.free()

    failed = [c for c in session.checks if not c.ok]
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "small": args.small,
                    "conv": asdict(conv_size),
                    "roi": asdict(roi_size),
                    "conv_elements": conv_size.elements(),
                    "roi_elements": roi_size.elements(),
                    "checks": [dict(asdict(c), ok=c.ok) for c in session.checks],
                    "skipped": session.skipped,
                    "seconds": time.monotonic() - session.started,
                },
                indent=2,
                default=str,
            ),
            encoding="utf-8",
        )
    skipped = f"; skipped: {'; '.join(session.skipped)}" if session.skipped else ""
    cases = sorted({c.case for c in session.checks})
    if failed:
        print(
            f"RESULT: failed: {len(failed)} of {len(session.checks)} checks failed ("
            + "; ".join(f"{c.case} {c.what}: {c.error:.2e} > {c.tolerance:.0e}" for c in failed[:4])
            + ")"
            + skipped
        )
        return 1
    if not session.checks:
        print(f"RESULT: skipped: no check ran{skipped}")
        return 3
    finite = [c.error for c in session.checks if c.tolerance > 0]
    where = (
        "tiny sizes, NumPy backend"
        if args.small
        else (
            f"conv input {conv_size.elements()['input']:.3g} / columns "
            f"{conv_size.elements()['columns']:.3g} elements, RoI input "
            f"{roi_size.elements()['input']:.3g}"
        )
    )
    print(
        f"RESULT: ok: {len(session.checks)} checks passed on {', '.join(cases)} ({where}; "
        f"worst rel. error {max(finite, default=0.0):.1e}){skipped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
