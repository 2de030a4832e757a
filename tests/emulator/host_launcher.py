"""A :class:`~cupydcn.cuda.launch.KernelLauncher` that runs the real CUDA kernels on the CPU.

How it works: for each (kernel source file, dtype, index width, template arguments) it
builds one shared library from a C++17 translation unit = ``cuda_shim.h`` +
``module_source(file)`` (the very text NVRTC compiles) + one generated ``extern "C"`` entry
point per name expression of that file. Each entry point hands the kernel's function
pointer, the (x, y, z) grid and block and a ``void** args`` array (the ``cudaLaunchKernel``
convention) to the variadic ``cupydcn_emulation::launch`` of the shim, which unpacks the
arguments with an index sequence and runs the blocks one after another with the
thread-local ``blockIdx`` / ``threadIdx`` set. A launch without ``grid`` / ``block`` is the
1-D grid-stride configuration of ``cupydcn.cuda.launch.launch_config``, as on the GPU.
Libraries are memoised in-process and cached on disk (keyed by a hash of the translation
unit, the compiler flags and the compiler's version).

Block-cooperative kernels: a source file whose text (comments aside) uses ``__shared__``,
``__syncthreads``, a warp shuffle, vote, match or reduce intrinsic or ``__activemask``
(:func:`is_cooperative`) runs each block's threads as fibers that meet at barriers and warp
collectives; any other file keeps the plain sequential calls. Misuse (a barrier some thread
skips, a warp collective whose mask names a lane that exited or waits elsewhere...) is an
:class:`EmulatorFaultError` naming the kernel, block, thread and source line. The fibers are
resumed in the launcher's order (forward, ``reverse``, ``shuffle``) after every barrier, so
:func:`assert_order_independent` exposes a missing barrier. cuda_shim.h describes the model.

Each entry point also reports the kernel's parameter types, which must be those of
``KERNEL_PARAMETERS`` (``cupydcn.cuda.kernel_source``), and every launch checks its
arguments against them: the count, each array's dtype, C-contiguity and writability, no aliasing of a
written array with another argument (the kernels' pointers are ``__restrict__``), and
every int against the index type's range.

Checked mode (the default; ``CUPYDCN_EMULATOR_CHECKED=0`` turns it off) isolates every
array argument in its own mapping for the launch: the bytes end exactly at a
``PROT_NONE`` guard page, and the slack before them, from the preceding guard page, is
filled with 0xFF (a NaN in every float dtype) and checked afterwards. A read or write past
the end of what the kernel was given faults at once and is reported as a Python
exception naming the kernel, the argument and the element; a write before the start is
caught by the canary, a read before it yields NaN; const arguments are verified
unchanged. Checked mode also makes ``xp.empty`` return NaN-filled float arrays, so an
output element a kernel forgets to write shows up as NaN, and refuses a GEMM whose output
overlaps an operand.

GEMMs (``HostLauncher.gemm``) are ``cupydcn.cuda.launch.gemm_reference`` with NumPy.

For kernel authors' tests:

* :class:`AdHocKernels`: test-only kernels from any self-contained ``.cu`` file (not in the
  ``kernel_source`` tables), by name expression, launched with a launcher's checks.
* :func:`assert_order_independent`: runs a launch (a callable of a launcher) in forward,
  reverse and shuffled orders and requires bitwise-equal results.

Sanitizers (``CUPYDCN_EMULATOR_SANITIZE`` or ``HostLauncher(sanitize=...)``): ``undefined``
builds with UBSan (signed overflow, float->int conversion overflow, misaligned access...)
and turns its reports, read from stderr around the launch, into exceptions. ``address``
needs the ASan runtime preloaded into Python, so it is opt-in and off in CI::

    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
    CUPYDCN_EMULATOR_SANITIZE=address,undefined CUPYDCN_EMULATOR_CHECKED=0 \
    python -m pytest -m emulated

(ASan then aborts the process with its report; it bounds whole NumPy allocations, where
checked mode bounds each view a kernel is given.) Compiler errors and sanitizer reports
name the ``cupydcn/cuda/kernels/`` file and line: the kernel text carries ``#line`` directives.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import operator
import os
import re
import shlex
import subprocess
import tempfile
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cupydcn.cuda.kernel_source import (
    KERNEL_TEMPLATES,
    SOURCE_OF_KERNEL,
    check_template_args,
    kernel_dir,
    kernel_parameters,
    module_source,
    name_expression,
)
from cupydcn.cuda.kernel_source import specialisations as specialisations_of
from cupydcn.cuda.launch import (
    GemmCall,
    check_gemm_operands,
    check_launch_shape,
    gemm_reference,
    launch_config,
    report_gemm,
    report_launch,
)

SHIM_PATH = Path(__file__).resolve().with_name("cuda_shim.h")

BASE_FLAGS: tuple[str, ...] = ("-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off")
SANITIZER_FLAGS: dict[str, tuple[str, ...]] = {
    "undefined": (
        "-fsanitize=undefined",
        "-fsanitize=float-cast-overflow",
        "-fno-omit-frame-pointer",
        "-g",
    ),
    "address": ("-fsanitize=address", "-fno-omit-frame-pointer", "-g"),
}

# Flags and results of cupydcn_emulation::launch (cuda_shim.h).
_GUARD_FAULTS = 1
_REVERSE_ORDER = 2
_SHUFFLE_ORDER = 4
_COOPERATIVE = 8
_SEED_SHIFT = 8
_MISUSE = -1
_MESSAGE_BYTES = 4096

_INT_RANGES = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint32": (0, 2**32 - 1),
}
_INT_CTYPES = {"int32": ctypes.c_int32, "int64": ctypes.c_int64, "uint32": ctypes.c_uint32}


class EmulatorBuildError(RuntimeError):
    """The host compiler rejected a translation unit; ``output`` has its messages."""

    def __init__(self, message: str, output: str, source_path: Path):
        super().__init__(f"{message}\n{output}")
        self.output = output
        self.source_path = source_path


class EmulatorFaultError(RuntimeError):
    """An emulated kernel touched memory outside its arguments, misused a barrier or a warp
    collective, or UBSan reported."""


# ------------------------------------------------------------------ building


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CUPYDCN_EMULATOR_CXX") or os.environ.get("CXX") or "g++")


@functools.cache
def _compiler_version(compiler: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(first line of ``--version``, None) or (None, why the compiler cannot be run)."""
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, text=True)
    except OSError as exc:
        return None, f"no host C++ compiler for the CUDA emulation ({' '.join(compiler)}: {exc})"
    if done.returncode != 0:
        return None, (
            f"the host C++ compiler {' '.join(compiler)!r} does not run: {done.stderr.strip()}"
        )
    return (done.stdout.splitlines() or [" ".join(compiler)])[0], None


def compiler_missing() -> str | None:
    """Why the host compiler (``CUPYDCN_EMULATOR_CXX``, ``CXX`` or g++) cannot build the
    harness, or None when it can."""
    return _compiler_version(tuple(_compiler()))[1]


def cache_dir() -> Path:
    """Where built libraries are kept across runs (``CUPYDCN_EMULATOR_CACHE`` overrides)."""
    configured = os.environ.get("CUPYDCN_EMULATOR_CACHE")
    path = (
        Path(configured)
        if configured
        else (Path(tempfile.gettempdir()) / f"cupydcn-emulator-{os.getuid()}")
    )
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():  # never load libraries someone else could plant
        raise PermissionError(
            f"the emulator cache {path} belongs to another user; set CUPYDCN_EMULATOR_CACHE"
        )
    return path


_LIBRARIES: dict[str, ctypes.CDLL] = {}
_BUILD_LOCKS: dict[str, threading.Lock] = {}  # one per library: different ones build in parallel
_BUILD_LOCKS_LOCK = threading.Lock()


def build_library(
    source: str, flags: Sequence[str] = BASE_FLAGS, *, what: str = "a translation unit"
) -> ctypes.CDLL:
    """Compile ``source`` (C++) into a shared library and load it; memoised in-process
    and on disk by a hash of the text, the flags and the compiler."""
    compiler = tuple(_compiler())
    version, missing = _compiler_version(compiler)
    if missing is not None:
        raise EmulatorBuildError(f"cannot build {what}", missing, Path())
    key = hashlib.sha256("\0".join([version, *compiler, *flags, source]).encode()).hexdigest()[:32]
    with _BUILD_LOCKS_LOCK:
        lock = _BUILD_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key in _LIBRARIES:
            return _LIBRARIES[key]
        directory = cache_dir()
        library = directory / f"{key}.so"
        source_path = directory / f"{key}.cpp"
        if not library.exists():
            source_path.write_text(source)
            partial = directory / f"{key}.{os.getpid()}.{threading.get_ident()}.tmp.so"
            command = [*compiler, *flags, "-o", str(partial), str(source_path)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                partial.unlink(missing_ok=True)
                raise EmulatorBuildError(
                    f"host compilation of {what} failed (exit {done.returncode}); source "
                    f"kept at {source_path}\n$ {shlex.join(command)}",
                    done.stderr + done.stdout,
                    source_path,
                )
            os.replace(partial, library)
        loaded = ctypes.CDLL(str(library))
        _LIBRARIES[key] = loaded
        return loaded


_SHIM_INCLUDE = re.compile(r'^#include "([^"/]+)"$', re.MULTILINE)


def shim_text() -> str:
    """cuda_shim.h, to be the first part of a translation unit, with the shim headers it
    includes by a quoted name (tensor_core_shim.h) inlined: the unit is compiled from the
    cache directory, where an include would not be found, and the inlined text keys the
    build cache."""
    text = SHIM_PATH.read_text().replace("#pragma once", "", 1)

    def inline(match: re.Match) -> str:
        path = SHIM_PATH.with_name(match.group(1))
        after = text.count("\n", 0, match.end()) + 2  # the shim's line after the include
        body = path.read_text().replace("#pragma once", "", 1)
        return f'#line 1 "{path}"\n{body}\n#line {after} "{SHIM_PATH}"'

    text = _SHIM_INCLUDE.sub(inline, text)
    return f'#line 1 "{SHIM_PATH}"\n{text}\n'


def _entry_symbol(kernel: str) -> str:
    return f"cupydcn_launch_{kernel}"


_MARKER = re.compile(r"^// ---- (begin|end) (.+)$")


def with_line_directives(source_file: str) -> str:
    """``module_source(source_file)`` with ``#line`` directives added, so compiler errors
    and sanitizer reports name the ``cupydcn/cuda/kernels/`` file and line a statement came from. The
    code lines are untouched: each is matched, in order, to its line in the file it came
    from (module_source only drops ``#pragma once`` and replaces ``#include`` lines by
    begin/end-marked file contents). No directive goes inside a macro continued with a
    backslash."""
    directory = kernel_dir()
    stack: list[list] = []
    current = [directory / source_file, (directory / source_file).read_text().splitlines(), 0]
    in_sync = False  # the compiler's idea of the current file/line matches `current`
    out: list[str] = []
    for line in module_source(source_file).splitlines():
        marker = _MARKER.match(line)
        if marker:
            if marker.group(1) == "begin":
                stack.append(current)
                path = current[0].parent / marker.group(2)
                current = [path, path.read_text().splitlines(), 0]
            elif stack:
                current = stack.pop()
            out.append(line)
            in_sync = False
            continue
        path, lines, start = current
        if not line.strip():  # blank: keep in step only if the file has a blank line here
            in_sync = in_sync and start < len(lines) and not lines[start].strip()
            current[2] += in_sync
            out.append(line)
            continue
        found = next((j for j in range(start, len(lines)) if lines[j] == line), None)
        if found is None:  # cannot place it: leave the compiler's count alone
            out.append(line)
            in_sync = False
            continue
        continued = bool(out) and out[-1].endswith("\\")  # inside a multi-line macro
        placed = in_sync and found == start
        if not placed and not continued:
            out.append(f'#line {found + 1} "{path}"')
        out.append(line)
        current[2] = found + 1
        in_sync = placed or not continued
    return "\n".join(out) + "\n"


_GENERATED = '#line 1 "(cupydcn emulator: generated entry points)"\n'
# Around the kernel text: its symbols stay in its library (cuda_shim.h says why).
_HIDDEN = "#pragma GCC visibility push(hidden)\n"
_VISIBLE = "\n#pragma GCC visibility pop\n"


def _entry_points(symbol: str, expression: str) -> str:
    """C++ of the two entry points of one kernel: ``symbol`` (launch) and
    ``symbol_signature`` (its parameter types)."""
    return (
        f'extern "C" int {symbol}(const unsigned* grid, const unsigned* block, void** args,\n'
        f"                        int flags, void** fault_address, char* message,\n"
        f"                        unsigned message_size) {{\n"
        f"  return cupydcn_emulation::launch(&{expression}, grid, block, args, flags,\n"
        f"                                   fault_address, message, message_size);\n"
        f"}}\n"
        f'extern "C" const char* {symbol}_signature() {{\n'
        f"  static const std::string s = cupydcn_emulation::signature(&{expression});\n"
        f"  return s.c_str();\n"
        f"}}\n"
    )


def translation_unit(
    source_file: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...] = ()
) -> str:
    """shim + module_source(source_file) (with #line directives) + an entry point per
    kernel of the file, for one dtype, index width and specialisation (``template_args``)."""
    refuse_dynamic_shared_memory(module_source(source_file), source_file)
    parts = [shim_text(), _HIDDEN, with_line_directives(source_file), _VISIBLE, _GENERATED]
    for kernel in KERNEL_TEMPLATES[source_file]:
        expression = name_expression(kernel, dtype_name, index_bits, template_args)
        parts.append(_entry_points(_entry_symbol(kernel), expression))
    return "".join(parts)


_COOPERATIVE_BUILTINS = re.compile(
    r"__syncthreads|__syncwarp|__shfl|__ballot|__any_sync|__all_sync|__activemask|__match_any"
    r"|__match_all|__reduce_|__shared__|mma_m16n8k|ldmatrix_|cp_async_"
)
_COMMENTS = re.compile(r"//[^\n]*|/\*.*?\*/", re.DOTALL)


_DYNAMIC_SHARED = re.compile(r"\bextern\s+__shared__")


def refuse_dynamic_shared_memory(source: str, what: str) -> None:
    """An ``EmulatorBuildError`` when ``source`` declares ``extern __shared__`` memory: its
    size would come with the launch, and the launcher protocol has none (g++ alone would
    only say 'conflicting specifiers')."""
    match = _DYNAMIC_SHARED.search(_COMMENTS.sub("", source))
    if match is not None:
        line = source[: match.start()].count("\n") + 1
        raise EmulatorBuildError(
            f"{what}: extern __shared__ (dynamic shared memory) is not supported by the CUDA "
            "emulator: the launcher protocol has no dynamic shared-memory size; declare the "
            "__shared__ array with a compile-time size",
            f"near line {line} of the module source",
            Path(),
        )


def is_cooperative(source: str) -> bool:
    """Whether kernel source text uses a block-cooperative built-in (shared memory, a
    barrier, a warp collective) outside comments. The kernels of such a file run with each
    block's threads as fibers (cuda_shim.h); the others as plain calls one after another."""
    return _COOPERATIVE_BUILTINS.search(_COMMENTS.sub("", source)) is not None


@functools.cache
def _file_is_cooperative(source_file: str) -> bool:
    return is_cooperative(module_source(source_file))


# ------------------------------------------------------------------ arguments


class Parameter(NamedTuple):
    """One kernel parameter: a pointer to ``dtype`` (maybe const) or an int of ``dtype``."""

    dtype: str
    pointer: bool
    const: bool

    def __str__(self) -> str:
        return f"{'const ' if self.const else ''}{self.dtype}{'*' if self.pointer else ''}"


def _parse_signature(text: str) -> tuple[Parameter, ...]:
    params = []
    for item in filter(None, text.split(",")):
        const = item.startswith("const ")
        name = item.removeprefix("const ")
        pointer = name.endswith("*")
        params.append(Parameter(name.rstrip("*"), pointer, const))
    return tuple(params)


class _Entry(NamedTuple):
    function: object  # ctypes function
    parameters: tuple[Parameter, ...]
    cooperative: bool  # run each block's threads as fibers


def _bind(library: ctypes.CDLL, symbol: str) -> tuple[object, tuple[Parameter, ...]]:
    """The launch function ``symbol`` of a built library and its compiled parameters."""
    function = getattr(library, symbol)
    function.restype = ctypes.c_int
    function.argtypes = [
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    signature = getattr(library, symbol + "_signature")
    signature.restype = ctypes.c_char_p
    return function, _parse_signature(signature().decode())


class LaunchRecord(NamedTuple):
    """One ``launch`` call: ``grid`` and ``block`` are the x extents (the whole 1-D shape of
    a grid-stride launch), ``grid3`` / ``block3`` the (x, y, z) shape."""

    kernel: str
    dtype_name: str
    index_bits: int
    total: int
    grid: int
    block: int
    template_args: tuple[int, ...]
    grid3: tuple[int, int, int]
    block3: tuple[int, int, int]


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value
_PAGE = mmap.PAGESIZE
_CANARY = 0xFF
_PROT_NONE = 0


def _bytes_at(address: int, size: int) -> np.ndarray:
    return np.frombuffer((ctypes.c_ubyte * size).from_address(address), dtype=np.uint8)


class _GuardedCopy:
    """A copy of one array argument between guard pages:
    [guard page][slack filled with 0xFF][the array's bytes][guard page]."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.nbytes = array.nbytes
        self.slack = (-self.nbytes) % _PAGE
        self.length = 2 * _PAGE + self.slack + self.nbytes
        base = _LIBC.mmap(
            None,
            self.length,
            mmap.PROT_READ | mmap.PROT_WRITE,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            -1,
            0,
        )
        if base in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), "mmap of a guarded argument buffer failed")
        self.base = base
        self.data = base + _PAGE + self.slack
        ctypes.memset(base + _PAGE, _CANARY, self.slack)
        if self.nbytes:
            ctypes.memmove(self.data, array.ctypes.data, self.nbytes)
        for page in (base, base + self.length - _PAGE):
            if _LIBC.mprotect(page, _PAGE, _PROT_NONE) != 0:
                self.release()
                raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")

    def locate(self, address: int) -> int | None:
        """Byte offset of ``address`` from the data start when it lies in this mapping."""
        if self.base <= address < self.base + self.length:
            return address - self.data
        return None

    def slack_intact(self) -> bool:
        return not self.slack or bool(np.all(_bytes_at(self.base + _PAGE, self.slack) == _CANARY))

    def unchanged(self) -> bool:
        if not self.nbytes:
            return True
        return bool(
            np.array_equal(_bytes_at(self.data, self.nbytes), self.array.reshape(-1).view(np.uint8))
        )

    def copy_back(self) -> None:
        if self.nbytes:
            ctypes.memmove(self.array.ctypes.data, self.data, self.nbytes)

    def release(self) -> None:
        if self.base is not None:
            _LIBC.munmap(self.base, self.length)
            self.base = None


def _poisoned_numpy() -> types.ModuleType:
    """NumPy whose ``empty`` fills float arrays with NaN (everything else is NumPy's)."""
    module = types.ModuleType(
        "numpy_with_nan_empty", "NumPy, but empty() returns NaN-filled float arrays."
    )

    def empty(shape, dtype=float, order="C", **kwargs):
        out = np.empty(shape, dtype, order, **kwargs)
        if out.dtype.kind in "fc" or out.dtype.name == "bfloat16":
            out.fill(np.nan)
        return out

    module.__getattr__ = lambda name: getattr(np, name)  # PEP 562
    module.empty = empty
    return module


def _sanitizers(value: str | None) -> tuple[str, ...]:
    names = tuple(sorted(filter(None, re.split(r"[,\s]+", value or ""))))
    unknown = set(names) - set(SANITIZER_FLAGS)
    if unknown:
        raise ValueError(
            f"unknown sanitizer(s) {sorted(unknown)}; use {' / '.join(SANITIZER_FLAGS)}"
        )
    if "address" in names and not _asan_loaded():
        raise RuntimeError(
            "the address sanitizer needs its runtime preloaded into Python: run with "
            "LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 "
            "(or rely on checked mode's guard pages)"
        )
    return names


def _asan_loaded() -> bool:
    try:
        return "libasan" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("", "0", "false", "no")


class _CapturedStderr:
    """Redirects file descriptor 2 to a temporary file (sanitizer reports go there)."""

    def __enter__(self):
        self.file = tempfile.TemporaryFile()
        self.saved = os.dup(2)
        os.dup2(self.file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.file.seek(0)
        self.text = self.file.read().decode(errors="replace")
        self.file.close()
        return False


# ------------------------------------------------------------------ the launcher


def _describe(kernel: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...]) -> str:
    """``widen_to_acc<float16, int32>``, with the template arguments after the index type."""
    extra = "".join(f", {a}" for a in template_args)
    return f"{kernel}<{dtype_name}, int{index_bits}{extra}>"


@dataclass
class HostLauncher:
    """KernelLauncher running ``cupydcn/cuda/kernels/`` on the CPU with ``xp`` = NumPy.

    checked: guard-page isolation of array arguments, NaN-filled ``xp.empty`` and no GEMM
        output overlapping an operand (default: ``CUPYDCN_EMULATOR_CHECKED``, on unless set
        to 0).
    sanitize: "undefined" and/or "address" (default: ``CUPYDCN_EMULATOR_SANITIZE``).
    reverse: run blocks and threads last to first (exposes inter-thread dependences).
    shuffle: a seed (0 <= seed < 2**23): run blocks, and each block's threads, in a
        pseudo-random order drawn from it (with ``reverse``, a permutation of the reversed
        order); None runs them in order. Cooperative kernels draw a new order of the
        block's threads after every barrier.
    config: (grid, block) for a total; the GPU's ``launch_config`` unless overridden (it
        shapes grid-stride launches only, not those given an explicit grid and block).
    Every ``launch`` call is appended to ``launches``, every GEMM to ``gemms``.
    """

    checked: bool | None = None
    sanitize: str | None = None
    reverse: bool = False
    shuffle: int | None = None
    config: Callable[[int], tuple[int, int]] = launch_config

    def __post_init__(self):
        if self.checked is None:
            self.checked = _env_flag("CUPYDCN_EMULATOR_CHECKED", True)
        if self.sanitize is None:
            self.sanitize = os.environ.get("CUPYDCN_EMULATOR_SANITIZE", "")
        self._sanitizers = _sanitizers(self.sanitize)
        self.flags = BASE_FLAGS + tuple(
            flag for name in self._sanitizers for flag in SANITIZER_FLAGS[name]
        )
        self.xp = _poisoned_numpy() if self.checked else np
        self.launches: list[LaunchRecord] = []
        self.gemms: list[GemmCall] = []
        self.sorts = 0  # stable_argsort calls
        self._entries: dict[tuple[str, str, int, tuple[int, ...]], _Entry] = {}

    # -- compilation

    def entry(
        self, kernel: str, dtype_name: str, index_bits: int, template_args: tuple[int, ...] = ()
    ) -> _Entry:
        """The entry point of one specialisation (building its library on first use)."""
        if kernel not in SOURCE_OF_KERNEL:
            raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(SOURCE_OF_KERNEL)}")
        template_args = check_template_args(kernel, template_args)
        key = (kernel, dtype_name, index_bits, template_args)
        if key not in self._entries:
            source_file = SOURCE_OF_KERNEL[kernel]
            specialisation = f" and template arguments {template_args}" if template_args else ""
            library = build_library(
                translation_unit(source_file, dtype_name, index_bits, template_args),
                self.flags,
                what=f"{source_file} for {dtype_name} with {index_bits}-bit indices{specialisation}",
            )
            cooperative = _file_is_cooperative(source_file)
            for name in KERNEL_TEMPLATES[source_file]:
                function, parameters = _bind(library, _entry_symbol(name))
                declared = tuple(
                    Parameter(p.dtype_name(dtype_name, index_bits), p.pointer, p.const)
                    for p in kernel_parameters(name)
                )
                if parameters != declared:
                    raise TypeError(
                        f"{name_expression(name, dtype_name, index_bits, template_args)}: the "
                        f"compiled parameters ({', '.join(map(str, parameters))}) differ from "
                        f"KERNEL_PARAMETERS ({', '.join(map(str, declared))})"
                    )
                self._entries[(name, dtype_name, index_bits, template_args)] = _Entry(
                    function, parameters, cooperative
                )
        return self._entries[key]

    def prebuild(self, specialisations, workers: int | None = None) -> None:
        """Build the libraries of (kernel, dtype_name, index_bits, template_args) tuples in
        parallel (the compiler runs in subprocesses), instead of one by one on first launch;
        a (kernel, dtype_name, index_bits) triple stands for every specialisation of the
        kernel's file (``kernel_source.specialisations``)."""
        from concurrent.futures import ThreadPoolExecutor

        wanted = []
        for s in map(tuple, specialisations):
            if len(s) == 4:
                wanted.append((*s[:3], tuple(s[3])))
            elif len(s) == 3:
                if s[0] not in SOURCE_OF_KERNEL:
                    raise KeyError(f"unknown kernel {s[0]!r}; known: {sorted(SOURCE_OF_KERNEL)}")
                wanted += [(*s, args) for args in specialisations_of(SOURCE_OF_KERNEL[s[0]])]
            else:
                raise ValueError(
                    f"prebuild takes (kernel, dtype_name, index_bits[, template_args]); got {s}"
                )
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            for future in [pool.submit(self.entry, *s) for s in wanted]:
                future.result()

    # -- launching

    def launch(
        self,
        kernel: str,
        dtype_name: str,
        index_bits: int,
        total: int,
        args: Sequence[object],
        *,
        template_args: tuple[int, ...] = (),
        grid: tuple[int, int, int] | None = None,
        block: tuple[int, int, int] | None = None,
    ) -> None:
        """Runs one specialisation over ``total`` items: the grid-stride configuration
        ``self.config(total)`` (1-D), or the explicit (x, y, z) ``grid`` and ``block`` of a
        block-cooperative kernel; ``total == 0`` is recorded and launches nothing."""
        if index_bits not in (32, 64):
            raise ValueError(f"index_bits must be 32 or 64; got {index_bits!r}")
        if kernel not in SOURCE_OF_KERNEL:
            raise KeyError(f"unknown kernel {kernel!r}; known: {sorted(SOURCE_OF_KERNEL)}")
        total = operator.index(total)
        if total < 0:
            raise ValueError(f"{kernel}: total must be >= 0; got {total}")
        template_args = check_template_args(kernel, template_args)
        where = _describe(kernel, dtype_name, index_bits, template_args)
        shape = check_launch_shape(where, grid, block)
        if shape is None:
            blocks, threads = self.config(total)
            grid3, block3 = (blocks, 1, 1), (threads, 1, 1)
        else:
            grid3, block3 = shape
        self.launches.append(
            LaunchRecord(
                kernel,
                dtype_name,
                index_bits,
                total,
                grid3[0],
                block3[0],
                template_args,
                grid3,
                block3,
            )
        )
        if total == 0:
            return
        if shape is None:
            if index_bits == 32 and total - 1 + blocks * threads > 2**31 - 1:
                raise OverflowError(
                    f"{where}: a 32-bit grid-stride loop over {total} items with {blocks} x "
                    f"{threads} threads overflows its index (the last index + blockDim * gridDim "
                    "exceeds 2^31 - 1); this launch needs 64-bit indices"
                )
            if not (1 <= blocks < 2**31 and 1 <= threads <= 1024):
                raise ValueError(
                    f"{where}: bad launch configuration grid={blocks}, block={threads}"
                )
        entry = self.entry(kernel, dtype_name, index_bits, template_args)
        self.run_entry(where, entry, args, grid3, block3)
        report_launch(kernel, template_args, grid3, block3)

    def run_entry(
        self,
        where: str,
        entry: _Entry,
        args: Sequence[object],
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
    ) -> None:
        """Runs a built entry point (:meth:`entry`, :class:`AdHocKernels`) over ``grid`` x
        ``block`` threads with this launcher's argument checks, checked mode, sanitizers and
        order; faults and misuse raise :class:`EmulatorFaultError` naming ``where``."""
        values, arrays = self._convert(where, entry.parameters, args)
        guarded: list[_GuardedCopy | None] = [None] * len(values)
        try:
            if self.checked:
                for i, array in enumerate(arrays):
                    if array is not None:
                        guarded[i] = _GuardedCopy(array)
                        values[i] = ctypes.c_void_p(guarded[i].data)
            argv = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
            grid_c = (ctypes.c_uint * 3)(*grid)
            block_c = (ctypes.c_uint * 3)(*block)
            fault = ctypes.c_void_p()
            message = ctypes.create_string_buffer(_MESSAGE_BYTES)
            flags = (
                self._order_flags()
                | (_GUARD_FAULTS if self.checked else 0)
                | (_COOPERATIVE if entry.cooperative else 0)
            )
            call = (grid_c, block_c, argv, flags, ctypes.byref(fault), message, _MESSAGE_BYTES)
            if "undefined" in self._sanitizers:
                with _CapturedStderr() as captured:
                    status = entry.function(*call)
                if "runtime error" in captured.text:
                    raise EmulatorFaultError(f"{where}: UBSan reported\n{captured.text}")
            else:
                status = entry.function(*call)
            if status == _MISUSE:
                raise EmulatorFaultError(f"{where}: {message.value.decode(errors='replace')}")
            if status:
                raise EmulatorFaultError(
                    self._describe_fault(where, entry.parameters, guarded, status, fault.value or 0)
                )
            for i, copy in enumerate(guarded):
                if copy is None:
                    continue
                parameter = entry.parameters[i]
                if not copy.slack_intact():
                    raise EmulatorFaultError(
                        f"{where}: wrote before the start of argument {i} ({parameter}, "
                        f"shape {copy.array.shape})"
                    )
                if parameter.const:
                    if not copy.unchanged():
                        raise EmulatorFaultError(
                            f"{where}: modified const argument {i} ({parameter})"
                        )
                else:
                    copy.copy_back()
        finally:
            for copy in guarded:
                if copy is not None:
                    copy.release()

    # -- GEMMs

    def gemm(
        self,
        a: np.ndarray,
        b: np.ndarray,
        out: np.ndarray,
        *,
        transpose_a: bool = False,
        transpose_b: bool = False,
        alpha: float = 1.0,
        beta: float = 0.0,
        tf32: bool = False,
    ) -> None:
        """``out[i] = alpha * op(a[i]) @ op(b[i]) + beta * out[i]`` over the batch: the
        NumPy ``gemm_reference`` (a, b: (batch, rows, cols) with C-contiguous matrices, any
        batch stride, 0 broadcasting one matrix; out: (batch, m, n)). Recorded in ``gemms``
        and reported to ``record_calls``."""
        for name, array in (("a", a), ("b", b), ("out", out)):
            if not isinstance(array, np.ndarray):
                raise TypeError(f"gemm: {name} must be a NumPy array; got {type(array).__name__}")
        batch, m, n, k = check_gemm_operands(
            a, b, out, transpose_a=transpose_a, transpose_b=transpose_b
        )
        if self.checked:
            if not out.flags.writeable:
                raise ValueError("gemm: out is read-only")
            for name, array in (("a", a), ("b", b)):
                if np.may_share_memory(out, array):
                    raise ValueError(f"gemm: out overlaps {name} (cuBLAS reads while it writes)")
        gemm_reference(
            np,
            a,
            b,
            out,
            transpose_a=transpose_a,
            transpose_b=transpose_b,
            alpha=alpha,
            beta=beta,
            tf32=tf32,
        )
        call = GemmCall(batch, m, n, k, a.dtype.name, out.dtype.name, bool(tf32))
        self.gemms.append(call)
        report_gemm(call)

    def stable_argsort(self, keys: np.ndarray) -> np.ndarray:
        """The indices that sort the 1-D ``keys`` stably (the deterministic backward's
        sort, cupydcn/cuda/deterministic.py), as CuPy's argsort does on a GPU."""
        self.sorts += 1
        return np.argsort(keys, kind="stable")

    def _order_flags(self) -> int:
        flags = _REVERSE_ORDER if self.reverse else 0
        if self.shuffle is not None:
            if not 0 <= self.shuffle < 2**23:
                raise ValueError(f"shuffle seed must be in [0, 2**23); got {self.shuffle!r}")
            flags |= _SHUFFLE_ORDER | (self.shuffle << _SEED_SHIFT)
        return flags

    def _convert(
        self, where: str, parameters: tuple[Parameter, ...], args: Sequence[object]
    ) -> tuple[list, list]:
        if len(args) != len(parameters):
            raise TypeError(
                f"{where}: takes {len(parameters)} arguments "
                f"({', '.join(map(str, parameters))}); got {len(args)}"
            )
        values: list = []
        arrays: list[np.ndarray | None] = []
        for i, (parameter, arg) in enumerate(zip(parameters, args)):
            if parameter.pointer:
                arrays.append(None if arg is None else self._check_array(where, i, parameter, arg))
                values.append(ctypes.c_void_p(None if arg is None else arg.ctypes.data))
            else:
                if isinstance(arg, (bool, np.bool_)) or not isinstance(arg, (int, np.integer)):
                    raise TypeError(
                        f"{where}: argument {i} ({parameter}) must be an int; "
                        f"got {type(arg).__name__} {arg!r}"
                    )
                low, high = _INT_RANGES[parameter.dtype]
                if not low <= int(arg) <= high:
                    raise OverflowError(
                        f"{where}: argument {i} = {int(arg)} does not fit {parameter.dtype}"
                    )
                values.append(_INT_CTYPES[parameter.dtype](int(arg)))
                arrays.append(None)
        written = [a for a, p in zip(arrays, parameters) if a is not None and not p.const]
        for out in written:
            for i, other in enumerate(arrays):
                if other is not None and other is not out and np.may_share_memory(out, other):
                    raise ValueError(
                        f"{where}: argument {i} overlaps a written argument "
                        "(the kernel's pointers are __restrict__)"
                    )
        return values, arrays

    @staticmethod
    def _check_array(where: str, i: int, parameter: Parameter, arg: object) -> np.ndarray:
        if not isinstance(arg, np.ndarray):
            raise TypeError(
                f"{where}: argument {i} ({parameter}) must be a NumPy array or "
                f"None; got {type(arg).__name__}"
            )
        if arg.dtype.name != parameter.dtype:
            raise TypeError(f"{where}: argument {i} ({parameter}) has dtype {arg.dtype.name}")
        if not arg.flags.c_contiguous:
            raise ValueError(
                f"{where}: argument {i} ({parameter}) of shape {arg.shape} is "
                f"not C-contiguous (strides {arg.strides})"
            )
        if not parameter.const and not arg.flags.writeable:
            raise ValueError(f"{where}: argument {i} ({parameter}) is read-only")
        return arg

    @staticmethod
    def _describe_fault(where: str, parameters, guarded, signal: int, address: int) -> str:
        for i, copy in enumerate(guarded):
            offset = None if copy is None else copy.locate(address)
            if offset is None:
                continue
            itemsize = copy.array.itemsize
            side = "before the start" if offset < 0 else "past the end"
            return (
                f"{where}: out-of-bounds access {side} of argument {i} ({parameters[i]}, "
                f"shape {copy.array.shape}): element {offset // itemsize} of "
                f"{copy.array.size} (byte offset {offset})"
            )
        return f"{where}: memory fault (signal {signal}) at address {address:#x}"


# ------------------------------------------------------------------ helpers for kernel tests


class AdHocKernels:
    """Test-only kernels: the name expressions ``expressions`` (``"ns::kernel<float, 4>"``)
    of one self-contained ``.cu`` file at ``path`` that is not in the ``kernel_source``
    tables (no local ``#include``), built like the package's modules (shim + the file + an
    entry point per expression; cooperative when :func:`is_cooperative` says so) and
    launched through a :class:`HostLauncher` with its checks, checked mode, sanitizers and
    order. Parameters are checked against the compiled signature: pointers to float64,
    float32, float16, bfloat16, int32, int64 or uint32, and integers of those int types.
    Launches are not recorded in the launcher's ``launches`` nor reported to
    ``record_calls``::

        kernels = AdHocKernels(KERNELS / "reduce.cu", ["emu::block_sum<float>"])
        kernels.launch(host_launcher, "emu::block_sum<float>", [x, out, n],
                       grid=(4, 1, 1), block=(256, 1, 1))
    """

    def __init__(self, path: str | os.PathLike, expressions: Sequence[str]):
        self.path = Path(path).resolve()
        self.expressions = tuple(expressions)
        if not self.expressions:
            raise ValueError(f"{self.path.name}: no name expressions")
        self._entries: dict[tuple[str, ...], dict[str, _Entry]] = {}
        self._lock = threading.Lock()

    def translation_unit(self) -> str:
        """shim + the file (with a #line directive naming it) + the entry points."""
        refuse_dynamic_shared_memory(self.path.read_text(), self.path.name)
        parts = [shim_text(), _HIDDEN, f'#line 1 "{self.path}"\n', self.path.read_text(), _VISIBLE]
        parts.append(_GENERATED)
        for i, expression in enumerate(self.expressions):
            parts.append(_entry_points(f"cupydcn_ad_hoc_{i}", expression))
        return "".join(parts)

    def entries(self, launcher: HostLauncher) -> dict[str, _Entry]:
        """The entry point of every expression, built with ``launcher``'s compiler flags."""
        with self._lock:
            if launcher.flags not in self._entries:
                library = build_library(
                    self.translation_unit(), launcher.flags, what=f"{self.path.name} (ad hoc)"
                )
                cooperative = is_cooperative(self.path.read_text())
                self._entries[launcher.flags] = {
                    expression: _Entry(*_bind(library, f"cupydcn_ad_hoc_{i}"), cooperative)
                    for i, expression in enumerate(self.expressions)
                }
            return self._entries[launcher.flags]

    def launch(
        self,
        launcher: HostLauncher,
        expression: str,
        args: Sequence[object],
        *,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
    ) -> None:
        """Runs ``expression`` over the (x, y, z) ``grid`` of (x, y, z) ``block`` threads
        with ``args`` in its parameter order (arrays, None, ints)."""
        entries = self.entries(launcher)
        if expression not in entries:
            raise KeyError(f"{expression!r} is not one of {list(entries)}")
        shape = check_launch_shape(expression, grid, block)
        if shape is None:
            raise ValueError(f"{expression}: an ad hoc launch needs a grid and a block")
        launcher.run_entry(expression, entries[expression], args, *shape)


# The launch orders of assert_order_independent: HostLauncher options by name.
ORDERS: dict[str, dict[str, object]] = {
    "forward": {},
    "reverse": {"reverse": True},
    "shuffle 1": {"shuffle": 1},
    "shuffle 2": {"shuffle": 2},
    "reverse, shuffle 3": {"reverse": True, "shuffle": 3},
}


def order_launchers(
    *, checked: bool | None = None, sanitize: str | None = None
) -> dict[str, HostLauncher]:
    """A fresh :class:`HostLauncher` per order of :data:`ORDERS` (built libraries are shared
    in-process, so these cost no compilation)."""
    return {
        name: HostLauncher(checked=checked, sanitize=sanitize, **options)
        for name, options in ORDERS.items()
    }


def _result_arrays(result: object) -> dict[str, np.ndarray]:
    if isinstance(result, dict):
        items = result.items()
    elif isinstance(result, (tuple, list)):
        items = ((f"result[{i}]", value) for i, value in enumerate(result))
    else:
        items = (("result", result),)
    arrays = {}
    for name, value in items:
        if value is None:
            continue
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"{name}: cannot compare object arrays bitwise")
        arrays[name] = array
    return arrays


def _bitwise_difference(name: str, order: str, expected: np.ndarray, got: np.ndarray) -> str | None:
    """None when ``got`` has the dtype, shape and bytes of ``expected``, else what differs."""
    if expected.dtype != got.dtype or expected.shape != got.shape:
        return (
            f"{name}: {order} gives {got.dtype}{list(got.shape)}, forward "
            f"{expected.dtype}{list(expected.shape)}"
        )
    if expected.size == 0:
        return None
    width = expected.dtype.itemsize
    bytes_expected = np.ascontiguousarray(expected).reshape(-1).view(np.uint8).reshape(-1, width)
    bytes_got = np.ascontiguousarray(got).reshape(-1).view(np.uint8).reshape(-1, width)
    differ = np.flatnonzero(np.any(bytes_expected != bytes_got, axis=1))
    if differ.size == 0:
        return None
    first = int(differ[0])
    index = tuple(int(i) for i in np.unravel_index(first, expected.shape))
    return (
        f"{name}: {order} differs from forward in {differ.size} of {expected.size} elements; "
        f"first at {index}: {got.reshape(-1)[first]!r}, forward {expected.reshape(-1)[first]!r}"
    )


def assert_order_independent(
    run: Callable[[HostLauncher], object],
    *,
    checked: bool | None = None,
    sanitize: str | None = None,
) -> object:
    """Runs ``run(launcher)`` once per order of :data:`ORDERS` (forward, reverse, shuffled;
    blocks, threads and, in cooperative kernels, the fibers resumed after every barrier)
    and raises ``AssertionError`` unless every run returns the same bits: ``run`` returns an
    array, a tuple / list of arrays or a dict of them (fresh ones each call). Returns the
    forward run's result.

    This is the emulator's check for a missing ``__syncthreads`` / ``__syncwarp`` or any
    other race between threads: on a GPU the threads of a block interleave in an order no
    one chooses, and a kernel whose results depend on it is wrong. Use it in tests of every
    block-cooperative kernel, with inputs that make the threads' values distinct::

        def run(launcher):
            out = launcher.xp.zeros(blocks, np.float32)
            launcher.launch("my_kernel", "float32", 32, total, [x, out, total],
                            grid=(blocks, 1, 1), block=(256, 1, 1))
            return out

        out = assert_order_independent(run)

    Kernels that accumulate floats with atomics from several threads are order dependent
    by design (the sums round differently); compare those within a tolerance instead.
    """
    raw = {
        order: run(launcher)
        for order, launcher in order_launchers(checked=checked, sanitize=sanitize).items()
    }
    results = {order: _result_arrays(result) for order, result in raw.items()}
    forward = results["forward"]
    problems = []
    for order, arrays in results.items():
        if set(arrays) != set(forward):
            problems.append(f"{order} returns {sorted(arrays)}, forward {sorted(forward)}")
            continue
        for name, array in arrays.items():
            problem = _bitwise_difference(name, order, forward[name], array)
            if problem is not None:
                problems.append(problem)
    if problems:
        raise AssertionError(
            "the results depend on the order in which blocks and threads run (a missing "
            "barrier, or another race between threads):\n  " + "\n  ".join(problems)
        )
    return raw["forward"]
