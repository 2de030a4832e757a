"""``python -m cupydcn`` commands run and report success through their exit code; they
refuse bad options with one clear line, before doing the work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cupydcn import __version__
from cupydcn.cli import check as _check
from cupydcn.cli import main
from cupydcn.cli.probe import cuda_device_count

OPS = ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def _table(out: str) -> tuple[str, list[str]]:
    """The check table's header and rows."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("op "))
    end = lines.index("", start)
    return lines[start], lines[start + 2 : end]


def _assert_aligned(header: str, rows: list[str]) -> None:
    """Every cell sits under its header: left-aligned text columns start where their
    header starts, number columns end where theirs ends, the ok column holds yes / NO /
    skip."""
    for name in ("backend", "dtype", "what"):
        start = header.index(name)
        for row in rows:
            assert row[start - 1] == " " and row[start] != " ", (name, row)
    for name in ("rel. error", "tolerance", "ms"):
        end = header.index(name) + len(name)
        for row in rows:
            assert row[end - 1] != " " and row[end] == " ", (name, row)
    ok_at = header.rindex("ok")
    for row in rows:
        assert row[ok_at:].split()[0] in ("yes", "NO", "skip"), row


def test_check_passes(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for op in OPS:
        assert op in out
    assert "all checks passed" in out
    header, rows = _table(out)
    _assert_aligned(header, rows)
    # the adapters, forward and backward through autograd / jax.grad, on every op
    for adapter, module in (("torch adapter", "cupydcn.torch"), ("jax adapter", "cupydcn.jax")):
        if not _importable(module):
            continue
        mine = [row for row in rows if adapter in row]
        assert {row.split()[0] for row in mine} == set(OPS), adapter
        assert any("grad_offset (autograd)" in row for row in mine)
        assert all(row.endswith(" yes") for row in mine)
    count, reason = cuda_device_count()
    if not count:  # the reason there is no CUDA device, as CuPy gave it
        assert f"CUDA devices: none ({reason})" in out
        assert f"no CUDA backend: {reason}" in out


def test_check_skips_with_reasons_and_keeps_the_table_aligned(monkeypatch, capsys):
    """CuPy missing, the JAX adapter not importable and no bfloat16 support: each says
    why, the skipped rows line up with the others and the check still passes."""
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    monkeypatch.setitem(sys.modules, "cupydcn.jax", None)
    numpy_dtype = _check.numpy_dtype

    def no_bfloat16(name):
        if name == "bfloat16":
            raise ImportError("bfloat16 needs ml_dtypes (test)")
        return numpy_dtype(name)

    monkeypatch.setattr(_check, "numpy_dtype", no_bfloat16)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "CUDA devices: none (CuPy is not installed" in out
    assert "no CUDA backend: CuPy is not installed" in out
    header, rows = _table(out)
    _assert_aligned(header, rows)
    skipped = [row for row in rows if row[header.rindex("ok") :].startswith("skip")]
    assert {row.split()[0] for row in skipped} == set(OPS)
    assert sum("bfloat16 needs ml_dtypes (test)" in row for row in skipped) == 3
    assert (
        sum("jax adapter" in row and "cupydcn.jax is not importable" in row for row in skipped) == 3
    )
    assert "all checks passed" in out


def test_bench_quick(capsys):
    assert main(["bench", "--quick", "--rounds=2"]) == 0
    assert "|" in capsys.readouterr().out  # a Markdown table


def test_bench_quick_is_a_default_that_explicit_options_override(capsys):
    assert (
        main(
            [
                "bench",
                "--quick",
                "--shapes",
                "S3",
                "--passes",
                "forward",
                "--rounds",
                "1",
                "--warmup",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| S3 | mask | float32 | forward |" in out
    assert "| S1 |" not in out and "| R1 |" not in out and "backward |" not in out
    assert "median of 1 after 0 warm-up call(s)" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--rounds", "-3"],
        ["--rounds", "0"],
        ["--warmup", "-1"],
        ["--rounds", "two"],
        ["--shapes", "S9"],
        ["--passes", "sideways"],
    ],
)
def test_bench_refuses_bad_options(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["bench", *argv])
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert argv[0] in captured.err and captured.out == ""


def test_bench_json_folder_is_checked_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--quick", "--json", str(tmp_path / "missing" / "run.json")])
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and captured.out == ""


def test_demo_few_steps(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    output = tmp_path / "demo.png"
    assert main(["demo", "--steps", "2", "--output", str(output)]) == 0
    assert output.stat().st_size > 0


def _one_line_error(captured) -> str:
    assert captured.out == ""  # nothing ran
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m cupydcn demo: error: ")
    return lines[0]


def test_demo_on_cuda_without_cupy_says_why_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    code = main(["demo", "--device", "cuda", "--steps", "1", "--output", str(tmp_path / "d.png")])
    assert code != 0
    assert "--device cuda: CuPy is not installed" in _one_line_error(capsys.readouterr())


def test_demo_on_cuda_without_a_device_says_why_in_one_line(tmp_path, capsys):
    count, reason = cuda_device_count()
    if count:
        pytest.skip("a CUDA device is present")
    code = main(["demo", "--device", "cuda", "--steps", "1", "--output", str(tmp_path / "d.png")])
    assert code != 0
    assert _one_line_error(capsys.readouterr()).endswith(f"--device cuda: {reason}")


def test_demo_output_folder_is_checked_before_training(tmp_path, capsys):
    missing = tmp_path / "missing" / "demo.png"
    assert main(["demo", "--steps", "2", "--output", str(missing)]) == 2
    assert "does not exist" in _one_line_error(capsys.readouterr())
    assert not missing.parent.exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out == f"cupydcn {__version__}\n"


def test_python_dash_m_runs_the_front_end():
    done = subprocess.run(
        [sys.executable, "-m", "cupydcn", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout == f"cupydcn {__version__}\n"


@pytest.mark.parametrize("argv", [[], ["check"], ["bench"], ["demo"]])
def test_help_texts_have_no_backticks(argv, capsys):
    """Help is plain text: no reStructuredText markup such as ``this``."""
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--help"])
    assert raised.value.code == 0
    out = capsys.readouterr().out
    assert "usage: python -m cupydcn" in out
    assert "`" not in out, out


def test_probe_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert cuda_device_count() == (0, "CuPy is not installed (cupydcn's CUDA path needs it)")


def test_unknown_option_is_an_error():
    with pytest.raises(SystemExit):
        main(["check", "--nope"])
