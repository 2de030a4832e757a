"""benchmarks/gpu_session.sh, the script for a freshly lent GPU machine, dry-run here.

Without a GPU (``CUDA_VISIBLE_DEVICES=""`` makes sure of that on any machine) the script
must run its CPU stages (probe, install from a wheel folder, ``python -m cupydcn check``),
skip every GPU stage with its reason, write its files into the output folder, print the
summary last and finish inside its deadline. The strict-then-rerun logic of the GPU test
stage runs on a planted test file, the deadline logic on a deadline too short for anything,
and the helpers (commit stamping for report.py's results names, the 2^31 checks on tiny
sizes) directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
WHEELS_SCRIPT = ROOT / "benchmarks" / "gpu_session_wheels.sh"
HELPERS = ROOT / "benchmarks" / "gpu_session"
STAGES = (
    "probe",
    "install",
    "check",
    "gpu_tests",
    "gpu_tests_rerun",
    "memcheck",
    "large_index",
    "bench",
    "report",
)
NO_GPU = re.compile(r"^(no CUDA device|CuPy does not import)")
FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="the GPU session script needs bash and coreutils' timeout",
)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"cupydcn_gpu_session_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _wheel(folder: Path, dist: str, version: str, module: str, body: str) -> Path:
    """A minimal pure-Python wheel (what pip needs to install it with --no-index)."""
    info = f"{dist}-{version}.dist-info"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    files = {
        f"{module}/__init__.py": body,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def _environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPU_SESSION_")
        and k not in ("PYTEST_ADDOPTS", "OUT", "CUPYDCN_COMMIT", "CUPYDCN_COMMIT_FILE")
    }
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env.update(
        CUDA_VISIBLE_DEVICES="",  # a dry run on any machine, a GPU one too
        PYTHON=sys.executable,
        TMPDIR=str(tmp_path / "tmp"),
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
        GPU_SESSION_RESULTS_DIR=str(tmp_path / "results"),
        GPU_SESSION_WHEELS=str(tmp_path / "no-wheels"),
    )
    env.update(extra)
    return env


def _run(tmp_path: Path, deadline: int, **extra: str):
    out = tmp_path / "out"
    env = _environment(tmp_path, GPU_SESSION_DEADLINE=str(deadline), **extra)
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=deadline + 60,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, elapsed, out


def _table(out: Path) -> dict[str, tuple[str, str]]:
    """{stage: (status, detail)} from summary.md's table."""
    rows = {}
    for line in (out / "summary.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in STAGES:
            rows[cells[0]] = (cells[1], cells[4])
    assert tuple(rows) == STAGES, rows
    return rows


def _printed_table(stdout: str) -> list[str]:
    """The stage lines of the table printed last (stage, status)."""
    lines = stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("output: "), lines[-3:]
    body = lines[-1 - len(STAGES) : -1]
    assert lines[-2 - len(STAGES)].split()[:2] == ["stage", "status"], lines[-12:]
    return [" ".join(line.split()[:2]) for line in body]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_session")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # A distribution this environment lacks is installed; one it has (numpy) is not: the
    # planted numpy would break every import of cupydcn if it were.
    _wheel(wheels, "gpu_session_probe_pkg", "0.1", "gpu_session_probe_pkg", "VALUE = 42\n")
    _wheel(wheels, "numpy", "0.0.1", "numpy", "raise ImportError('planted numpy')\n")
    site = tmp_path / "site"
    deadline = 150
    done, elapsed, out = _run(
        tmp_path,
        deadline,
        GPU_SESSION_WHEELS=str(wheels),
        GPU_SESSION_SITE=str(site),
        CUPYDCN_COMMIT=FAKE_COMMIT,
    )
    return {
        "done": done,
        "elapsed": elapsed,
        "out": out,
        "site": site,
        "deadline": deadline,
        "tmp": tmp_path,
    }


def test_dry_run_skips_the_gpu_stages_with_their_reasons(dry_run):
    rows = _table(dry_run["out"])
    for stage in ("probe", "install", "check"):
        assert rows[stage][0] == "ok", (stage, rows[stage])
    assert rows["check"][1].startswith("all checks passed; backends: numpy (CPU)")
    assert NO_GPU.match(rows["probe"][1]), rows["probe"]
    for stage in ("gpu_tests", "memcheck", "large_index", "bench"):
        status, detail = rows[stage]
        assert status == "skipped" and NO_GPU.match(detail), (stage, rows[stage])
    assert rows["gpu_tests_rerun"] == ("skipped", "the strict run was skipped")
    assert rows["report"] == ("skipped", "no benchmark JSON (bench: skipped)")
    assert _printed_table(dry_run["done"].stdout) == [
        f"{stage} {rows[stage][0]}" for stage in STAGES
    ]


def test_dry_run_installs_only_the_missing_wheels(dry_run):
    status, detail = _table(dry_run["out"])["install"]
    assert status == "ok" and "installed gpu_session_probe_pkg-0.1" in detail, detail
    assert "cupydcn and the test tools import" in detail
    site = dry_run["site"]
    assert (site / "gpu_session_probe_pkg" / "__init__.py").is_file()
    assert not (site / "numpy").exists()
    log = _tar_member(dry_run["out"], "logs/install.log")
    assert "present: numpy" in log


def _tar_member(out: Path, name: str) -> str:
    with tarfile.open(out / "logs.tar.gz") as archive:
        member = archive.extractfile(name)
        assert member is not None, name
        return member.read().decode("utf-8", "replace")


def test_dry_run_output_folder_and_deadline(dry_run):
    out = dry_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "session.log", "summary.md"]
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert f"- commit: {FAKE_COMMIT} (from CUPYDCN_COMMIT)" in summary
    assert "## Environment" in summary and "python: " in summary
    with tarfile.open(out / "logs.tar.gz") as archive:
        names = set(archive.getnames())
    for stage in ("probe", "install", "check", "large_index"):
        assert f"logs/{stage}.log" in names, names
    assert "all checks passed" in _tar_member(out, "logs/check.log")
    assert "RESULT: skipped: " in _tar_member(out, "logs/large_index.log")
    session = (out / "session.log").read_text(encoding="utf-8")
    assert "######## check.log" in session and session.rstrip().endswith(
        dry_run["done"].stdout.rstrip().splitlines()[-1]
    )
    # The whole run stays inside its deadline (and the work folder is cleaned up).
    assert dry_run["elapsed"] < dry_run["deadline"], dry_run["elapsed"]
    seconds = int(re.search(r"after (\d+) s of the (\d+) s deadline", summary).group(1))
    assert seconds <= dry_run["deadline"] - 10
    assert not list((dry_run["tmp"] / "tmp").glob("gpu_session.*"))


def test_strict_failures_are_told_apart_by_the_rerun(tmp_path):
    tests = tmp_path / "planted"
    tests.mkdir()
    (tests / "test_planted_gpu.py").write_text(
        textwrap.dedent("""\
        import warnings

        import pytest

        pytestmark = pytest.mark.gpu


        def test_passes():
            pass


        def test_warning_only():
            warnings.warn("noise, not a failure", UserWarning)


        def test_real_failure():
            assert 1 + 1 == 3


        @pytest.mark.filterwarnings("ignore")
        def test_not_selected_twice():
            pass
        """),
        encoding="utf-8",
    )
    # A module that warns on import fails to collect in the strict run; rerun whole.
    (tests / "test_planted_import_noise.py").write_text(
        textwrap.dedent("""\
        import warnings

        import pytest

        warnings.warn("noise at import time", DeprecationWarning)
        pytestmark = pytest.mark.gpu


        def test_one():
            pass


        class TestMore:
            def test_two(self):
                pass
        """),
        encoding="utf-8",
    )
    # An earlier GPU run's benchmark JSON, as pytest-benchmark writes it without .git.
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(_gpu_run()), encoding="utf-8")
    # A stand-in compute-sanitizer that reports two errors.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text(
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        printf '%s\\n' "$*" > {tmp_path / "sanitizer-args.txt"}
        echo "all checks passed"
        echo "========= ERROR SUMMARY: 2 errors"
        exit 97
        """),
        encoding="utf-8",
    )
    sanitizer.chmod(0o755)
    done, elapsed, out = _run(
        tmp_path,
        90,
        GPU_SESSION_FORCE="gpu_tests,memcheck",
        GPU_SESSION_SKIP="probe,install,check,large_index",
        # the project's pytest configuration (warnings are errors) for files outside tests/
        GPU_SESSION_PYTEST_ARGS=f"-c {ROOT / 'pyproject.toml'} --rootdir {tmp_path} {tests}",
        GPU_SESSION_BENCH_JSON=str(earlier),
        CUPYDCN_COMMIT=FAKE_COMMIT,
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    rows = _table(out)
    for stage in ("probe", "install", "check", "large_index"):
        assert rows[stage] == ("skipped", "GPU_SESSION_SKIP names it")
    assert rows["gpu_tests"] == ("failed", "strict (warnings are errors): 3 failed, 2 passed")
    status, detail = rows["gpu_tests_rerun"]
    assert status == "failed"
    assert detail.startswith("2 of 3 failed only through warnings"), detail
    assert "1 real failure(s)" in detail
    summary = (out / "summary.md").read_text(encoding="utf-8")
    told = summary.split("## Strict failures told apart", 1)[1].split("```")[1].splitlines()
    assert [line for line in told if line and not line.startswith("RESULT")] == [
        "WARNINGS ONLY ::planted.test_planted_import_noise",
        "WARNINGS ONLY planted.test_planted_gpu::test_warning_only",
        "REAL FAILURE planted.test_planted_gpu::test_real_failure",
    ]
    assert "## gpu_tests: last lines of its log" in summary
    assert rows["memcheck"] == ("failed", "2 memcheck error(s); check: all checks passed")
    args = (tmp_path / "sanitizer-args.txt").read_text()
    assert args.startswith("--tool memcheck ") and "run-module --no-cupy-pool cupydcn check" in args
    # The report files the earlier run under the commit given, in the results folder and
    # in the output folder (which is what a lent machine sends back).
    stem = "2026-11-20_nvidia-h200_0123456"
    assert rows["report"][0] == "ok", rows["report"]
    assert sorted(p.name for p in (out / "results").iterdir()) == [f"{stem}.json", f"{stem}.md"]
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        f"{stem}.json",
        f"{stem}.md",
    ]
    filed = json.loads((out / "results" / f"{stem}.json").read_text(encoding="utf-8"))
    assert filed["commit_info"]["id"] == FAKE_COMMIT
    assert filed["commit_info"]["source"] == "CUPYDCN_COMMIT"
    assert json.loads(earlier.read_text())["commit_info"]["id"] == "unversioned"


def test_too_short_a_deadline_skips_every_stage(tmp_path):
    deadline = 8
    done, elapsed, out = _run(tmp_path, deadline)
    rows = _table(out)
    for stage in ("probe", "install", "check", "large_index"):
        status, detail = rows[stage]
        assert status == "skipped" and detail.startswith("too little time left"), rows[stage]
    for stage in ("gpu_tests", "memcheck", "bench"):
        assert rows[stage][0] == "skipped" and NO_GPU.match(rows[stage][1])
    assert rows["report"][0] == "skipped"
    assert elapsed < deadline
    commit = re.search(r"- commit: (\S+) \(from ", (out / "summary.md").read_text()).group(1)
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|nogit", commit), commit


def _gpu_run() -> dict:
    """A GPU run's JSON with no measurements, as pytest-benchmark writes it without .git."""
    return {
        "datetime": "2026-11-20T10:00:00+00:00",
        "benchmarks": [],
        "commit_info": {"id": "unversioned", "dirty": False, "branch": "(unknown)"},
        "machine_info": {"cupydcn": {"device": {"name": "NVIDIA H200", "kind": "cuda"}}},
    }


def test_stamped_commit_names_the_results(tmp_path):
    report = _load("report", ROOT / "benchmarks" / "report.py")
    tools = HELPERS / "tools.py"
    run = _gpu_run()
    path = tmp_path / "run.json"
    for commit, stem in (
        (f"{FAKE_COMMIT}-dirty", "2026-11-20_nvidia-h200_0123456-dirty"),
        ("abcdef1", "2026-11-20_nvidia-h200_abcdef1"),
        ("nogit", "2026-11-20_nvidia-h200_nogit"),
    ):
        path.write_text(json.dumps(run), encoding="utf-8")
        done = subprocess.run(
            [
                sys.executable,
                str(tools),
                "stamp",
                "--commit",
                commit,
                "--source",
                "test",
                str(path),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        stamped = json.loads(path.read_text(encoding="utf-8"))
        assert stamped["commit_info"]["source"] == "test"
        assert report.results_stem(stamped) == stem
    done = subprocess.run(
        [sys.executable, str(tools), "stamp", "--commit", "not a commit", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2


def test_rerun_tells_collection_errors_apart(tmp_path):
    """A module that failed to collect in the strict run (a warning at import time, say)
    is judged by its tests in the rerun."""
    strict = tmp_path / "strict.xml"
    strict.write_text(
        "<testsuites><testsuite>"
        '<testcase classname="" name="tests.test_noisy"><error message="collection failure"/>'
        '</testcase><testcase classname="" name="tests.test_broken"><error/></testcase>'
        '<testcase classname="tests.test_a" name="test_x"><failure/></testcase>'
        '<testcase classname="tests.test_a" name="test_y"/>'
        "</testsuite></testsuites>",
        encoding="utf-8",
    )
    again = tmp_path / "again.xml"
    again.write_text(
        "<testsuites><testsuite>"
        '<testcase classname="tests.test_noisy" name="test_1"/>'
        '<testcase classname="tests.test_noisy.TestGroup" name="test_2"/>'
        '<testcase classname="tests.test_broken" name="test_1"><failure/></testcase>'
        '<testcase classname="tests.test_a" name="test_x"><failure/></testcase>'
        "</testsuite></testsuites>",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, str(HELPERS / "tools.py"), "rerun", str(strict), str(again)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert "WARNINGS ONLY ::tests.test_noisy" in lines
    assert "REAL FAILURE ::tests.test_broken" in lines
    assert "REAL FAILURE tests.test_a::test_x" in lines
    assert lines[-1] == (
        "RESULT: 1 of 3 failed only through warnings (pass with warnings shown), 2 real failure(s)"
    )


def test_run_module_passes_the_exit_status_on(tmp_path):
    tools = str(HELPERS / "tools.py")
    env = _environment(tmp_path)
    done = subprocess.run(
        [sys.executable, tools, "run-module", "--no-cupy-pool", "platform"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    assert "CuPy memory pool" in done.stderr
    done = subprocess.run(
        [sys.executable, tools, "run-module", "json.tool", str(tmp_path / "missing.json")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode != 0


def test_large_index_checks_on_tiny_sizes(tmp_path):
    report = tmp_path / "large.json"
    done = subprocess.run(
        [sys.executable, str(HELPERS / "large_index.py"), "--small", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=120,
        env=_environment(tmp_path),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("RESULT: ok: ")
    checks = json.loads(report.read_text())["checks"]
    assert {c["case"] for c in checks} == {"conv", "roi", "psroi"}
    assert len(checks) > 30 and all(c["ok"] for c in checks)
    done = subprocess.run(
        [sys.executable, str(HELPERS / "large_index.py")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_environment(tmp_path),
    )
    assert done.returncode == 3 and NO_GPU.match(
        done.stdout.splitlines()[-1][len("RESULT: skipped: ") :]
    )


def test_large_index_sizes_pass_two_to_the_31():
    large = _load("large_index", HELPERS / "large_index.py")
    conv, roi = large.FULL_CONV, large.FULL_ROI
    limit = 2**31
    assert conv.elements()["input"] > limit and conv.elements()["columns"] > limit
    # Each reference sub-batch stays on the 32-bit kernels (cupydcn's limit: 2^31 - 1 - 2^24).
    piece = large.ConvSize(**{**conv.__dict__, "n": conv.piece})
    assert max(piece.elements().values()) < 2**31 - 1 - 2**24
    assert roi.elements()["input"] > limit and roi.c == roi.output_dim * roi.group_size**2
    first, boundary, last = roi.images()
    per_image = roi.c * roi.h * roi.w
    assert first == 0 and boundary * per_image >= limit and last == roi.n - 1
    assert per_image < 2**31 - 1 - 2**24
    for size in (conv, roi):  # fits a 141 GB H200 with room to spare
        assert size.bytes_needed(backward=True) < 100 * 2**30


def test_scripts_parse_and_pass_shellcheck(tmp_path):
    for script in (SCRIPT, WHEELS_SCRIPT):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        done = subprocess.run(
            [shellcheck, "-x", str(SCRIPT), str(WHEELS_SCRIPT)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout
    done = subprocess.run(
        ["bash", str(WHEELS_SCRIPT), "--dry-run", "array-api-compat==1.16.0"],
        capture_output=True,
        text=True,
        env=_environment(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    for part in (
        "pip download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version 3.12",
        "manylinux_2_17_x86_64",
        "array-api-compat==1.16.0",
    ):
        assert part in done.stdout, part
