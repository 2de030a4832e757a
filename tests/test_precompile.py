"""Ahead-of-time compilation into CuPy's kernel cache (``cupydcn.precompile``,
``python -m cupydcn compile``), without a GPU: NVRTC compiles for ``--arch sm_90`` on the
CPU.

With CUPY_CACHE_DIR a fresh directory, the command writes one cache file per module and
prints the per-module table; run again it finds every module (hits, no new file, fast).
The run-time lookup -- CuPy's RawModule path, ``compile_with_cache`` with the device's
architecture -- finds what precompile wrote without invoking NVRTC. Importing cupydcn
compiles nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cupydcn.core.errors import CupydcnValueError
from cupydcn.cuda import precompile as pc
from cupydcn.cuda.kernel_source import KERNEL_TEMPLATES, specialisations

REQUIRE = os.environ.get("CUPYDCN_REQUIRE_NVRTC") == "1"


def _cupy_compiler():
    """CuPy's compiler module with an NVRTC it can load, else skip (fail in CI)."""
    try:
        from cupy.cuda import compiler

        compiler._get_nvrtc_version()
    except Exception as exc:  # no CuPy, or no NVRTC library
        if REQUIRE:
            pytest.fail(
                f"CuPy's NVRTC is unavailable: {exc} (CUPYDCN_REQUIRE_NVRTC=1)", pytrace=False
            )
        pytest.skip(f"CuPy's NVRTC is unavailable: {exc}")
    return compiler


# ---------------------------------------------------------------- selection
def test_modules_of_ops_dtypes_and_index_widths():
    modules = pc.modules_for("deform_roi_pool", "float32", 32)
    assert modules == [
        ("deform_roi_pool.cu", "float32", 32, ()),
        ("convert.cu", "float32", 32, ()),
        ("deform_roi_pool_deterministic.cu", "float32", 32, ()),
        ("segment_sum.cu", "float32", 32, ()),
    ]
    assert pc.modules_for("deform_roi_pool", "float32", 32, deterministic=False) == modules[:2]
    every = pc.modules_for()
    # each module once: every file x dtype x index width x specialisation
    assert (
        len(every)
        == len(set(every))
        == sum(len(specialisations(f)) for f in KERNEL_TEMPLATES) * 4 * 2
    )
    # "all" builds every source file that has kernels: each belongs to some op.
    assert {s for s, *_ in every} == set(KERNEL_TEMPLATES)
    assert pc.modules_for(["deform_conv2d", "deform_conv2d"], ["float16"], ["int64"]) == [
        (s, "float16", 64, t)
        for s in (
            "deform_conv.cu",
            "convert.cu",
            "deform_conv_second_order.cu",
            "deform_conv_depthwise.cu",
            "deform_conv_fused.cu",
            "deform_conv_fused_backward.cu",
            "deform_conv_deterministic.cu",
            "segment_sum.cu",
        )
        for t in specialisations(s)
    ]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(ops="deform_conv"), "unknown op 'deform_conv'"),
        (dict(dtypes=["float8"]), "unknown dtype 'float8'"),
        (dict(index_bits=16), "unknown index width 16"),
        (dict(ops=[]), "no op given"),
    ],
)
def test_unknown_choices_are_refused(arguments, message):
    with pytest.raises(CupydcnValueError, match=message):
        pc.modules_for(**arguments)


@pytest.mark.parametrize(
    "given, arch",
    [("sm_90", "90"), ("90", "90"), (80, "80"), ("compute_86", "86"), ("SM_120", "120")],
)
def test_arch_spellings(given, arch):
    assert pc.normalise_arch(given) == arch


@pytest.mark.parametrize("bad", ["sm90x", "hopper", "sm_9", ""])
def test_bad_arch_is_refused(bad):
    with pytest.raises(CupydcnValueError, match="arch must look like"):
        pc.normalise_arch(bad)


def test_import_compiles_nothing():
    """Importing cupydcn (and the precompile module) neither imports CuPy nor compiles."""
    code = (
        "import sys, cupydcn, cupydcn.cuda.precompile; "
        "assert 'cupy' not in sys.modules, 'cupy imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- the cache
def _cli(cache: Path, *arguments: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUPY_CACHE_DIR": str(cache)}
    env.pop("CUPY_CACHE_IN_MEMORY", None)
    return subprocess.run(
        [sys.executable, "-m", "cupydcn", "compile", *arguments],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("module "))
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    end = lines.index("", start)
    return [line.split() for line in lines[start + 2 : end]]


def test_cli_fills_the_cache_and_a_second_run_hits(tmp_path):
    _cupy_compiler()
    cache = tmp_path / "kernel_cache"
    arguments = (
        "--ops",
        "deform_roi_pool",
        "--dtypes",
        "float32",
        "--index-bits",
        "32",
        "--arch",
        "sm_90",
    )
    first = _cli(cache, *arguments)
    assert first.returncode == 0, first.stderr
    rows = _rows(first.stdout)
    assert [r[0] for r in rows] == [
        "deform_roi_pool.cu",
        "convert.cu",
        "deform_roi_pool_deterministic.cu",
        "segment_sum.cu",
    ]
    assert all(r[1:4] == ["float32", "int32", "sm_90"] and r[5] == "compiled" for r in rows)
    files = sorted(p.name for p in cache.iterdir())
    assert len([f for f in files if f.endswith(".cubin")]) == 4, files
    assert f"cache: {cache}" in first.stdout
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    second = _cli(cache, *arguments)
    assert second.returncode == 0, second.stderr
    again = _rows(second.stdout)
    assert [r[0] for r in again] == [r[0] for r in rows]
    assert all(r[5] == "hit" for r in again)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps  # nothing new
    # Fast: a hit reads one file. (The first row of a process also holds CuPy's one-off
    # NVRTC version probe, an empty-file compile, hit or not: left out.)
    compiled_seconds = sum(float(r[4]) for r in rows[1:])
    hit_seconds = [float(r[4]) for r in again[1:]]
    assert max(hit_seconds) < 0.1 and sum(hit_seconds) < compiled_seconds / 4, (
        hit_seconds,
        compiled_seconds,
    )
    assert "0 compiled, 4 already cached" in second.stdout


def test_cli_refuses_bad_options_in_one_line(tmp_path):
    done = _cli(tmp_path, "--ops", "nope", "--arch", "sm_90")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "unknown op 'nope'" in done.stderr


@pytest.fixture
def cache_backend(tmp_path, monkeypatch):
    """CuPy's disk kernel cache in a fresh directory (CuPy reads CUPY_CACHE_DIR once, at
    import: the backend is replaced instead, as CUPY_CACHE_DIR would set it)."""
    compiler = _cupy_compiler()
    from cupy.cuda._compiler_cache import DiskKernelCacheBackend

    monkeypatch.delenv("CUPY_CACHE_IN_MEMORY", raising=False)
    backend = DiskKernelCacheBackend(str(tmp_path))
    monkeypatch.setattr(compiler, "_kernel_cache_backend", backend)
    return tmp_path


def test_precompile_writes_files_and_then_hits(cache_backend):
    builds = pc.precompile(
        "deform_psroi_pool", ["float16"], [64], arch="sm_90", deterministic=False
    )
    assert [(b.source_file, b.cached) for b in builds] == [
        ("deform_psroi_pool.cu", False),
        ("convert.cu", False),
    ]
    files = sorted(p.name for p in cache_backend.iterdir())
    assert sorted(Path(b.cache_file).name for b in builds) == files
    seen = []
    again = pc.precompile(
        "deform_psroi_pool", ["float16"], [64], arch=90, deterministic=False, progress=seen.append
    )
    assert seen == again and all(b.cached for b in again)
    assert sorted(p.name for p in cache_backend.iterdir()) == files
    assert [b.cache_file for b in again] == [b.cache_file for b in builds]
    table = pc.format_table(builds + again)
    assert table.splitlines()[0].split() == ["module", "dtype", "index", "arch", "seconds", "cache"]
    assert table.count("compiled") == 2 and table.count("hit") == 2


def test_run_time_lookup_finds_the_precompiled_module(cache_backend, monkeypatch):
    """What CuPy's RawModule does on first use on an sm_90 device -- compile_with_cache
    with arch=None, the device's architecture -- loads the precompiled entry and never
    invokes NVRTC. (Loading the cubin then needs a driver: here that is the error.)"""
    compiler = _cupy_compiler()
    from cupy._core import core

    first = specialisations("deform_conv.cu")[0]
    (build,) = [
        b
        for b in pc.precompile("deform_conv2d", "float32", 32, arch="sm_90")
        if b.source_file == "deform_conv.cu" and b.template_args == first
    ]

    recorder = pc._RecordingBackend(compiler._kernel_cache_backend)
    monkeypatch.setattr(compiler, "_kernel_cache_backend", recorder)
    monkeypatch.setattr(compiler, "_get_arch", lambda: "90")  # an sm_90 device
    monkeypatch.setattr(
        compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{arch}", "cubin")
    )

    class NoCompilation:
        def __init__(self, source, *args, **kwargs):
            assert not source, "NVRTC was invoked: the precompiled entry was not found"

        def compile(self, options=(), log_stream=None):  # the empty-file version probe
            raise AssertionError("NVRTC was invoked")

    monkeypatch.setattr(compiler, "_NVRTCProgram", NoCompilation)
    with pytest.raises(Exception) as failure:
        pc.compile_like_raw_module(core, "deform_conv.cu", "float32", 32, None, first)
    assert not isinstance(failure.value, AssertionError), failure.value
    assert recorder.loaded == [Path(build.cache_file).name]
    assert recorder.saved == []


def test_in_memory_cache_is_refused(monkeypatch):
    _cupy_compiler()
    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    with pytest.raises(CupydcnValueError, match="CUPY_CACHE_IN_MEMORY"):
        pc.precompile("deform_roi_pool", "float32", 32, arch="sm_90")


def test_help_is_plain_text(capsys):
    from cupydcn.cli import main

    with pytest.raises(SystemExit) as raised:
        main(["compile", "--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m cupydcn compile" in out and "--arch" in out
    assert "`" not in out
