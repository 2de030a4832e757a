"""Building the CUDA kernels ahead of time into CuPy's on-disk kernel cache.

:func:`precompile` compiles each module (one ``cupydcn/cuda/kernels/`` source file for one
dtype and index width) exactly as :class:`~cupydcn.cuda.cupy_launcher.CupyLauncher` does
at run time -- through ``cupy._core.core.compile_with_cache``, the function
``cupy.RawModule`` compiles through, with the same source string, options and name
expressions -- so CuPy stores it under the key a later run looks up, and that run loads
the cubin instead of invoking NVRTC.

How CuPy (14) keys its cache (``cupy/cuda/compiler.py``, ``_compile_with_cache_cuda``):
the SHA-1 of the architecture (the device's compute capability capped at the newest
NVRTC supports, or the ``arch`` given), the full NVRTC option list (ours, CuPy's include
directory, ``-ftz=true``, ...), the NVRTC version, the backend, the ``-arch=`` option and
output kind (cubin, or PTX under ``CUPY_COMPILE_WITH_PTX=1``), the version comments of
NVRTC's output for an empty file, the module source, CUPY_CACHE_KEY (a checksum of CuPy's
bundled headers) and the sorted name expressions. The file is
``$CUPY_CACHE_DIR/<sha1>.cubin`` (default ``~/.cupy/kernel_cache``; CuPy reads the
variable when ``cupy.cuda.compiler`` is first imported).

So an entry is invalidated (a later run compiles again, and writes a new entry beside
the old) by: another cupydcn release or any edit of a kernel source or header (the
inlined source differs), another CuPy release or CuPy headers, another NVRTC version
(``nvidia-cuda-nvrtc`` wheel or CUDA toolkit), another GPU architecture, and the
environment variables that change CuPy's options (``CUPY_COMPILE_WITH_PTX``,
``CUPY_NVRTC_USE_PCH``, ``CUPY_CUDA_COMPILE_WITH_DEBUG``). The driver version and the
Python version are not in the key. ``CUPY_CACHE_IN_MEMORY=1`` bypasses the disk cache
(and is refused here).

With ``arch`` given nothing needs a GPU or a driver: NVRTC runs on the CPU. Two lookups
of CuPy that would ask the driver (the memoised per-device ``-arch`` option, and loading
the built cubin into a CUDA context) are replaced, while precompiling, by what they
compute for an explicit architecture and by a module that keeps the cubin unloaded;
everything else -- the key, NVRTC, the cache write -- is CuPy's own code. Those
replacements are process-wide for the duration of the call, so do not compile other
CuPy kernels in other threads meanwhile (precompiling is a build step).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cupydcn.core.dtypes import DTYPES, INDEX_C_TYPES
from cupydcn.core.errors import CupydcnRuntimeError, CupydcnValueError
from cupydcn.cuda.cupy_launcher import raw_module_arguments
from cupydcn.cuda.kernel_source import (
    DETERMINISTIC_SOURCE_FILES,
    OP_SOURCE_FILES,
    specialisations,
)

OPS: tuple[str, ...] = tuple(OP_SOURCE_FILES)

_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModuleBuild:
    """One module precompiled: its source file, dtype, index width, template arguments
    (the specialisation; ``()`` for files without template parameters) and architecture
    (``"90"`` for sm_90), the seconds the build (or cache lookup) took, whether CuPy's
    cache already held it (``cached``), and the cache file's path when known."""

    source_file: str
    dtype_name: str
    index_bits: int
    template_args: tuple[int, ...]
    arch: str
    seconds: float
    cached: bool
    cache_file: str | None


def _choices(value, every: Sequence, what: str, parse=lambda v: v) -> tuple:
    if value is None or (isinstance(value, str) and value == "all"):
        return tuple(every)
    if isinstance(value, (str, int)):
        value = [value]
    chosen = []
    for item in value:
        parsed = parse(item)
        if parsed not in every:
            raise CupydcnValueError(
                f"precompile: unknown {what} {item!r}; choose from {', '.join(map(str, every))} "
                "or 'all'"
            )
        if parsed not in chosen:
            chosen.append(parsed)
    if not chosen:
        raise CupydcnValueError(f"precompile: no {what} given")
    return tuple(chosen)


def _parse_index_bits(value) -> int:
    try:
        return int(str(value).removeprefix("int"))
    except ValueError:
        return value


def normalise_arch(arch) -> str:
    """``"90"`` from ``"sm_90"``, ``"compute_90"``, ``"90"`` or ``90`` (CuPy keys its
    cache on this string form)."""
    text = str(arch).strip().lower()
    for prefix in ("sm_", "compute_"):
        text = text.removeprefix(prefix)
    if not text.isdigit() or not 30 <= int(text) <= 999:
        raise CupydcnValueError(
            f"precompile: arch must look like 'sm_90' or '90' (a compute capability); got {arch!r}"
        )
    return str(int(text))


def modules_for(
    ops="all", dtypes="all", index_bits="all", deterministic: bool = True
) -> list[tuple[str, str, int, tuple[int, ...]]]:
    """The (source file, dtype, index width, template arguments) of every module the
    chosen ops launch, in a fixed order, each once (a file with template parameters is
    one module per specialisation, ``kernel_source.FILE_SPECIALISATIONS``)."""
    chosen_ops = _choices(ops, OPS, "op")
    chosen_dtypes = _choices(dtypes, tuple(DTYPES), "dtype")
    chosen_bits = _choices(index_bits, tuple(INDEX_C_TYPES), "index width", _parse_index_bits)
    sources: list[str] = []
    for op in chosen_ops:
        files = OP_SOURCE_FILES[op] + (DETERMINISTIC_SOURCE_FILES[op] if deterministic else ())
        sources.extend(f for f in files if f not in sources)
    return [
        (s, d, b, t)
        for s in sources
        for d in chosen_dtypes
        for b in chosen_bits
        for t in specialisations(s)
    ]


@functools.cache
def _unloaded_module_type(module_type: type) -> type:
    """A subclass of ``cupy.cuda.function.Module`` that stands in for it while
    precompiling: it records the name mapping but loads nothing into a CUDA context (which would
    need a driver and a GPU of that architecture)."""

    class UnloadedModule(module_type):
        def load(self, cubin) -> None:
            pass

    return UnloadedModule


class _RecordingBackend:
    """Wraps CuPy's kernel cache backend and records which names were found and saved."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.loaded: list[str] = []
        self.saved: list[str] = []

    def load(self, name):
        payload = self.inner.load(name)
        if payload is not None:
            self.loaded.append(name)
        return payload

    def save(self, name, cubin, source) -> None:
        self.saved.append(name)
        self.inner.save(name, cubin, source)


@contextlib.contextmanager
def _compiling_without_device(compiler):
    """CuPy's compiler with the two driver lookups replaced (module docstring)."""
    original_arch_option = compiler._get_arch_for_options_for_nvrtc
    original_function = compiler.function
    original_backend = compiler._kernel_cache_backend

    def arch_option(arch=None):
        if arch is None:  # not reached from precompile, which always passes arch
            return original_arch_option()
        # What CuPy's _get_arch_for_options_for_nvrtc returns for an explicit arch.
        if not compiler._use_ptx and int(arch) <= int(compiler._get_max_compute_capability()):
            return f"-arch=sm_{arch}", "cubin"
        return f"-arch=compute_{arch}", "ptx"

    recorder = _RecordingBackend(original_backend)
    compiler._get_arch_for_options_for_nvrtc = arch_option
    compiler.function = types.SimpleNamespace(
        Module=_unloaded_module_type(original_function.Module),
        LinkState=original_function.LinkState,
    )
    compiler._kernel_cache_backend = recorder
    try:
        yield recorder
    finally:
        compiler._get_arch_for_options_for_nvrtc = original_arch_option
        compiler.function = original_function
        compiler._kernel_cache_backend = original_backend


def compile_like_raw_module(
    core,
    source_file: str,
    dtype_name: str,
    index_bits: int,
    arch,
    template_args: tuple[int, ...] = (),
):
    """Compile one module through ``cupy._core.core.compile_with_cache`` -- the function
    ``cupy.RawModule`` compiles through -- with the RawModule arguments of
    :func:`cupydcn.cuda.cupy_launcher.raw_module_arguments` (``prepend_cupy_headers=False``
    and no jitify, as RawModule passes them), for ``arch`` (None: CuPy's choice for the
    current device, as at run time)."""
    arguments = raw_module_arguments(source_file, dtype_name, index_bits, template_args)
    return core.compile_with_cache(
        arguments["code"],
        arguments["options"],
        arch=arch,
        prepend_cupy_headers=False,
        name_expressions=list(arguments["name_expressions"]),
    )


def cache_dir() -> str | None:
    """The directory CuPy's disk kernel cache uses in this process (None if CuPy's
    cache backend is not the disk one)."""
    from cupy.cuda import compiler

    return getattr(compiler._kernel_cache_backend, "_cache_dir", None)


def _device_arch() -> str:
    import cupy
    from cupy.cuda import compiler

    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise CupydcnRuntimeError("no CUDA device")
        return str(compiler._get_arch())
    except (cupy.cuda.runtime.CUDARuntimeError, CupydcnRuntimeError) as exc:
        raise CupydcnRuntimeError(
            "precompile: no usable CUDA device to take the architecture from "
            f"({exc}); give arch= (e.g. arch='sm_90'), which needs no GPU"
        ) from None


def precompile(
    ops="all",
    dtypes="all",
    index_bits="all",
    arch=None,
    *,
    deterministic: bool = True,
    progress=None,
) -> list[ModuleBuild]:
    """Build the CUDA kernels of ``ops`` into CuPy's on-disk kernel cache, so that later
    runs (another process, a container built from this image) load them without
    compiling.

    ``ops``: ``"all"`` or some of ``"deform_conv2d"``, ``"deform_roi_pool"``,
    ``"deform_psroi_pool"``; ``dtypes``: ``"all"`` or some of ``float64``, ``float32``,
    ``float16``, ``bfloat16``; ``index_bits``: ``"all"`` or some of 32, 64 (64-bit
    indices are used only for arrays past 2**31 elements); ``arch``: ``None`` for the
    current device's architecture (as CuPy picks it at run time), or one or several
    architectures (``"sm_90"``, ``"90"``, ``90``), which needs no GPU nor driver.
    ``deterministic`` also builds the modules only the ``deterministic=True`` backward
    launches. ``progress``, if given, is called with each :class:`ModuleBuild` as it is
    done. Returns the builds in order; ``cached`` says which were already in the cache
    (a hit costs milliseconds and writes nothing; the first module of a process also
    pays CuPy's one-off NVRTC version probe, an empty-file compile of a few tenths of a
    second, hit or not).

    The cache is ``$CUPY_CACHE_DIR`` (default ``~/.cupy/kernel_cache``), read by CuPy
    when it is first imported: set it before importing CuPy, and to the same directory
    at run time. An entry is found again only by the same cupydcn kernel sources, CuPy
    release, NVRTC version and architecture, and the same ``CUPY_COMPILE_WITH_PTX`` /
    ``CUPY_NVRTC_USE_PCH`` / ``CUPY_CUDA_COMPILE_WITH_DEBUG`` settings; a change in any
    makes the run compile again (see :mod:`cupydcn.cuda.precompile`). Importing
    cupydcn compiles nothing; kernels are otherwise compiled on their first launch.
    """
    modules = modules_for(ops, dtypes, index_bits, deterministic)
    try:
        from cupy._core import core
        from cupy.cuda import compiler
    except ImportError as exc:
        raise CupydcnRuntimeError(
            f"precompile needs CuPy (pip install cupy-cuda12x or cupy-cuda13x): {exc}"
        ) from None
    if compiler._get_bool_env_variable("CUPY_CACHE_IN_MEMORY", False):
        raise CupydcnValueError(
            "precompile: CUPY_CACHE_IN_MEMORY=1 makes CuPy bypass its disk cache; unset it"
        )
    if arch is None:
        arches = (_device_arch(),)
    else:
        listed = [arch] if isinstance(arch, (str, int)) else list(arch)
        arches = tuple(dict.fromkeys(normalise_arch(a) for a in listed))
        if not arches:
            raise CupydcnValueError("precompile: no arch given")
    directory = cache_dir()
    builds: list[ModuleBuild] = []
    with _LOCK:
        for target in arches:
            for source_file, dtype_name, bits, template_args in modules:
                with _compiling_without_device(compiler) as recorder:
                    start = time.perf_counter()
                    try:
                        compile_like_raw_module(
                            core, source_file, dtype_name, bits, target, template_args
                        )
                    except compiler.CompileException as exc:
                        raise CupydcnRuntimeError(
                            f"precompile: {source_file} ({dtype_name}, int{bits}, "
                            f"template arguments {template_args}, sm_{target}) "
                            f"did not compile: {exc}"
                        ) from exc
                    seconds = time.perf_counter() - start
                names = recorder.saved or recorder.loaded
                build = ModuleBuild(
                    source_file,
                    dtype_name,
                    bits,
                    template_args,
                    target,
                    seconds,
                    cached=not recorder.saved,
                    cache_file=(
                        os.path.join(directory, names[-1]) if directory and names else None
                    ),
                )
                builds.append(build)
                if progress is not None:
                    progress(build)
    return builds


def format_table(builds: Iterable[ModuleBuild]) -> str:
    """A plain-text table of builds: module, dtype, index, arch, seconds, cache."""
    builds = list(builds)
    header = ("module", "dtype", "index", "arch", "seconds", "cache")
    rows = [
        (
            b.source_file
            + ("" if not b.template_args else f"<{', '.join(map(str, b.template_args))}>"),
            b.dtype_name,
            f"int{b.index_bits}",
            f"sm_{b.arch}",
            f"{b.seconds:.3f}",
            "hit" if b.cached else "compiled",
        )
        for b in builds
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    right = {4}

    def line(cells) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(header), line("-" * w for w in widths)]
    out.extend(line(r) for r in rows)
    return "\n".join(out)
