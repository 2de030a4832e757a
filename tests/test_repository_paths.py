"""Every repository path quoted in the repository's text files exists.

Comments, docstrings, Markdown and scripts cite files by their repository-relative path
(``cupydcn/cuda/kernels/deform_conv.cu``, ``docs/semantics.md``, ``tests/...``); after a
move such a citation silently goes stale. This test collects every such path from the
tracked text files (``git ls-files``; in a tree without ``.git``, such as an sdist, it walks
the tree instead) and checks that it names a file or folder that exists, and that no file
cites the contract under another name or a folder outside the repository.

What counts as a path: a run of path characters that starts with one of the top-level
folders below and either ends in a file suffix, ends in ``/``, holds a glob (``*``, ``?``:
something must match) or stops at a ``<placeholder>`` (its folder must exist). A
``../``-prefixed path is resolved against the citing file's folder. Prose such as
"tests/benchmarks" (no suffix, no trailing slash) is not taken for a path.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()

# Top-level folders whose paths are checked. The old top-level kernel folder is listed so
# that citations of it are caught: it moved under cupydcn/cuda/.
TOP_LEVEL = ("cupydcn", "tests", "benchmarks", "docs", "examples", ".ci", "kernels")
STALE_TOP_LEVEL = {"kernels"}

_PATH = re.compile(
    r"(?<![\w./-])"  # not inside a longer word, path or URL
    r"(?P<up>(?:\.\./)*)"
    r"(?P<path>(?:" + "|".join(re.escape(t) for t in TOP_LEVEL) + r")/[\w./*?-]*)"
)
_SUFFIX = re.compile(r"\.[A-Za-z0-9]+$")

# Spelled in pieces so that this file does not cite them itself.
_FORBIDDEN = {
    "SEMANTICS" + ".md": "the contract is docs/semantics.md (lower case, under docs/)",
    ".." + "/shared": "a path outside the repository",
}
_BARE_SEMANTICS = re.compile(r"(?<![\w./-])semantics\.md")

_SKIP_DIRS = {"__pycache__", "build", "dist", "node_modules", "site-packages"}
_TEXT_LIMIT = 2_000_000  # bytes; larger files are data, not citations


def _in_git_checkout() -> bool:
    if not (ROOT / ".git").exists():
        return False
    try:
        subprocess.run(["git", "--version"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


IN_GIT = _in_git_checkout()


def _git_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [ROOT / name for name in out.split("\0") if name]


def _walked_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [
            d
            for d in dirs
            if d not in _SKIP_DIRS
            and not d.endswith(".egg-info")
            and (not d.startswith(".") or d == ".ci")
            and not (Path(folder, d) / "pyvenv.cfg").exists()
        ]
        files.extend(Path(folder, name) for name in names)
    return files


def _text_files() -> list[Path]:
    files = _git_files() if IN_GIT else _walked_files()
    texts = []
    for path in sorted(set(files)):
        if path.resolve() == THIS_FILE or not path.is_file() or path.is_symlink():
            continue
        if path.stat().st_size > _TEXT_LIMIT:
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (an image, a wheel)
        texts.append(path)
    return texts


TEXT_FILES = _text_files()


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _lines(path: Path):
    return enumerate(path.read_text(encoding="utf-8").splitlines(), 1)


def _exists(base: Path, cited: str, following: str) -> bool:
    """Whether the cited path (as matched, trailing punctuation removed) names something."""
    if following == "<":  # a placeholder follows: its folder must exist
        folder = cited.rpartition("/")[0]
        return (base / folder).is_dir()
    if "*" in cited or "?" in cited:
        return next(base.glob(cited.rstrip("/")), None) is not None
    return (base / cited).exists()


def _is_path(cited: str, following: str) -> bool:
    last = cited.rstrip("/").rpartition("/")[2]
    return (
        cited.endswith("/")
        or "*" in cited
        or "?" in cited
        or following == "<"
        or bool(_SUFFIX.search(last))
    )


def stale_citations(path: Path) -> list[str]:
    """``file:line: cited path`` for each cited repository path in ``path`` that is missing."""
    problems = []
    for number, line in _lines(path):
        for match in _PATH.finditer(line):
            cited = match.group("path").rstrip(".")
            following = line[match.end("path") : match.end("path") + 1]
            if not _is_path(cited, following):
                continue
            up = match.group("up")
            base = (path.parent / up).resolve() if up else ROOT
            top = cited.split("/", 1)[0]
            if top in STALE_TOP_LEVEL and not up:
                problems.append(f"{_rel(path)}:{number}: {cited} (moved to cupydcn/cuda/{cited})")
                continue
            if not IN_GIT and not up and not (ROOT / top).is_dir():
                continue  # an sdist leaves out benchmarks/, examples/, .ci/: cannot tell
            if not _exists(base, cited, following):
                problems.append(f"{_rel(path)}:{number}: {up}{cited}")
    return problems


def test_files_were_found():
    names = {_rel(p) for p in TEXT_FILES}
    assert "README.md" in names and "pyproject.toml" in names, sorted(names)[:20]
    assert any(name.startswith("cupydcn/cuda/kernels/") for name in names)


def test_cited_repository_paths_exist():
    problems = [problem for path in TEXT_FILES for problem in stale_citations(path)]
    assert not problems, "paths cited that do not exist:\n" + "\n".join(problems)


def test_no_forbidden_names():
    problems = []
    for path in TEXT_FILES:
        for number, line in _lines(path):
            for text, why in _FORBIDDEN.items():
                if text in line:
                    problems.append(f"{_rel(path)}:{number}: {text!r}: {why}")
    assert not problems, "\n".join(problems)


def test_the_contract_is_cited_by_its_path():
    """Outside docs/, the contract is cited as docs/semantics.md, never by its bare name."""
    problems = []
    for path in TEXT_FILES:
        if _rel(path).startswith("docs/"):
            continue
        for number, line in _lines(path):
            if _BARE_SEMANTICS.search(line):
                problems.append(f"{_rel(path)}:{number}: {line.strip()[:100]}")
    assert not problems, "cite docs/semantics.md by its path:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("see cupydcn/cuda/kernels/deform_conv.cu.", ["cupydcn/cuda/kernels/deform_conv.cu"]),
        ("`tests/test_*.py` and docs/", ["tests/test_*.py", "docs/"]),
        ("benchmarks/results/<date>_<gpu>.json", ["benchmarks/results/"]),
        ("https://example.org/x/docs/a.md, mycupydcn/a.py", []),
        ("the unit tests/benchmarks split", []),
    ],
)
def test_path_pattern(line, expected):
    found = []
    for match in _PATH.finditer(line):
        cited = match.group("path").rstrip(".")
        following = line[match.end("path") : match.end("path") + 1]
        if _is_path(cited, following):
            found.append(cited)
    assert found == expected
