#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels that a lent GPU machine lacks (it has
# no network) into .whl/ at the repository root (ignored by git; it travels with the tree
# when the run names it in carry). benchmarks/gpu_session.sh installs from there only the
# distributions the machine does not have.
#
#   bash benchmarks/gpu_session_wheels.sh                 # array-api-compat (cupydcn's one
#                                                         # dependency the machine lacks)
#   bash benchmarks/gpu_session_wheels.sh NAME==VERSION ...
#   bash benchmarks/gpu_session_wheels.sh --dry-run ...   # print the pip command only
#
# Wheels for CPython 3.12 on x86-64 manylinux (the lent machine's python3), without their
# dependencies (--no-deps): name each missing one too. Keep one version per distribution.
# Environment: PYTHON (python3), GPU_SESSION_WHEELS (the folder), GPU_SESSION_WHEEL_PYTHON
# (3.12).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
DEST=${GPU_SESSION_WHEELS:-$ROOT/.whl}
PYVER=${GPU_SESSION_WHEEL_PYTHON:-3.12}
DRY=0
if [ "${1:-}" = --dry-run ]; then
  DRY=1
  shift
fi
if (($# == 0)); then
  # The version installed here, so the lent machine runs what the tests ran here.
  version=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("array-api-compat"))' 2>/dev/null || true)
  set -- "array-api-compat${version:+==$version}"
fi

command=("$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER"
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  -d "$DEST" "$@")
if ((DRY)); then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi

if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 && ! git -C "$ROOT" check-ignore -q "$DEST/x.whl"; then
  echo "note: $DEST is not ignored by git; add '/.whl/' to .gitignore or .git/info/exclude" >&2
fi
mkdir -p "$DEST"
"${command[@]}"

# One version per distribution: pip refuses to install two.
dupes=$(for wheel in "$DEST"/*.whl; do basename "$wheel" | cut -d- -f1 | tr 'A-Z.-' 'a-z__'; done | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one wheel of: $dupes (remove all but one version of each)" >&2
  exit 1
fi
ls -l "$DEST"
total=$(du -sk "$DEST" | cut -f1)
echo "$((total / 1024)) MiB in $DEST (the whole tree that travels to a lent machine must stay under 64 MiB)"
