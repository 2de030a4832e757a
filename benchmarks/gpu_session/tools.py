"""Small helpers of ``benchmarks/gpu_session.sh``, one subcommand each.

    python tools.py probe                      environment report; last line RESULT: ...
    python tools.py gpu                        "yes|NAME|GIB" (exit 0) or "no|REASON" (exit 3)
    python tools.py missing-wheels DIR         the wheels in DIR whose distribution is missing
    python tools.py verify-imports             what cupydcn and the stages need; exit 1 if
                                               cupydcn or pytest does not import
    python tools.py junit FILE.xml             RESULT: counts of one pytest run
    python tools.py rerun STRICT.xml RERUN.xml...
                                               RESULT: failures told apart (warnings / real)
    python tools.py lastfailed-modules CACHE [PYTEST_ARGS...]
                                               modules whose collection failed in the last
                                               pytest run with that cache folder
    python tools.py stamp --commit C RUN.json  write the commit into benchmark JSONs
    python tools.py run-module [--no-cupy-pool] MODULE ARGS...
                                               ``python -m MODULE ARGS`` (optionally with
                                               CuPy's memory pool off, for compute-sanitizer)

Standard library only at import time (the probe imports what it reports on, each in a
``try``), so every subcommand runs on a machine that lacks any of those packages.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import re
import runpy
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# ---------------------------------------------------------------------------- probe


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _cuda_version(number: int) -> str:
    """12040 -> '12.4' (the CUDA runtime / driver API's encoding)."""
    return f"{number // 1000}.{number % 1000 // 10}"


def gpu_state() -> tuple[bool, str, float]:
    """(present, device 0's name or the reason there is none, memory in GiB)."""
    try:
        import cupy
    except Exception as exc:  # not installed, or broken
        return False, f"CuPy does not import ({_short(exc)})", 0.0
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver, no device, CUDA_VISIBLE_DEVICES=""
        return False, f"no CUDA device (CuPy: {_short(exc)})", 0.0
    if count == 0:
        return False, "no CUDA device (CuPy reports 0 devices)", 0.0
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return True, name, props["totalGlobalMem"] / 2**30


def probe() -> int:
    lines: list[str] = []
    summary: list[str] = []

    def add(key: str, value: object) -> None:
        lines.append(f"{key}: {value}")

    add("python", f"{platform.python_version()} ({sys.executable})")
    add("platform", platform.platform())
    for dist in (
        "numpy",
        "array-api-compat",
        "ml-dtypes",
        "pytest",
        "pytest-benchmark",
        "matplotlib",
        "cupy-cuda13x",
        "cupy-cuda12x",
        "torchvision",
        "jax",
        "jaxlib",
        "nvidia-cuda-nvrtc",
        "nvidia-cuda-nvrtc-cu12",
    ):
        version = _version(dist)
        if version is not None or dist in (
            "numpy",
            "array-api-compat",
            "pytest",
            "pytest-benchmark",
        ):
            add(f"dist {dist}", version or "MISSING")

    present, name, gib = gpu_state()
    try:
        import cupy

        add("cupy", cupy.__version__)
        summary.append(f"CuPy {cupy.__version__}")
        try:
            add("cuda runtime (CuPy)", _cuda_version(cupy.cuda.runtime.runtimeGetVersion()))
        except Exception as exc:
            add("cuda runtime (CuPy)", _short(exc))
        try:
            number = cupy.cuda.runtime.driverGetVersion()
            driver = _cuda_version(number) if number else "none (no driver)"
            add("cuda driver API", driver)
            if number:
                summary.append(f"driver CUDA {driver}")
        except Exception as exc:
            add("cuda driver API", _short(exc))
        try:
            major, minor = cupy.cuda.nvrtc.getVersion()
            add("nvrtc", f"{major}.{minor}")
            summary.append(f"NVRTC {major}.{minor}")
        except Exception as exc:
            add("nvrtc", _short(exc))
    except Exception as exc:
        add("cupy", f"not importable ({_short(exc)})")
        summary.append("CuPy missing")
    if present:
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        add(
            "gpu",
            f"{name}, {gib:.1f} GiB, compute capability {props['major']}.{props['minor']}, "
            f"{props['multiProcessorCount']} SMs, {cupy.cuda.runtime.getDeviceCount()} device(s)",
        )
        summary.insert(0, f"{name} ({gib:.0f} GiB)")
    else:
        add("gpu", name)
        summary.insert(0, name)

    try:
        import torch

        cuda = torch.version.cuda
        available = torch.cuda.is_available()
        add(
            "torch",
            f"{torch.__version__}, built for CUDA {cuda}, cuda available {available}"
            + (
                f", {torch.cuda.get_device_name(0)}, cuDNN {torch.backends.cudnn.version()}"
                if available
                else ""
            ),
        )
        summary.append(f"torch {torch.__version__}" + (" (CUDA)" if available else ""))
    except Exception as exc:
        add("torch", f"not importable ({_short(exc)})")
        summary.append("torch missing")
    try:
        import torchvision

        add("torchvision", torchvision.__version__)
        summary.append(f"torchvision {torchvision.__version__}")
    except Exception as exc:
        add("torchvision", f"not importable ({_short(exc)})")
        summary.append("torchvision missing")
    try:
        import jax

        try:
            devices = ", ".join(str(d) for d in jax.devices())
        except Exception as exc:
            devices = _short(exc)
        add("jax", f"{jax.__version__}, devices: {devices}")
        summary.append(f"JAX {jax.__version__} ({devices[:40]})")
    except Exception as exc:
        add("jax", f"not importable ({_short(exc)})")
        summary.append("JAX missing")
    for module in ("ml_dtypes", "array_api_compat"):
        try:
            add(module, getattr(importlib.import_module(module), "__version__", "?"))
        except Exception as exc:
            add(module, f"not importable ({_short(exc)})")
            summary.append(f"{module} missing")
    for line in lines:
        print(line)
    print("RESULT: " + ", ".join(summary))
    return 0


def gpu() -> int:
    present, name, gib = gpu_state()
    if present:
        print(f"yes|{name}|{gib:.1f}")
        return 0
    print(f"no|{name}")
    return 3


# ---------------------------------------------------------------------------- wheels


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_wheels(folder: str) -> int:
    """Print the wheels (one path a line) whose distribution is not installed; one wheel per
    distribution (the last by name when a folder holds several versions: pip refuses two)."""
    path = Path(folder)
    if not path.is_dir():
        return 0
    chosen: dict[str, Path] = {}
    for wheel in sorted(path.glob("*.whl")):
        dist = _normalise(wheel.name.split("-", 1)[0])
        if dist in chosen:
            print(
                f"note: {chosen[dist].name} and {wheel.name} are one distribution; "
                f"using {wheel.name}",
                file=sys.stderr,
            )
        chosen[dist] = wheel
    for dist, wheel in chosen.items():
        version = _version(dist)
        if version is None:
            print(wheel)
        else:
            print(f"present: {dist} {version} (not installing {wheel.name})", file=sys.stderr)
    return 0


# The stages' imports: required ones fail the install stage, optional ones are listed.
REQUIRED = ("numpy", "array_api_compat", "cupydcn", "pytest")
OPTIONAL = ("pytest_benchmark", "cupy", "ml_dtypes", "torch", "torchvision", "jax", "matplotlib")


def verify_imports() -> int:
    """Imports the required modules; looks the optional ones up without importing them
    (the probe imports those and reports how they fare)."""
    failed, absent = [], []
    for module in REQUIRED:
        try:
            importlib.import_module(module)
        except Exception as exc:
            failed.append(f"{module} ({_short(exc)})")
    for module in OPTIONAL:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            absent.append(module)
    parts = []
    if failed:
        parts.append("not importable: " + "; ".join(failed))
    else:
        parts.append("cupydcn and the test tools import")
    if absent:
        parts.append("not installed (optional): " + ", ".join(absent))
    print("RESULT: " + "; ".join(parts))
    return 1 if failed else 0


# ---------------------------------------------------------------------------- pytest runs


def junit_cases(path: str | Path) -> dict[str, str]:
    """{test id: outcome} of a junit XML file (outcomes: passed, failed, skipped)."""
    root = ET.parse(path).getroot()
    outcomes = {}
    for case in root.iter("testcase"):
        ident = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            outcomes[ident] = "failed"
        elif "skipped" in tags:
            outcomes[ident] = "skipped"
        else:
            outcomes[ident] = "passed"
    return outcomes


def _counts(outcomes: dict[str, str]) -> str:
    parts = [
        f"{sum(v == k for v in outcomes.values())} {k}"
        for k in ("failed", "passed", "skipped")
        if k in outcomes.values()
    ]
    return ", ".join(parts) if parts else "no tests ran"


def junit(path: str) -> int:
    if not Path(path).exists():
        print("RESULT: no junit XML (the run did not finish)")
        return 1
    outcomes = junit_cases(path)
    print("RESULT: " + _counts(outcomes))
    for ident, outcome in outcomes.items():
        if outcome == "failed":
            print(f"FAILED {ident}")
    return 1 if "failed" in outcomes.values() else 0


def rerun(strict: str, again: list[str]) -> int:
    """The strict run's failures, run again with warnings shown: those that pass now failed
    only through a warning turned into an error; those that fail again are real. Several
    rerun files are merged, a later one's outcome winning."""
    first = {k for k, v in junit_cases(strict).items() if v == "failed"}
    second: dict[str, str] = {}
    for path in again:
        if Path(path).exists():
            second.update(junit_cases(path))

    def outcome(ident: str) -> str | None:
        if ident in second:
            return second[ident]
        # A module that failed to collect (classname "", name "tests.test_x") comes back as
        # its tests (classname "tests.test_x" or "tests.test_x.TestClass").
        classname, _, name = ident.partition("::")
        if classname:
            return None
        inside = [
            v for k, v in second.items() if k.split("::", 1)[0] == name or k.startswith(name + ".")
        ]
        if "failed" in inside:
            return "failed"
        if "passed" in inside:
            return "passed"
        return "skipped" if inside else None

    again_outcome = {k: outcome(k) for k in first}
    noise = sorted(k for k in first if again_outcome[k] == "passed")
    real = sorted(k for k in first if again_outcome[k] == "failed")
    other = sorted(k for k in first if again_outcome[k] not in ("passed", "failed"))
    for ident in noise:
        print(f"WARNINGS ONLY {ident}")
    for ident in real:
        print(f"REAL FAILURE {ident}")
    for ident in other:
        print(f"NOT RERUN {ident} ({again_outcome[ident] or 'not collected again'})")
    parts = [
        f"{len(noise)} of {len(first)} failed only through warnings (pass with warnings shown)",
        f"{len(real)} real failure(s)",
    ]
    if other:
        parts.append(f"{len(other)} not rerun")
    print("RESULT: " + ", ".join(parts))
    return 0 if not real and not other else 1


def lastfailed_modules(cache_dir: str, pytest_args: list[str]) -> int:
    """Print the test files (one a line) that failed to collect in the last run using
    ``cache_dir``: ``--lf`` reruns only part of such a module, so the rerun names them.
    Node ids are relative to the rootdir: ``--rootdir`` among ``pytest_args``, else here."""
    path = Path(cache_dir) / "v" / "cache" / "lastfailed"
    if not path.is_file():
        return 0
    rootdir = Path.cwd()
    for i, arg in enumerate(pytest_args):
        if arg.startswith("--rootdir="):
            rootdir = Path(arg.split("=", 1)[1])
        elif arg == "--rootdir" and i + 1 < len(pytest_args):
            rootdir = Path(pytest_args[i + 1])
    for node in json.loads(path.read_text(encoding="utf-8")):
        if "::" not in node and node.endswith(".py") and (rootdir / node).is_file():
            print(rootdir / node)
    return 0


# ---------------------------------------------------------------------------- benchmark JSON

COMMIT_PATTERN = re.compile(r"^(?:[0-9a-f]{7,40}|nogit)(?:-dirty)?$")


def stamp(commit: str, files: list[str], source: str) -> int:
    """Write ``commit`` (HEX, HEX-dirty or nogit) into each run's ``commit_info``, which
    ``benchmarks/report.py`` names the results after: pytest-benchmark reads it from git,
    and a copy of the tree without ``.git`` gives 'unversioned'."""
    if not COMMIT_PATTERN.match(commit):
        print(
            f"stamp: {commit!r} is not a commit (hex digits, optionally -dirty, or nogit)",
            file=sys.stderr,
        )
        return 2
    dirty = commit.endswith("-dirty")
    ident = commit[: -len("-dirty")] if dirty else commit
    for name in files:
        path = Path(name)
        run = json.loads(path.read_text(encoding="utf-8"))
        info = run.setdefault("commit_info", {})
        found = info.get("id")
        if found not in (None, "", "unversioned", "unknown") and found != ident:
            info["id_from_pytest_benchmark"] = found
        info["id"] = ident
        info["dirty"] = dirty
        info["source"] = source
        path.write_text(json.dumps(run, indent=4), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------- run-module


def run_module(module: str, args: list[str], no_cupy_pool: bool) -> int:
    """``python -m module args``; with ``no_cupy_pool`` every CuPy allocation is its own
    cudaMalloc, so compute-sanitizer's memcheck sees each array's true bounds (CuPy's pool
    hands out pieces of larger blocks, inside which an overrun goes unseen)."""
    if no_cupy_pool:
        try:
            import cupy

            cupy.cuda.set_allocator(None)
            cupy.cuda.set_pinned_memory_allocator(None)
            print("run-module: CuPy memory pool off", file=sys.stderr)
        except Exception as exc:
            print(f"run-module: CuPy memory pool left on ({_short(exc)})", file=sys.stderr)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("probe")
    sub.add_parser("gpu")
    p = sub.add_parser("missing-wheels")
    p.add_argument("folder")
    sub.add_parser("verify-imports")
    p = sub.add_parser("junit")
    p.add_argument("xml")
    p = sub.add_parser("rerun")
    p.add_argument("strict")
    p.add_argument("again", nargs="+")
    p = sub.add_parser("lastfailed-modules")
    p.add_argument("cache_dir")
    p.add_argument(
        "pytest_args", nargs=argparse.REMAINDER, help="the run's pytest arguments (for --rootdir)"
    )
    p = sub.add_parser("stamp")
    p.add_argument("--commit", required=True)
    p.add_argument(
        "--source", default=os.environ.get("GPU_SESSION_COMMIT_SOURCE", "gpu_session.sh")
    )
    p.add_argument("json", nargs="+")
    p = sub.add_parser("run-module")
    p.add_argument("--no-cupy-pool", action="store_true")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "probe":
        return probe()
    if args.command == "gpu":
        return gpu()
    if args.command == "missing-wheels":
        return missing_wheels(args.folder)
    if args.command == "verify-imports":
        return verify_imports()
    if args.command == "junit":
        return junit(args.xml)
    if args.command == "rerun":
        return rerun(args.strict, args.again)
    if args.command == "lastfailed-modules":
        return lastfailed_modules(args.cache_dir, args.pytest_args)
    if args.command == "stamp":
        return stamp(args.commit, args.json, args.source)
    return run_module(args.module, args.args, args.no_cupy_pool)


if __name__ == "__main__":
    sys.exit(main())
