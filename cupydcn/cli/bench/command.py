"""``python -m cupydcn bench``: its options, and the run that measures and prints."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from ..options import non_negative_int, positive_int, unwritable_reason
from .device import Unavailable, detect_device, versions
from .precision import set_precision_switches
from .problems import host_arrays, make_problem
from .providers import PROVIDERS, skip_reason, variants_of
from .record import run_one
from .report import markdown_tables, shapes_legend, skipped_lines
from .shapes import DTYPES, PASSES, QUICK_SHAPES, QUICK_SHAPES_CPU
from .timing import peak_dtype, peak_gemm

QUICK_DEFAULTS = {"shapes": "S1,R1", "dtypes": "float32", "rounds": 3}
DEFAULTS = {"shapes": "S1,S3,S7,R1,R2", "passes": "forward,backward"}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cupydcn bench",
        description="Quick benchmark on the present device: cupydcn (CuPy kernels on a GPU, "
        "the NumPy backend on scaled-down shapes on the CPU) against torchvision and "
        "cuDNN when importable; prints a Markdown table. The full suite is benchmarks/ "
        "(pytest-benchmark).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer measurements: the defaults become --shapes S1,R1 "
        "--dtypes float32 --rounds 3; options given explicitly override them",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help="comma-separated ids among "
        + ",".join(QUICK_SHAPES)
        + f" (default {DEFAULTS['shapes']})",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated among " + ",".join(DTYPES) + " (default: "
        "float32,float16 on a GPU, float32 on the CPU)",
    )
    parser.add_argument(
        "--passes",
        default=None,
        help="comma-separated among " + ",".join(PASSES) + f" (default {DEFAULTS['passes']})",
    )
    parser.add_argument(
        "--variants", default="mask", help="mask, nomask or both as mask,nomask (default mask)"
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=None,
        help="timed calls per measurement, >= 1 (default 50 on a GPU, 5 on the CPU)",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=None,
        help="untimed calls first, >= 0 (default 5 on a GPU, 1 on the CPU; "
        "each measurement runs at least one untimed call)",
    )
    parser.add_argument(
        "--full-shapes", action="store_true", help="full-size shapes on the CPU too (slow)"
    )
    parser.add_argument(
        "--cpu-peers",
        action="store_true",
        help="on the CPU, also time PyTorch's CPU conv2d (and torchvision's CPU ops if importable)",
    )
    parser.add_argument("--json", default=None, help="also write the records to this JSON file")
    args = parser.parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else {}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.shapes = _split(parser, args.shapes, list(QUICK_SHAPES), "--shapes")
    args.passes = _split(parser, args.passes, PASSES, "--passes")
    args.variants = _split(parser, args.variants, ("mask", "nomask"), "--variants")
    if args.dtypes is not None:
        args.dtypes = _split(parser, args.dtypes, DTYPES, "--dtypes")
    if args.json is not None and (reason := unwritable_reason(args.json)):
        parser.error(f"--json {args.json}: {reason}")
    return args


def _split(
    parser: argparse.ArgumentParser, text: str, allowed: Sequence[str], option: str
) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        parser.error(
            f"{option}: unknown {', '.join(bad) if bad else repr(text)}; "
            f"choose among {', '.join(allowed)}"
        )
    return items


def run_bench(argv: Sequence[str] | None = None) -> int:
    """``python -m cupydcn bench [options]``: measure and print the table; exit code."""
    args = _parse(argv)
    device = detect_device()
    gpu = device.kind == "cuda"
    shape_ids, passes, variants = args.shapes, args.passes, args.variants
    dtypes = args.dtypes or (["float32", "float16"] if gpu else ["float32"])
    rounds = args.rounds or (50 if gpu else 5)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    table = QUICK_SHAPES if gpu or args.full_shapes else QUICK_SHAPES_CPU
    shapes = [table[i] for i in shape_ids]

    switches, restore = set_precision_switches()
    try:
        started = time.perf_counter()
        print(f"cupydcn bench on {device.kind.upper()}: {device.name}")
        if not gpu:
            print(f"  no GPU: {device.no_gpu_reason}")
            print(
                "  cupydcn runs its NumPy backend"
                + ("" if args.full_shapes else " on scaled-down shapes")
            )
        info = versions()
        print("  " + ", ".join(f"{k} {v}" for k, v in info.items()))
        print(
            "  precision: " + ", ".join(f"{k}={v}" for k, v in switches.items() if k != "cupydcn")
        )
        peaks: dict[str, dict] = {}
        for dtype in sorted({peak_dtype(d, device) for d in dtypes}, key=DTYPES.index):
            try:
                peaks[dtype] = peak_gemm(device, dtype, rounds=max(5, min(rounds, 20)))
            except Unavailable as exc:
                print(f"  peak GEMM {dtype}: not measured ({exc})")
                continue
            pk = peaks[dtype]
            print(
                f"  peak GEMM {dtype}: {pk['tflops']:.2f} TFLOP/s "
                f"({pk['m']}³ {pk['library']}, median {pk['median_ms']:.3f} ms)"
            )
        timer_text = "CUDA events" if gpu else "time.perf_counter"
        print(f"  timing: {timer_text}, median of {rounds} after {warmup} warm-up call(s)")
        print()

        records: list[dict] = []
        skipped: dict[tuple[str, str], int] = {}
        for shape in shapes:
            host = host_arrays(shape)
            for dtype in dtypes:
                try:
                    problem = make_problem(shape, dtype, device, host)
                except Unavailable as exc:
                    skipped[("cupydcn", str(exc))] = skipped.get(("cupydcn", str(exc)), 0) + 1
                    continue
                for provider in PROVIDERS[shape.op]:
                    for variant in variants_of(shape.op, provider):
                        if variant != "-" and variant not in variants:
                            continue
                        reason = skip_reason(shape.op, provider, variant, device, args.cpu_peers)
                        if reason:
                            skipped[(provider, reason)] = skipped.get((provider, reason), 0) + len(
                                passes
                            )
                            continue
                        for pass_ in passes:
                            try:
                                records.append(
                                    run_one(
                                        problem,
                                        provider,
                                        variant,
                                        pass_,
                                        rounds=rounds,
                                        warmup=warmup,
                                    )
                                )
                            except Unavailable as exc:
                                key = (provider, str(exc))
                                skipped[key] = skipped.get(key, 0) + 1
                            except Exception as exc:
                                if provider == "cupydcn":
                                    raise
                                key = (provider, f"failed: {type(exc).__name__}: {exc}")
                                skipped[key] = skipped.get(key, 0) + 1
                del problem
        print(markdown_tables(records, peaks))
        print(shapes_legend(shapes))
        if skipped:
            print("Not run (provider (measurements): reason):")
            print("\n".join(skipped_lines(skipped)))
            print()
        print(f"{len(records)} measurements in {time.perf_counter() - started:.1f} s")
        if args.json:
            import json

            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(
                    {
                        "device": device.details | {"name": device.name, "kind": device.kind},
                        "versions": info,
                        "precision": switches,
                        "peak_gemm": peaks,
                        "records": records,
                        "skipped": [
                            {"provider": p, "reason": r, "count": c}
                            for (p, r), c in skipped.items()
                        ],
                    },
                    fh,
                    indent=1,
                    default=str,
                )
            print(f"records written to {args.json}")
    finally:
        restore()
    return 0
