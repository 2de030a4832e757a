"""The "auto" algorithm of deform_conv2d on CUDA: the candidates that apply, timed once per
problem on the device, the fastest remembered.

Like cuDNN's benchmark mode: the first call of a problem (device, pass, shapes, options,
dtype, the gradients asked for) runs every applicable algorithm on the call's own arrays,
timed with CUDA events by the launcher's ``time_call``, and later calls of the same problem
take the fastest at once. Choices live in memory for the process and, when
``CUPYDCN_AUTOTUNE_CACHE`` names a JSON file, on disk across processes (keyed also by the
device's name and cupydcn's version). A launcher without ``time_call`` (the CPU emulator,
the null launcher) gets the heuristic choice, which is also what ``"heuristic"`` asks for
everywhere: the first applicable algorithm of :data:`PREFERENCE`, with no timing, so the
same inputs always take the same kernels (for users who need a reproducible choice).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

# Heuristic order: the first that applies wins.
PREFERENCE: tuple[str, ...] = ("fused", "depthwise", "im2col")

_CHOICES: dict[str, str] = {}
_LOCK = threading.Lock()


def problem_key(*parts: object) -> str:
    """One string naming a problem (its parts in order), the key of the caches."""
    return "|".join(map(str, parts))


def heuristic_choice(candidates: Sequence[str]) -> str:
    """The first of ``candidates`` in :data:`PREFERENCE` order."""
    return min(candidates, key=PREFERENCE.index)


def _disk_path() -> Path | None:
    configured = os.environ.get("CUPYDCN_AUTOTUNE_CACHE")
    return Path(configured) if configured else None


def _read_disk(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and v in PREFERENCE}


def _write_disk(path: Path, key: str, choice: str) -> None:
    """Adds one entry, atomically (a concurrent writer's entries are kept when they were
    written before this read)."""
    entries = _read_disk(path)
    entries[key] = choice
    partial = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(entries, indent=0, sort_keys=True))
        os.replace(partial, path)
    except OSError:  # a cache that cannot be written is only a missed speed-up
        partial.unlink(missing_ok=True)


def choose(
    launcher: object,
    key: str,
    candidates: Sequence[str],
    run: Callable[[str], object],
) -> str:
    """The algorithm for problem ``key`` among ``candidates`` (applicable ones, at least
    one): remembered, else timed with ``launcher.time_call(lambda: run(candidate))`` for
    each, else (no timer) :func:`heuristic_choice`."""
    if len(candidates) == 1:
        return candidates[0]
    with _LOCK:
        if key in _CHOICES:
            return _CHOICES[key]
    path = _disk_path()
    if path is not None:
        remembered = _read_disk(path).get(key)
        if remembered in candidates:
            with _LOCK:
                _CHOICES[key] = remembered
            return remembered
    timer = getattr(launcher, "time_call", None)
    if timer is None:
        return heuristic_choice(candidates)
    times = {c: float(timer(lambda c=c: run(c))) for c in candidates}
    choice = min(candidates, key=lambda c: (times[c], PREFERENCE.index(c)))
    with _LOCK:
        _CHOICES[key] = choice
    if path is not None:
        _write_disk(path, key, choice)
    return choice


def remembered_choices() -> dict[str, str]:
    """The choices made so far in this process (a copy), by problem key."""
    with _LOCK:
        return dict(_CHOICES)


def forget_choices() -> None:
    """Empties the in-memory choices (the disk cache is left alone)."""
    with _LOCK:
        _CHOICES.clear()
