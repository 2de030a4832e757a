"""Fails unless the tests marked ``emulated`` ran and passed; prints the run's counts.

Usage: python .ci/check_emulated.py JUNIT_XML

Reads the junit report written by ``python -m pytest`` under .ci/run, with each test's
markers recorded as a ``markers`` property by .ci/cupydcn_ci_markers.py. Exits 1 when no
emulated test passed, when any was skipped (CI must run them all) or when any failed. The
last line printed is the whole run's ``summary: N passed, N failed, N skipped``.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def outcome_of(case: ET.Element) -> str:
    if case.find("failure") is not None or case.find("error") is not None:
        return "failed"
    skip = case.find("skipped")
    if skip is not None:
        return "xfailed" if skip.get("type") == "pytest.xfail" else "skipped"
    return "passed"


def markers_of(case: ET.Element) -> set[str]:
    markers: set[str] = set()
    for prop in case.iter("property"):
        if prop.get("name") == "markers":
            markers.update(filter(None, prop.get("value", "").split(",")))
    return markers


def main(path: str) -> int:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        print(f"cannot read the junit report {path}: {exc}")
        return 1

    totals = {"passed": 0, "failed": 0, "skipped": 0}
    emulated: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": [], "xfailed": []}
    for case in root.iter("testcase"):
        outcome = outcome_of(case)
        totals["skipped" if outcome == "xfailed" else outcome] += 1
        if "emulated" in markers_of(case):
            emulated[outcome].append(f"{case.get('classname')}::{case.get('name')}")

    ok = True
    print(
        f"emulated tests: {len(emulated['passed'])} passed, {len(emulated['failed'])} failed, "
        f"{len(emulated['skipped'])} skipped, {len(emulated['xfailed'])} xfailed"
    )
    if not emulated["passed"]:
        print("FAIL: no test marked 'emulated' passed: the kernels were not run by the CPU harness")
        ok = False
    if emulated["skipped"]:
        print("FAIL: emulated tests were skipped (CI must run them all):")
        print("\n".join(f"  {name}" for name in emulated["skipped"][:50]))
        ok = False
    if emulated["failed"]:
        ok = False  # pytest's own summary lists them
    # The closing line: the whole run's counts.
    print(
        f"summary: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
