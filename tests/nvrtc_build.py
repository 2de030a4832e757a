"""A small ctypes binding of the NVRTC C API that can hold several NVRTC versions at once.

The NVRTC build test compiles every kernel for every target architecture without a GPU
(NVRTC needs no driver). One NVRTC cannot build them all: CUDA 13 dropped sm_70, so sm_70
is built with the CUDA 12 NVRTC and the rest with the newest NVRTC installed. The two
libraries have different sonames and versioned symbols, so both load into one process.

Where they are looked for (Linux), in this order, first found per major version:

* CUDA 13: the ``nvidia-cuda-nvrtc`` wheel, ``site-packages/nvidia/cu13/lib/libnvrtc.so.13``,
  with the headers of ``nvidia-cuda-runtime`` in ``site-packages/nvidia/cu13/include``;
* CUDA 12: the ``nvidia-cuda-nvrtc-cu12`` wheel, ``site-packages/nvidia/cuda_nvrtc/lib/
  libnvrtc.so.12``, with the headers of ``nvidia-cuda-runtime-cu12`` in
  ``site-packages/nvidia/cuda_runtime/include``;
* a CUDA toolkit in ``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda`` (``lib64/`` and
  ``include/``).

Only what the tests need is bound: version and supported architectures, program creation
with name expressions, compilation, the log, the cubin and lowered names. ``-Xptxas=-v``
is always passed, and its report is parsed into per-kernel resource usage.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import site
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NVRTC_SUCCESS = 0

# (library, include directory) relative to a site-packages directory, per major version.
_WHEEL_LAYOUTS: dict[int, tuple[str, str, str]] = {
    # major: (library, include directory, pip packages that provide them)
    13: (
        "nvidia/cu13/lib/libnvrtc.so.13",
        "nvidia/cu13/include",
        "nvidia-cuda-nvrtc nvidia-cuda-runtime",
    ),
    12: (
        "nvidia/cuda_nvrtc/lib/libnvrtc.so.12",
        "nvidia/cuda_runtime/include",
        "nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12",
    ),
}

# The header every kernel source includes; an include directory without it is not one.
_PROBE_HEADER = "cuda_fp16.h"


class NvrtcNotFound(RuntimeError):
    """No usable NVRTC library (with matching headers) was found."""


class NvrtcError(RuntimeError):
    """An NVRTC API call failed."""


class NvrtcCompileError(NvrtcError):
    """Compilation failed; ``log`` holds NVRTC's program log."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n--- NVRTC log ---\n{log.rstrip()}")
        self.log = log


@dataclass(frozen=True)
class KernelResources:
    """What ``ptxas -v`` reported for one function (all sizes in bytes)."""

    registers: int | None = None  # None for a non-entry function (no "Used N registers")
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


@dataclass(frozen=True)
class CompileResult:
    arch: int
    nvrtc_version: tuple[int, int]
    cubin: bytes
    lowered_names: dict[str, str]  # name expression -> mangled (lowered) name
    resources: dict[str, KernelResources]  # mangled name -> ptxas report
    log: str
    options: tuple[str, ...] = field(default=())

    def resources_of(self, name_expression: str) -> KernelResources:
        """The ptxas report of one name expression's kernel (KeyError if none)."""
        return self.resources[self.lowered_names[name_expression]]

    def warnings(self) -> list[str]:
        """Log lines that are warnings (NVRTC front end or ptxas)."""
        return [line for line in self.log.splitlines() if re.search(r"\bwarning\b", line, re.I)]


_COMPILING = re.compile(r"Compiling entry function '([^']+)' for '(?:sm|compute)_\d+\w*'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


def parse_ptxas_report(log: str) -> dict[str, KernelResources]:
    """Per-function resources from a ``-Xptxas=-v`` log, keyed by mangled name.

    ptxas prints, per entry function::

        ptxas info    : Compiling entry function '<name>' for 'sm_90'
        ptxas info    : Function properties for <name>
        ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 40 registers, used 0 barriers, ...

    and a "Function properties" block (without "Used") for each non-inlined callee.
    """
    found: dict[str, dict[str, int]] = {}
    entry = props = None
    for line in log.splitlines():
        if m := _COMPILING.search(line):
            entry = m.group(1)
            found.setdefault(entry, {})
        elif m := _PROPERTIES.search(line):
            props = m.group(1)
            found.setdefault(props, {})
        elif (m := _FRAME.search(line)) and props is not None:
            found[props].update(
                stack_frame=int(m.group(1)),
                spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)),
            )
        elif (m := _USED.search(line)) and entry is not None:
            found[entry]["registers"] = int(m.group(1))
    return {name: KernelResources(**values) for name, values in found.items()}


def _arch_number(arch: int | str) -> int:
    """90 from 90, "90", "sm_90" or "compute_90"."""
    if isinstance(arch, int):
        return arch
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)", arch.strip())
    if not m:
        raise ValueError(f"not a CUDA architecture: {arch!r}")
    return int(m.group(1))


class Nvrtc:
    """One loaded NVRTC library and the CUDA headers that belong to it."""

    def __init__(self, library: Path, include_dir: Path | None):
        self.library = Path(library)
        self.include_dir = Path(include_dir) if include_dir is not None else None
        lib = ctypes.CDLL(str(self.library))  # RTLD_LOCAL: symbols looked up per handle
        self._lib = lib
        c_int_p = ctypes.POINTER(ctypes.c_int)
        c_size_p = ctypes.POINTER(ctypes.c_size_t)
        prog = ctypes.c_void_p
        signatures = {
            "nvrtcGetErrorString": (ctypes.c_char_p, [ctypes.c_int]),
            "nvrtcVersion": (ctypes.c_int, [c_int_p, c_int_p]),
            "nvrtcGetNumSupportedArchs": (ctypes.c_int, [c_int_p]),
            "nvrtcGetSupportedArchs": (ctypes.c_int, [c_int_p]),
            "nvrtcCreateProgram": (
                ctypes.c_int,
                [
                    ctypes.POINTER(prog),
                    ctypes.c_char_p,
                    ctypes.c_char_p,
                    ctypes.c_int,
                    ctypes.POINTER(ctypes.c_char_p),
                    ctypes.POINTER(ctypes.c_char_p),
                ],
            ),
            "nvrtcDestroyProgram": (ctypes.c_int, [ctypes.POINTER(prog)]),
            "nvrtcAddNameExpression": (ctypes.c_int, [prog, ctypes.c_char_p]),
            "nvrtcCompileProgram": (
                ctypes.c_int,
                [
                    prog,
                    ctypes.c_int,
                    ctypes.POINTER(ctypes.c_char_p),
                ],
            ),
            "nvrtcGetProgramLogSize": (ctypes.c_int, [prog, c_size_p]),
            "nvrtcGetProgramLog": (ctypes.c_int, [prog, ctypes.c_char_p]),
            "nvrtcGetCUBINSize": (ctypes.c_int, [prog, c_size_p]),
            "nvrtcGetCUBIN": (ctypes.c_int, [prog, ctypes.c_char_p]),
            "nvrtcGetLoweredName": (
                ctypes.c_int,
                [
                    prog,
                    ctypes.c_char_p,
                    ctypes.POINTER(ctypes.c_char_p),
                ],
            ),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes

        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version: tuple[int, int] = (major.value, minor.value)
        count = ctypes.c_int()
        self._check(lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * count.value)()
        self._check(lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        self.supported_archs: tuple[int, ...] = tuple(archs)

    def __repr__(self) -> str:
        return f"Nvrtc({self.version[0]}.{self.version[1]}, {self.library})"

    def _check(self, status: int, what: str) -> None:
        if status != NVRTC_SUCCESS:
            message = self._lib.nvrtcGetErrorString(status)
            raise NvrtcError(f"{what} failed: {message.decode() if message else status}")

    def supports(self, arch: int | str) -> bool:
        return _arch_number(arch) in self.supported_archs

    def _log(self, prog: ctypes.c_void_p) -> str:
        size = ctypes.c_size_t()
        self._check(
            self._lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize"
        )
        buf = ctypes.create_string_buffer(max(size.value, 1))
        self._check(self._lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
        return buf.value.decode(errors="replace")

    def compile(
        self,
        source: str,
        name_expressions: Sequence[str],
        arch: int | str,
        options: Iterable[str] = (),
        program_name: str = "kernel.cu",
    ) -> CompileResult:
        """Compile ``source`` to a cubin for ``sm_<arch>``.

        Adds ``--gpu-architecture=sm_<arch>``, ``-Xptxas=-v`` (unless given) and this
        NVRTC's include directory to ``options``. Raises :class:`NvrtcCompileError` with
        the program log when compilation fails.
        """
        number = _arch_number(arch)
        if not self.supports(number):
            raise NvrtcError(
                f"NVRTC {self.version} does not support sm_{number} "
                f"(it supports {self.supported_archs})"
            )
        opts = [*options, f"--gpu-architecture=sm_{number}"]
        if not any(o in ("-Xptxas=-v", "--ptxas-options=-v") for o in opts):
            opts.append("-Xptxas=-v")
        if self.include_dir is not None:
            opts.append(f"--include-path={self.include_dir}")
        lib = self._lib
        prog = ctypes.c_void_p()
        self._check(
            lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), program_name.encode(), 0, None, None
            ),
            "nvrtcCreateProgram",
        )
        try:
            for expression in name_expressions:
                self._check(
                    lib.nvrtcAddNameExpression(prog, expression.encode()),
                    f"nvrtcAddNameExpression({expression})",
                )
            encoded = [o.encode() for o in opts]
            status = lib.nvrtcCompileProgram(
                prog, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded)
            )
            log = self._log(prog)
            if status != NVRTC_SUCCESS:
                message = lib.nvrtcGetErrorString(status).decode()
                raise NvrtcCompileError(
                    f"NVRTC {self.version[0]}.{self.version[1]} failed to compile "
                    f"{program_name} for sm_{number} ({message}); options: {' '.join(opts)}",
                    log,
                )
            lowered: dict[str, str] = {}
            for expression in name_expressions:
                name = ctypes.c_char_p()
                self._check(
                    lib.nvrtcGetLoweredName(prog, expression.encode(), ctypes.byref(name)),
                    f"nvrtcGetLoweredName({expression})",
                )
                lowered[expression] = name.value.decode()  # copied before the program goes
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return CompileResult(
                arch=number,
                nvrtc_version=self.version,
                cubin=cubin.raw,
                lowered_names=lowered,
                resources=parse_ptxas_report(log),
                log=log,
                options=tuple(opts),
            )
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _site_dirs() -> Iterator[Path]:
    seen: set[Path] = set()
    candidates = [*sys.path]
    try:
        candidates += site.getsitepackages()
    except AttributeError:  # some virtualenv flavours lack it
        pass
    candidates.append(site.getusersitepackages())
    for entry in candidates:
        path = Path(entry or ".").resolve()
        if path not in seen and path.is_dir():
            seen.add(path)
            yield path


def _toolkit_candidates() -> Iterator[tuple[Path, Path]]:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        for lib in sorted(Path(root, "lib64").glob("libnvrtc.so.*[0-9]")):
            if re.fullmatch(r"libnvrtc\.so\.\d+", lib.name):
                yield lib, Path(root, "include")


def _candidates() -> Iterator[tuple[int, Path, Path]]:
    """(expected major, library, include directory), wheels first."""
    for directory in _site_dirs():
        for major, (lib, include, _) in _WHEEL_LAYOUTS.items():
            if (directory / lib).is_file():
                yield major, directory / lib, directory / include
    for lib, include in _toolkit_candidates():
        yield int(lib.name.rsplit(".", 1)[1]), lib, include


@functools.cache
def installed() -> dict[int, Nvrtc]:
    """Every usable NVRTC found, by major version (first found per major)."""
    found: dict[int, Nvrtc] = {}
    for major, lib, include in _candidates():
        if major in found or not (include / _PROBE_HEADER).is_file():
            continue
        try:
            nvrtc = Nvrtc(lib, include)
        except OSError:  # a broken or foreign library: not usable
            continue
        found.setdefault(nvrtc.version[0], nvrtc)
    return dict(sorted(found.items()))


def missing_message(major: int) -> str:
    """Why NVRTC ``major`` is unavailable and how to install it."""
    lib, include, packages = _WHEEL_LAYOUTS.get(major, ("libnvrtc", "include", "a CUDA toolkit"))
    return (
        f"no NVRTC {major} with headers found (looked for site-packages/{lib} and "
        f"site-packages/{include}/{_PROBE_HEADER}, then $CUDA_HOME, $CUDA_PATH, "
        f"/usr/local/cuda); install: pip install {packages}"
    )


def nvrtc_for_arch(arch: int | str) -> Nvrtc:
    """The newest installed NVRTC that can build ``sm_<arch>``."""
    number = _arch_number(arch)
    for major in sorted(installed(), reverse=True):
        if installed()[major].supports(number):
            return installed()[major]
    have = (
        ", ".join(
            f"{n.version[0]}.{n.version[1]}: {n.supported_archs}" for n in installed().values()
        )
        or "none"
    )
    raise NvrtcNotFound(
        f"no installed NVRTC supports sm_{number} (installed: {have}); "
        + "; ".join(missing_message(m) for m in _WHEEL_LAYOUTS if m not in installed())
    )


def compile(
    source: str,
    name_expressions: Sequence[str],
    arch: int | str,
    options: Iterable[str] = (),
    program_name: str = "kernel.cu",
) -> CompileResult:
    """Compile with the newest installed NVRTC that supports ``arch`` (see
    :meth:`Nvrtc.compile`)."""
    return nvrtc_for_arch(arch).compile(source, name_expressions, arch, options, program_name)
