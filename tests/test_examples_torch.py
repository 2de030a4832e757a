"""examples/torch_train.py runs as a script and the deformable network ends with a lower
validation loss than the plain one (fixed seeds; the run is deterministic)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "torch_train.py"


def test_torch_train_example_deformable_beats_plain():
    # One thread: the networks are tiny, and on a busy machine extra intra-op threads
    # only spin. It changes neither the data nor the initialisation (both seeded).
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    run = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            str(EXAMPLE),
            "--steps",
            "150",
            "--seed",
            "0",
            "--eval-every",
            "50",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    losses = dict(
        re.findall(r"^(plain|deformable)\s+final validation loss ([0-9.]+)", run.stdout, re.M)
    )
    assert set(losses) == {"plain", "deformable"}, run.stdout
    plain, deformable = float(losses["plain"]), float(losses["deformable"])
    assert deformable < 0.5 * plain, run.stdout
    assert "mean offset length learned" in run.stdout
