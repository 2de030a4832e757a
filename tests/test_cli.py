"""``python -m cupydcn`` commands run and report success through their exit code."""

from __future__ import annotations

import pytest

from cupydcn.__main__ import main


def test_check_passes(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for op in ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool"):
        assert op in out
    assert "all checks passed" in out


def test_bench_quick(capsys):
    assert main(["bench", "--quick", "--rounds=2"]) == 0
    assert "|" in capsys.readouterr().out  # a Markdown table


def test_demo_few_steps(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    output = tmp_path / "demo.png"
    assert main(["demo", "--steps", "2", "--output", str(output)]) == 0
    assert output.stat().st_size > 0


def test_unknown_option_is_an_error():
    with pytest.raises(SystemExit):
        main(["check", "--nope"])
