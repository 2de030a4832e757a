"""Turn a benchmark run's JSON (``pytest benchmarks/ --benchmark-json=RUN.json``) into a
Markdown report and a PNG chart.

    python benchmarks/report.py RUN.json                  # Markdown on stdout
    python benchmarks/report.py RUN.json -o RUN.md        # Markdown + RUN.png beside it
    python benchmarks/report.py RUN.json --save-results   # a GPU run, into benchmarks/results/
    python benchmarks/report.py A.json B.json ...         # one report of a run made in parts

The Markdown has, per op, the cupydcn median time, its TFLOP/s
(2·N·C_out·H_out·W_out·(C_in/groups)·kh·kw per forward; backward ×2, forward+backward ×3)
and % of the GEMM peak measured in the same run, then each peer's time and the ratio
peer / cupydcn side by side; then the peak extra memory per provider; the run's device,
versions, precision switches, GEMM peaks, shapes and the providers that did not run, with
the reason. The chart (matplotlib, when importable; otherwise the Markdown says so) plots
the ratios, or cupydcn's times when no peer ran.

The deformable-attention family (``test_bench_attn.py``: multi_scale_deformable_attn,
dcnv3, dcnv4) gets tables of the same form, without TFLOP/s (no GEMM), its peers being the
grid_sample references and mmcv.

``--save-results`` writes ``benchmarks/results/<date>_<gpu-model>_<commit>.{json,md,png}``
(date and commit from the run, GPU model from the device it ran on).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

try:
    from cupydcn.cli import bench as _bench
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
    from cupydcn.cli import bench as _bench


def load(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def merge(runs: list[dict]) -> dict:
    """One run from several parts (e.g. ``-k deform_conv2d`` and ``-k roi_pool``, run
    separately): benchmarks concatenated (a later part's result for the same test wins),
    skipped providers added up, everything else from the first part. Parts from different
    devices or commits are refused."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    for other in runs[1:]:
        for what, get in (
            ("device", lambda r: info_of(r).get("device", {}).get("name")),
            ("commit", lambda r: r.get("commit_info", {}).get("id")),
        ):
            if get(other) != get(first):
                raise SystemExit(
                    f"report.py: the parts come from different {what}s: "
                    f"{get(first)!r} and {get(other)!r}"
                )
    merged = copy.deepcopy(first)
    by_name = {}
    for run in runs:
        for bench in run.get("benchmarks", []):
            by_name[bench.get("fullname", id(bench))] = bench
    merged["benchmarks"] = list(by_name.values())
    skipped: dict[str, dict[str, int]] = {}
    for run in runs:
        for provider, reasons in info_of(run).get("skipped", {}).items():
            for reason, count in reasons.items():
                skipped.setdefault(provider, {})
                skipped[provider][reason] = skipped[provider].get(reason, 0) + count
    merged.setdefault("machine_info", {}).setdefault("cupydcn", {})["skipped"] = skipped
    merged["machine_info"]["cupydcn"]["parts"] = len(runs)
    return merged


def records_of(run: dict) -> list[dict]:
    """The cupydcn records (``extra_info``) of the run's benchmarks."""
    return [b["extra_info"] for b in run.get("benchmarks", []) if "op" in b.get("extra_info", {})]


def info_of(run: dict) -> dict:
    return run.get("machine_info", {}).get("cupydcn", {})


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def results_stem(run: dict) -> str:
    """<date>_<gpu-model>_<commit>: e.g. 2025-11-22_nvidia-h100-80gb-hbm3_191b3ab."""
    date = str(run.get("datetime", "unknown-date"))[:10]
    device = info_of(run).get("device", {})
    model = device.get("name") or run.get("machine_info", {}).get("cpu", {}).get("brand_raw", "")
    commit = run.get("commit_info", {})
    commit_id = str(commit.get("id") or "nocommit")[:7]
    if commit.get("dirty"):
        commit_id += "-dirty"
    return f"{date}_{_slug(model)}_{commit_id}"


def _peaks(info: dict) -> dict:
    return {k: v for k, v in info.get("peak_gemm", {}).items() if "tflops" in v}


def header(run: dict) -> str:
    info = info_of(run)
    device = info.get("device", {})
    commit = run.get("commit_info", {})
    kind = device.get("kind", "?")
    lines = [f"# cupydcn benchmark — {device.get('name', '?')} ({kind.upper()})", ""]
    lines.append(
        f"- run: {run.get('datetime', '?')}, commit {str(commit.get('id', '?'))[:10]}"
        + (" (dirty)" if commit.get("dirty") else "")
        + (f", branch {commit['branch']}" if commit.get("branch") else "")
    )
    if kind == "cuda":
        extras = ", ".join(
            f"{k} {device[k]}"
            for k in ("compute_capability", "memory_gib", "sm_count", "cuda_runtime", "cuda_driver")
            if k in device
        )
        lines.append(
            f"- device: {device.get('name')} ({extras}); arrays handed to cupydcn: "
            f"{device.get('array_library')}"
        )
    else:
        lines.append(
            f"- device: CPU {device.get('name', '?')} ({device.get('cpu_count', '?')} "
            f"cores); no GPU: {device.get('no_gpu_reason', '?')}"
        )
        threads = device.get("threads", {})
        if threads:
            lines.append("- CPU threads: " + ", ".join(f"{k}={v}" for k, v in threads.items()))
        lines.append(
            "- cupydcn ran its NumPy backend"
            + (" on the scaled-down shapes" if "scaled" in info.get("shapes", "") else "")
        )
    if info.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    timer = {
        "cuda_event": "CUDA events (synchronised inside the timed callable)",
        "perf_counter": "time.perf_counter",
    }.get(info.get("timer"), info.get("timer", "?"))
    lines.append(
        f"- timing: {timer}; median of {info.get('rounds', '?')} calls after "
        f"{info.get('warmup', '?')} warm-up call(s) (compilation and autotuning "
        "included in the warm-up)"
    )
    if kind == "cuda" and isinstance(info.get("rounds"), int) and info["rounds"] < 50:
        lines.append(f"- NOTE: {info['rounds']} rounds, below the protocol's 50")
    if info.get("precision"):
        lines.append(
            "- precision switches: "
            + ", ".join(f"`{k}` = {v}" for k, v in info["precision"].items())
        )
    for dtype, peak in info.get("peak_gemm", {}).items():
        if "tflops" in peak:
            lines.append(
                f"- peak ({dtype}): {peak['tflops']:.3g} TFLOP/s, {peak['m']}³ "
                f"{peak['library']}, median {peak['median_ms']:.3f} ms of "
                f"{peak['rounds']}"
            )
        else:
            lines.append(f"- peak ({dtype}): not measured ({peak})")
    if kind != "cuda":
        lines.append(
            "- % peak: the NumPy backend computes float16/bfloat16 in float32, so "
            "every dtype is compared with the float32 GEMM peak"
        )
    lines.append(f"- shapes: {info.get('shapes', '?')}")
    return "\n".join(lines) + "\n"


def shapes_section(records: list[dict]) -> str:
    seen: dict[str, tuple[str, str]] = {}
    for r in records:
        seen.setdefault(r["shape"], (r["op"], r["dims"]))
    lines = ["| shape | op | dims |", "|---|---|---|"]
    for shape_id in sorted(
        seen, key=lambda i: (_bench.order_of(seen[i][0], _bench.OPS), _bench.shape_sort_key(i))
    ):
        op, dims = seen[shape_id]
        lines.append(f"| {shape_id} | {op} | {dims} |")
    return "\n".join(lines) + "\n"


def skipped_section(info: dict) -> str:
    skipped = info.get("skipped", {})
    if not skipped:
        return "Every selected provider ran.\n"
    flat = {
        (provider, reason): count
        for provider, reasons in skipped.items()
        for reason, count in reasons.items()
    }
    lines = [
        "Providers not run — provider (skipped tests): reason",
        "",
        *_bench.skipped_lines(flat),
    ]
    return "\n".join(lines) + "\n"


def markdown(run: dict, chart_note: str | None = None) -> str:
    records = records_of(run)
    info = info_of(run)
    parts = [header(run)]
    if not records:
        parts.append("No measurements in this run.\n")
    else:
        parts.append(_bench.markdown_tables(records, _peaks(info)))
        parts.append("## Shapes\n\n" + shapes_section(records))
    parts.append("## Not run\n\n" + skipped_section(info))
    if chart_note:
        parts.append(chart_note + "\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- the chart
def chart(run: dict, path: str | Path) -> str | None:
    """Write the PNG; returns None, or why no chart was drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "No chart: matplotlib is not installed (pip install matplotlib)."
    records = records_of(run)
    if not records:
        return "No chart: no measurements."
    tables = _bench.table_rows(records)
    panels = [
        (op, pass_, [r for r in rows if r["pass"] == pass_])
        for op, rows in tables.items()
        for pass_ in _bench.PASSES
    ]
    panels = [p for p in panels if p[2]]
    device = info_of(run).get("device", {}).get("name", "?")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    tallest = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(6 * cols, max(3.0, 0.28 * tallest + 1.5) * nrows), squeeze=False
    )
    markers = "osD^v<>"
    for ax, (op, pass_, rows) in zip(axes.flat, panels):
        labels = [f"{r['shape']} {r['variant']} {r['dtype']}" for r in rows]
        y = list(range(len(rows)))
        peers = sorted(
            {p for r in rows for p in r["providers"] if p != "cupydcn"},
            key=lambda p: _bench.order_of(p, _bench.PROVIDER_ORDER),
        )
        kind = next(iter(rows[0]["providers"].values()))["device_kind"]
        if peers:
            for i, peer in enumerate(peers):
                xs, ys = [], []
                for yi, r in zip(y, rows):
                    mine, theirs = r["providers"].get("cupydcn"), r["providers"].get(peer)
                    if mine and theirs and mine["median_ms"] > 0:
                        xs.append(theirs["median_ms"] / mine["median_ms"])
                        ys.append(yi)
                ax.scatter(
                    xs,
                    ys,
                    marker=markers[i % len(markers)],
                    label=_bench.provider_label(peer, kind),
                )
            ax.axvline(1.0, color="grey", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("peer time / cupydcn time (>1: cupydcn faster)")
            ax.legend(fontsize=7, loc="best")
        else:
            times = [
                r["providers"]["cupydcn"]["median_ms"]
                if "cupydcn" in r["providers"]
                else float("nan")
                for r in rows
            ]
            ax.barh(y, times, height=0.6, color="tab:blue")
            ax.set_xscale("log")
            ax.set_xlabel(f"{_bench.provider_label('cupydcn', kind)} median ms")
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_ylim(len(rows) - 0.5, -0.5)  # top to bottom, in table order
        ax.set_title(f"{op} {pass_}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"cupydcn benchmark — {device} — {run.get('datetime', '')[:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def write(run: dict, md_path: Path, png_path: Path | None) -> tuple[Path, Path | None]:
    note = "No chart requested." if png_path is None else chart(run, png_path)
    if note is None:
        note = f"![chart]({png_path.name})"
    md_path.write_text(markdown(run, note), encoding="utf-8")
    return md_path, (png_path if png_path is not None and png_path.exists() else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "json", nargs="+", help="the run's --benchmark-json file (several: parts of one run)"
    )
    parser.add_argument("-o", "--output", help="write the Markdown here (and the PNG beside it)")
    parser.add_argument("--png", help="the chart's path (default: beside the Markdown)")
    parser.add_argument("--no-png", action="store_true", help="no chart")
    parser.add_argument(
        "--save-results",
        action="store_true",
        help="copy the JSON and write the Markdown and PNG into "
        "benchmarks/results/ as <date>_<gpu-model>_<commit>.*",
    )
    parser.add_argument("--results-dir", default=str(RESULTS), help=argparse.SUPPRESS)
    parser.add_argument(
        "--allow-cpu", action="store_true", help="let --save-results save a run without a GPU"
    )
    args = parser.parse_args(argv)
    run = merge([load(path) for path in args.json])

    if args.save_results:
        kind = info_of(run).get("device", {}).get("kind")
        if kind != "cuda" and not args.allow_cpu:
            print(
                "report.py: --save-results keeps GPU runs only (this run's device: "
                f"{kind}); add --allow-cpu to save it anyway",
                file=sys.stderr,
            )
            return 2
        out = Path(args.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = results_stem(run)
        if len(args.json) == 1:
            shutil.copyfile(args.json[0], out / f"{stem}.json")
        else:
            (out / f"{stem}.json").write_text(json.dumps(run, indent=4), encoding="utf-8")
        md, png = write(run, out / f"{stem}.md", None if args.no_png else out / f"{stem}.png")
        for path in (out / f"{stem}.json", md, png):
            if path is not None:
                print(path)
        return 0
    if args.output:
        md_path = Path(args.output)
        png_path = None if args.no_png else Path(args.png or md_path.with_suffix(".png"))
        md, png = write(run, md_path, png_path)
        print(md)
        if png:
            print(png)
        return 0
    note = None
    if args.png and not args.no_png:
        note = chart(run, args.png)
    print(markdown(run, note))
    return 0


if __name__ == "__main__":
    sys.exit(main())
