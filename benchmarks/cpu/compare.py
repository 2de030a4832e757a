"""cupydcn's NumPy backend against torchvision's CPU ops, side by side in one process.

    python benchmarks/cpu/compare.py --out benchmarks/results/cpu/<date>_<cpu>_<commit>.md

Rows: deform_conv2d S1-S3 at batch 1 (DCNv2 and DCNv1, float32) against
torchvision.ops.deform_conv2d; deform_roi_pool (offset None) against
torchvision.ops.roi_align(aligned=True) on R1 at full size and on a large-RoI case (boxes of
1000 px, sampling_ratio=0); deform_psroi_pool (offset None) against
torchvision.ops.ps_roi_align on R2 at full size. Passes: forward, backward (cupydcn's
explicit backward; torchvision's autograd over a graph built once) and forward+backward.

Each cell (row, pass, condition) times the two providers interleaved (alternating which
goes first), after one untimed call each, and reports the medians; the repeats adapt to
the time left (``--budget-s`` for the whole run, 3 to 15 repeats, fewer only for calls
that alone take more than a cell's share: then the first call counts and n in the table
may be 1). Conditions: "default" (no thread settings
changed: cupydcn's BLAS policy "auto", torch's own threads) and "busy" (a spinning second
process started and stopped by the harness, bounded in time). The table's ratio is
torchvision time / cupydcn time (> 1: cupydcn faster). The load average is recorded before
and after each condition.

Needs torch and torchvision (CPU or CUDA builds; everything runs on the CPU), and
threadpoolctl for the BLAS report and policy. On machines whose environment sets
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for an older OpenBLAS, unset both in the command that
runs this (they slow current NumPy); the report shows the kernel that ran.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from busy import Spinner  # noqa: E402

from cupydcn.cli.bench.calls import build_call  # noqa: E402
from cupydcn.cli.bench.device import Device, _cpu_name, versions  # noqa: E402
from cupydcn.cli.bench.problems import make_problem  # noqa: E402
from cupydcn.cli.bench.shapes import ConvShape, PsRoiShape, RoiShape  # noqa: E402

PASSES = ("forward", "backward", "forward+backward")
CONDITIONS = ("default", "busy")


def conv_rows():
    shapes = [
        ConvShape("S1", 1, 128, 128, 100, 168, why="R50 c3"),
        ConvShape("S2", 1, 256, 256, 50, 84, why="R50 c4"),
        ConvShape("S3", 1, 512, 512, 25, 42, why="R50 c5"),
    ]
    for shape in shapes:
        for variant, label in (("mask", "DCNv2"), ("nomask", "DCNv1")):
            yield f"{shape.id} {label}", shape, variant, "torchvision", None


def roi_rows():
    r1 = RoiShape("R1", 2, 256, 200, 336, 1024, why="deformable RoI pooling")
    yield "R1 roi_pool", r1, "nomask", "roi_align", None
    large = RoiShape(
        "L1000",
        1,
        256,
        256,
        256,
        4,
        sampling_ratio=0,
        spatial_scale=0.25,
        why="large RoIs: boxes of 1000 px, adaptive sampling",
    )
    yield "large RoI (1000 px, sr 0)", large, "nomask", "roi_align", _large_boxes
    r2 = PsRoiShape("R2", 2, 10, 7, 7, 7, 4, 100, 168, 512, why="deformable PS-RoI pooling")
    yield "R2 psroi_pool", r2, "-", "ps_roi_align", None


def _large_boxes(problem) -> None:
    """Four 1000 x 1000 px boxes inside the 1024 x 1024 image."""
    corners = [(0, 0), (24, 0), (0, 24), (12, 12)]
    problem.arrays["rois"] = np.array(
        [[0, x, y, x + 1000, y + 1000] for x, y in corners], dtype=np.float32
    )


def build_rows():
    device = Device("cpu", _cpu_name(), "numpy", False, "CPU comparison harness")
    rows = []
    for label, shape, variant, peer, adjust in list(conv_rows()) + list(roi_rows()):
        problem = make_problem(shape, "float32", device)
        if not isinstance(shape, ConvShape):
            problem.arrays["offset"] = None  # plain (non-deformable) pooling: the peer's op
        if adjust is not None:
            adjust(problem)
        calls = {}
        for pass_ in PASSES:
            calls[pass_] = (
                build_call(problem, "cupydcn", variant, pass_),
                build_call(problem, peer, variant, pass_),
            )
        rows.append((label, shape, peer, calls))
    return rows


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(ours, theirs, cell_budget_s: float, max_repeats: int = 15) -> dict:
    """Interleaved medians of the two callables within about ``cell_budget_s``: a first
    call of each (a warm-up, kept as a sample only when one round alone exceeds the
    budget), then as many rounds as fit, 3 to ``max_repeats`` for short calls."""
    first = (timed(ours), timed(theirs))
    per_round = sum(first)
    times = ([], [])
    if per_round >= cell_budget_s / 2:  # long calls: the first round counts
        times[0].append(first[0])
        times[1].append(first[1])
        repeats = int(max(0, min(max_repeats - 1, (cell_budget_s - per_round) // per_round)))
    else:
        repeats = int(max(3, min(max_repeats, cell_budget_s // per_round - 1)))
    for index in range(repeats):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            times[which].append(timed((ours, theirs)[which]))
    return {
        "cupydcn": statistics.median(times[0]),
        "peer": statistics.median(times[1]),
        "repeats": len(times[0]),
    }


def blas_report() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed (no BLAS report, cupydcn's thread policy inactive)"
    return "; ".join(
        f"{i['internal_api']} {i.get('version') or ''} {i.get('architecture') or ''} "
        f"{i['num_threads']} threads ({os.path.basename(i['filepath'])})"
        for i in threadpool_info()
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=True,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def default_out(commit: str) -> str:
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", _cpu_name()).strip("-")[:40] or "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "..", "results", "cpu", f"{date}_{cpu}_{commit.replace('+', '-')}.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        help="markdown file to write (default: benchmarks/results/cpu/<date>_<cpu>_<commit>.md)",
    )
    parser.add_argument(
        "--budget-s", type=float, default=270.0, help="time for all cells together (default 270 s)"
    )
    parser.add_argument(
        "--conditions", default=",".join(CONDITIONS), help="comma-separated subset of default,busy"
    )
    parser.add_argument("--rows", default="", help="only rows whose label contains this")
    args = parser.parse_args(argv)
    conditions = [c for c in args.conditions.split(",") if c]
    if set(conditions) - set(CONDITIONS):
        parser.error(f"--conditions: expected a subset of {CONDITIONS}")

    import torch  # noqa: F401  (the peers; imported before the BLAS report)

    from cupydcn.core import threads

    commit = git_commit()  # of the tree measured (taken before the run)
    started = time.monotonic()
    rows = [r for r in build_rows() if args.rows in r[0]]
    cells = len(rows) * len(PASSES) * len(conditions)
    results = {}
    loads = {}
    print(f"{len(rows)} rows, {cells} cells, budget {args.budget_s:.0f} s", flush=True)
    for condition in conditions:
        left = args.budget_s - (time.monotonic() - started)
        cells_left = len(rows) * len(PASSES) * (len(conditions) - conditions.index(condition))
        spinner = Spinner(limit_s=max(60.0, 2 * left)) if condition == "busy" else None
        if spinner:
            spinner.__enter__()
        try:
            loads[condition] = [os.getloadavg()]
            for label, _shape, peer, calls in rows:
                for pass_ in PASSES:
                    left = args.budget_s - (time.monotonic() - started)
                    share = max(0.5, left / max(cells_left, 1))
                    ours, theirs = calls[pass_]
                    result = measure(ours, theirs, share)
                    results[(condition, label, pass_)] = result
                    cells_left -= 1
                    print(
                        f"{condition:8s} {label:28s} {pass_:17s} cupydcn "
                        f"{result['cupydcn'] * 1e3:9.1f} ms  {peer} "
                        f"{result['peer'] * 1e3:9.1f} ms  ratio "
                        f"{result['peer'] / result['cupydcn']:6.2f}  x{result['repeats']}",
                        flush=True,
                    )
            loads[condition].append(os.getloadavg())
        finally:
            if spinner:
                spinner.__exit__()
    elapsed = time.monotonic() - started

    lines = [
        "# CPU: cupydcn (NumPy backend) against torchvision's CPU ops",
        "",
        f"Written by `benchmarks/cpu/compare.py` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"commit {commit}, {elapsed:.0f} s.",
        "",
        f"* CPU: {_cpu_name()}, {os.cpu_count()} cores; {platform.platform()}",
        "* versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"* BLAS: {blas_report()}",
        f"* cupydcn BLAS policy: {threads.get_blas_threads()!r} (threadpoolctl "
        f"{'active' if threads.has_thread_control() else 'absent'}); torch threads "
        f"{torch.get_num_threads()}",
        "* environment: "
        + ", ".join(
            f"{name}={os.environ.get(name, 'unset')}"
            for name in (
                "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS",
                "OPENBLAS_CORETYPE",
                "OPENBLAS_L2_SIZE",
                threads.ENV_VAR,
            )
        ),
        "* load average (1, 5, 15 min) before / after: "
        + "; ".join(
            f"{c}: {' '.join(f'{x:.2f}' for x in loads[c][0])} / "
            f"{' '.join(f'{x:.2f}' for x in loads[c][-1])}"
            for c in conditions
        ),
        "* float32; interleaved medians; ratio = torchvision time / cupydcn time (> 1: "
        "cupydcn faster); busy = one spinning process on the side.",
        "",
        "Rows:",
        "",
    ]
    for label, shape, peer, _ in rows:
        op = "deform_conv2d" if peer == "torchvision" else peer
        lines.append(
            f"* {label}: {shape.describe()} — against torchvision.ops.{op}"
            + (" (aligned=True)" if peer == "roi_align" else "")
        )
    lines.append("")
    header = "| row | pass |"
    rule = "|---|---|"
    for condition in conditions:
        header += f" {condition}: cupydcn ms | torchvision ms | ratio | n |"
        rule += "---:|---:|---:|---:|"
    lines += [header, rule]
    for label, _, _, _ in rows:
        for pass_ in PASSES:
            line = f"| {label} | {pass_} |"
            for condition in conditions:
                r = results[(condition, label, pass_)]
                line += (
                    f" {r['cupydcn'] * 1e3:.1f} | {r['peer'] * 1e3:.1f} | "
                    f"**{r['peer'] / r['cupydcn']:.2f}** | {r['repeats']} |"
                )
            lines.append(line)
    text = "\n".join(lines) + "\n"
    out = args.out or default_out(commit)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(text)
    print(text)
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
