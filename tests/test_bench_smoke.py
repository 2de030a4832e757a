"""The benchmark suite keeps working without a GPU (its CI smoke run).

Runs ``pytest benchmarks/ -m smoke`` in a subprocess (``benchmarks/`` is its own pytest
root, not collected by ``python -m pytest``) on the scaled-down shapes with a few rounds,
turns the JSON into the Markdown report and chart with ``benchmarks/report.py``, and checks
the table's rows; then the quick ``python -m cupydcn bench``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cupydcn.cli import bench as _bench

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# The smoke subset's rows (shape, mask, dtype, pass) in the report, per op.
SMOKE_ROWS = {
    "multi_scale_deformable_attn": [("A2", "-", "float32", "forward")],
    "deform_conv2d": [
        ("S1", "mask", "float32", "forward"),
        ("S1", "mask", "float32", "backward"),
        ("S1", "mask", "float32", "forward+backward"),
        ("S1", "mask", "bfloat16", "forward"),
        ("S7", "nomask", "float16", "forward"),
    ],
    "deform_roi_pool": [
        ("R1", "mask", "float32", "forward"),
        ("R1", "mask", "float32", "backward"),
    ],
    "deform_psroi_pool": [
        ("R2", "-", "float32", "forward"),
        ("R2", "-", "float32", "backward"),
    ],
}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"cupydcn_benchmarks_{name}", BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_rows(markdown: str, op: str) -> list[tuple[str, ...]]:
    """(shape, mask, dtype, pass) of the time table under ``### op``."""
    section = markdown.split(f"### {op}\n", 1)[1].strip("\n").split("\n\n", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 5 and cells[0] not in ("shape",) and not cells[0].startswith("---"):
            rows.append(tuple(cells[:4]))
    return rows


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark")
    out = tmp_path_factory.mktemp("bench")
    run_json = out / "run.json"
    env = dict(os.environ)
    # The outer run's options (CI's junit path, its plugins) are not the inner run's.
    env.pop("PYTEST_ADDOPTS", None)
    # Single-threaded BLAS / OpenMP: on a loaded 2-core machine multi-threaded calls wait
    # on descheduled threads (50× slower); the smoke run checks the suite, not the numbers.
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCHMARKS),
        "-m",
        "smoke",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--benchmark-json={run_json}",
        "--bench-scale=cpu",
        "--bench-rounds=3",
        "--bench-warmup=1",
        "--bench-cpu-peers",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {"json": run_json, "dir": out, "stdout": done.stdout, "elapsed": elapsed}


def test_smoke_run_records_the_protocol(smoke_run):
    run = json.loads(smoke_run["json"].read_text())
    info = run["machine_info"]["cupydcn"]
    assert info["shapes"].startswith("scaled-down")
    assert info["rounds"] == 3
    peak = info["peak_gemm"]["float32"]
    assert peak["tflops"] > 0 and peak["median_ms"] > 0
    if info["precision"].get("torch") != "not installed":
        assert info["precision"]["torch.backends.cuda.matmul.allow_tf32"] is False
        assert info["precision"]["torch.backends.cudnn.allow_tf32"] is False
    assert info["precision"]["CUPY_TF32"].startswith("unset")
    records = [b["extra_info"] for b in run["benchmarks"]]
    mine = [r for r in records if r["provider"] == "cupydcn"]
    assert len(mine) == sum(len(rows) for rows in SMOKE_ROWS.values())
    for r in records:
        assert r["rounds"] == 3 and len(r["times_ms"]) == 3
        assert r["median_ms"] > 0
        assert r["timer"] == ("cuda_event" if r["device_kind"] == "cuda" else "perf_counter")
        if r["device_kind"] == "cuda":
            assert r["gpu_median_ms"] == r["median_ms"]
    for r in mine:
        assert isinstance(r["peak_extra_bytes"], int) and r["peak_extra_bytes"] >= 0
        if r["op"] == "deform_conv2d":  # the column buffers, at least
            assert r["peak_extra_bytes"] > 0
    if info["device"]["kind"] != "cuda":
        # GPU providers say why they did not run (or ran as CPU peers).
        skipped = info["skipped"]
        assert "mmcv" in skipped
        assert all(reason for reasons in skipped.values() for reason in reasons)


def test_report_table_and_chart(smoke_run):
    report = _load("report")
    md_path = smoke_run["dir"] / "report.md"
    assert report.main([str(smoke_run["json"]), "-o", str(md_path)]) == 0
    text = md_path.read_text()
    for op, expected in SMOKE_ROWS.items():
        assert _table_rows(text, op) == expected, op
    assert "## Not run" in text and "peak (float32)" in text
    run = json.loads(smoke_run["json"].read_text())
    ran = {b["extra_info"]["provider"] for b in run["benchmarks"]}
    if "cudnn_nchw" in ran:  # PyTorch is installed: its CPU conv2d ran as a peer
        header = next(
            line
            for line in text.splitlines()
            if line.startswith("| shape | mask") and "cupydcn ms" in line
        )
        assert "conv2d NCHW" in header and "×" in header
        s1 = next(
            line
            for line in text.splitlines()
            if line.startswith("| S1 | mask | float32 | forward |")
        )
        assert re.search(r"\| [0-9.e+-]+ \| [0-9.e+-]+ \|", s1)
        assert "† bfloat16 row: peer ran in float32" in text
    png = md_path.with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
        assert not png.exists()
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![chart]({png.name})" in text


def test_report_without_matplotlib(smoke_run, monkeypatch, tmp_path):
    report = _load("report")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert report.main([str(smoke_run["json"]), "-o", str(tmp_path / "r.md")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "No chart: matplotlib is not installed" in text
    assert _table_rows(text, "deform_conv2d") == SMOKE_ROWS["deform_conv2d"]
    assert not (tmp_path / "r.png").exists()


def test_results_are_named_and_kept_for_gpu_runs_only(smoke_run, tmp_path):
    report = _load("report")
    run = {
        "datetime": "2025-01-02T03:04:05+00:00",
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "machine_info": {"cupydcn": {"device": {"name": "NVIDIA H100 80GB HBM3", "kind": "cuda"}}},
    }
    assert report.results_stem(run) == "2025-01-02_nvidia-h100-80gb-hbm3_0123456"
    cpu_run = json.loads(smoke_run["json"].read_text())
    if cpu_run["machine_info"]["cupydcn"]["device"]["kind"] != "cuda":
        assert (
            report.main([str(smoke_run["json"]), "--save-results", f"--results-dir={tmp_path}"])
            == 2
        )
        assert (
            report.main(
                [
                    str(smoke_run["json"]),
                    "--save-results",
                    "--allow-cpu",
                    f"--results-dir={tmp_path}",
                    "--no-png",
                ]
            )
            == 0
        )
        stem = report.results_stem(cpu_run)
        assert (tmp_path / f"{stem}.json").exists() and (tmp_path / f"{stem}.md").exists()


def test_quick_bench_prints_the_table(capsys):
    assert _bench.run_bench(["--quick", "--rounds=2"]) == 0
    out = capsys.readouterr().out
    assert "### deform_conv2d" in out and "### deform_roi_pool" in out
    assert "| S1 | mask | float32 | forward |" in out
    assert "| R1 | mask | float32 | backward |" in out
    device = _bench.detect_device()
    if device.kind != "cuda":
        assert "GPU provider, no CUDA device here" in out
        assert "NumPy backend on scaled-down shapes" in out


def test_quick_shapes_are_rows_of_the_benchmark_table():
    shapes = _load("shapes")

    def dims(shape):
        return dataclasses.replace(shape, why="")

    for shape_id, shape in _bench.QUICK_SHAPES.items():
        assert dims(shape) == dims(shapes.FULL[shape_id]), shape_id
    for shape_id, shape in _bench.QUICK_SHAPES_CPU.items():
        assert dims(shape) == dims(shapes.CPU[shape_id]), shape_id
    for table in (shapes.FULL, shapes.CPU):
        for shape in table.values():
            if isinstance(shape, _bench.ConvShape):
                assert shape.c_in % shape.groups == 0 and shape.c_out % shape.groups == 0
                assert shape.c_in % shape.offset_groups == 0


def test_benchmarks_are_not_collected_by_the_test_suite():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]
    assert not (BENCHMARKS / "__init__.py").exists()


def test_skip_reasons_name_the_missing_gpu():
    cpu = _bench.Device("cpu", "test CPU", "numpy", False, "CuPy reports 0 CUDA devices")
    for op, providers in _bench.PROVIDERS.items():
        for provider in providers:
            reason = _bench.skip_reason(op, provider, "mask", cpu)
            if provider == "cupydcn":
                assert reason is None
            else:
                assert reason.startswith("GPU provider, no CUDA device here (CuPy reports 0")


def test_report_merges_the_parts_of_a_run(smoke_run, tmp_path):
    report = _load("report")
    run = json.loads(smoke_run["json"].read_text())
    conv = dict(
        run, benchmarks=[b for b in run["benchmarks"] if b["extra_info"]["op"] == "deform_conv2d"]
    )
    rest = dict(
        run, benchmarks=[b for b in run["benchmarks"] if b["extra_info"]["op"] != "deform_conv2d"]
    )
    merged = report.merge([conv, rest])
    assert len(merged["benchmarks"]) == len(run["benchmarks"])
    text = report.markdown(merged)
    for op, expected in SMOKE_ROWS.items():
        assert _table_rows(text, op) == expected, op
    other = dict(rest, commit_info=dict(run.get("commit_info", {}), id="another"))
    with pytest.raises(SystemExit, match="different commits"):
        report.merge([conv, other])
