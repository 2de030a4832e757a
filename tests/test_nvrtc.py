"""Every kernel compiles through NVRTC for every target GPU, without spilling.

No GPU is needed: NVRTC compiles without a driver. For each source file of
``KERNEL_TEMPLATES``, dtype, index width and architecture, the module source that the
runtime hands CuPy is compiled with all its name expressions in one program and the
options CuPy's RawModule compiles it with (``-ftz=true`` included), as the runtime does,
and ptxas's ``-v`` report is checked. The kernels' parameter lists are checked against
``KERNEL_PARAMETERS``, the declaration the CUDA backends build their launches from.

sm_70 is built with NVRTC 12 (CUDA 13 dropped it); every other architecture with the
newest NVRTC installed that supports it (NVRTC 13 in CI). An architecture that no
installed NVRTC supports is skipped, unless ``CUPYDCN_REQUIRE_NVRTC=1`` (set by
``.ci/run``), which turns every missing NVRTC into a failure.

With ``CUPYDCN_REGISTER_REPORT=<path>`` a Markdown table of registers and spills per
kernel, dtype, index width and architecture is written there.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import nvrtc_build
from cupydcn.core.dtypes import DTYPES, INDEX_C_TYPES
from cupydcn.cuda.kernel_source import (
    CUPY_ADDED_NVRTC_OPTIONS,
    KERNEL_PARAMETERS,
    KERNEL_TEMPLATES,
    NVRTC_OPTIONS,
    SOURCE_OF_KERNEL,
    kernel_parameters,
    module_source,
    name_expression,
    name_expressions,
    parse_parameter,
    specialisations,
)

pytestmark = pytest.mark.nvrtc

# Volta, Turing, Ampere (A100, consumer), Ada, Hopper, Blackwell (data centre, consumer).
ARCHS = (70, 75, 80, 86, 89, 90, 100, 120)
# The NVRTC major versions CI must have: 12 for sm_70, 13 for everything newer.
REQUIRED_NVRTC_MAJORS = (12, 13)

# Budgets per kernel and architecture. No spilling at all: every kernel is a short loop
# body with a handful of live values, so any spill is a regression worth a look. The stack
# frame budget leaves room for a small local array; a kernel needing more is suspect.
SPILL_BUDGET_BYTES = 0
STACK_FRAME_BUDGET_BYTES = 64
# Registers are reported, not limited: ptxas caps them at 255, which a 256-thread block
# can always launch with, and occupancy is a tuning question for the report.

# Warnings in the NVRTC/ptxas log that are about the toolchain, not our code.
ALLOWED_WARNINGS = (
    # NVRTC 12 warns that sm_70 (and older) targets are deprecated; building sm_70 is the
    # point of using NVRTC 12, and NVRTC has no option to silence this one warning.
    "Architectures prior to '<compute/sm>_75' are deprecated",
)

REQUIRE_NVRTC = os.environ.get("CUPYDCN_REQUIRE_NVRTC") == "1"

SPECS = [
    (source_file, dtype_name, index_bits)
    for source_file in KERNEL_TEMPLATES
    for dtype_name in DTYPES
    for index_bits in INDEX_C_TYPES
]

# (kernel, dtype, index bits, arch) -> resources, filled by the build tests, reported at
# the end of the module.
_RESULTS: dict[tuple[str, tuple[int, ...], str, int, int], nvrtc_build.KernelResources] = {}


def _unavailable(reason: str):
    """Skip, or fail where CI demands every NVRTC (CUPYDCN_REQUIRE_NVRTC=1)."""
    if REQUIRE_NVRTC:
        pytest.fail(f"{reason} (CUPYDCN_REQUIRE_NVRTC=1 forbids skipping)", pytrace=False)
    pytest.skip(reason)


def _nvrtc_for(arch: int) -> nvrtc_build.Nvrtc:
    try:
        return nvrtc_build.nvrtc_for_arch(arch)
    except nvrtc_build.NvrtcNotFound as exc:
        reason = str(exc)
    _unavailable(reason)  # outside the handler: no chained traceback in the report


# The options CuPy's RawModule compiles our sources with, less its include directories
# (our binding adds those of each NVRTC), -arch (added per build) and --pch (see below).
RUNTIME_OPTIONS = (*NVRTC_OPTIONS, *CUPY_ADDED_NVRTC_OPTIONS)


def _compile_options(nvrtc: nvrtc_build.Nvrtc, pch_root: Path) -> tuple[str, ...]:
    """RUNTIME_OPTIONS and -Xptxas=-v, plus automatic precompiled headers where available.

    --pch (NVRTC >= 12.8, which CuPy passes too) only speeds up the front end, which
    parses cuda_fp16.h / cuda_bf16.h for every program (a sixth of the CPU time here). Each NVRTC gets its own directory (NVRTC 12 would write into the working
    directory, and one version cannot read the other's files); diagnostic 629 says a
    PCH made for another architecture was not reused, which is expected here.
    """
    if nvrtc.version < (12, 8):
        return (*RUNTIME_OPTIONS, "-Xptxas=-v")
    pch_dir = pch_root / f"nvrtc{nvrtc.version[0]}.{nvrtc.version[1]}"
    pch_dir.mkdir(exist_ok=True)
    return (*RUNTIME_OPTIONS, "-Xptxas=-v", "--pch", f"--pch-dir={pch_dir}", "--diag-suppress=629")


@pytest.fixture(scope="module")
def pch_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("nvrtc-pch")


def _unexpected_warnings(log_lines: list[str]) -> list[str]:
    return [line for line in log_lines if not any(ok in line for ok in ALLOWED_WARNINGS)]


@pytest.mark.parametrize("major", REQUIRED_NVRTC_MAJORS)
def test_nvrtc_installed(major):
    """The NVRTC libraries the build matrix needs are installed, with their headers."""
    nvrtc = nvrtc_build.installed().get(major)
    if nvrtc is None:
        _unavailable(nvrtc_build.missing_message(major))
    assert nvrtc.version[0] == major
    assert (nvrtc.include_dir / "cuda_bf16.h").is_file()


def test_every_arch_has_an_nvrtc():
    """Each target architecture is supported by some installed NVRTC."""
    missing = [
        arch
        for arch in ARCHS
        if not any(n.supports(arch) for n in nvrtc_build.installed().values())
    ]
    if missing:
        _unavailable(
            f"no installed NVRTC supports {', '.join(f'sm_{a}' for a in missing)}; "
            f"installed: "
            f"{list(nvrtc_build.installed().values())}"
        )


def _all_expressions(source_file: str, dtype_name: str, index_bits: int) -> tuple[str, ...]:
    """The name expressions of every specialisation of one file for one dtype and index
    width (the runtime compiles one module per specialisation; one NVRTC program with all
    of them checks the same code in one build)."""
    return tuple(
        e
        for t in specialisations(source_file)
        for e in name_expressions(source_file, dtype_name, index_bits, t)
    )


@pytest.mark.parametrize("arch", ARCHS, ids=[f"sm_{a}" for a in ARCHS])
@pytest.mark.parametrize(
    "source_file, dtype_name, index_bits",
    SPECS,
    ids=[f"{s.removesuffix('.cu')}-{d}-i{i}" for s, d, i in SPECS],
)
def test_kernels_build(source_file, dtype_name, index_bits, arch, pch_root):
    nvrtc = _nvrtc_for(arch)
    expressions = _all_expressions(source_file, dtype_name, index_bits)
    result = nvrtc.compile(
        module_source(source_file),
        expressions,
        arch,
        _compile_options(nvrtc, pch_root),
        program_name=source_file,
    )
    assert result.cubin, "NVRTC returned an empty cubin"

    unexpected = _unexpected_warnings(result.warnings())
    assert not unexpected, "compile warnings:\n" + "\n".join(unexpected)

    problems = []
    for kernel, template_args in (
        (k, t) for t in specialisations(source_file) for k in KERNEL_TEMPLATES[source_file]
    ):
        expression = name_expression(kernel, dtype_name, index_bits, template_args)
        lowered = result.lowered_names.get(expression)
        assert lowered, f"no lowered name for {expression}"
        assert lowered in result.resources, (
            f"ptxas reported nothing for {expression} ({lowered}):\n{result.log}"
        )
        res = result.resources[lowered]
        _RESULTS[(kernel, template_args, dtype_name, index_bits, arch)] = res
        if res.spill_stores > SPILL_BUDGET_BYTES or res.spill_loads > SPILL_BUDGET_BYTES:
            problems.append(
                f"{expression}: spills {res.spill_stores} B stored, "
                f"{res.spill_loads} B loaded (budget {SPILL_BUDGET_BYTES} B)"
            )
        if res.stack_frame > STACK_FRAME_BUDGET_BYTES:
            problems.append(
                f"{expression}: {res.stack_frame} B stack frame "
                f"(budget {STACK_FRAME_BUDGET_BYTES} B)"
            )
        if res.registers is None:
            problems.append(f"{expression}: ptxas reported no register count")
    # Non-inlined callees spill into the caller's stack too.
    for name, res in result.resources.items():
        if res.registers is None and (res.spill_stores or res.spill_loads):
            problems.append(f"callee {name}: spills {res.spill_stores}/{res.spill_loads} B")
    assert not problems, f"sm_{arch}, NVRTC {result.nvrtc_version}:\n" + "\n".join(problems)


def _format_cell(res: nvrtc_build.KernelResources | None) -> str:
    if res is None:
        return "–"
    cell = str(res.registers)
    extras = []
    if res.stack_frame:
        extras.append(f"stack {res.stack_frame}")
    if res.spill_stores or res.spill_loads:
        extras.append(f"spill {res.spill_stores}/{res.spill_loads}")
    return cell + (f" ({', '.join(extras)})" if extras else "")


def register_report() -> str:
    """Markdown: registers per kernel × dtype × index width × arch, from this run."""
    nvrtcs = {
        arch: n
        for arch in ARCHS
        for n in [
            next(
                (
                    v
                    for k, v in sorted(nvrtc_build.installed().items(), reverse=True)
                    if v.supports(arch)
                ),
                None,
            )
        ]
        if n is not None
    }
    lines = [
        "# cupydcn kernel register report",
        "",
        "Registers per thread from `ptxas -v`; `stack B` = stack frame bytes, "
        "`spill S/L` = spill store/load bytes (shown only when nonzero); – = not built. "
        f"Budgets: spills {SPILL_BUDGET_BYTES} B, stack frame {STACK_FRAME_BUDGET_BYTES} B. "
        f"Options: `{' '.join(RUNTIME_OPTIONS)} -Xptxas=-v` (+ `--pch` on NVRTC >= 12.8).",
        "",
        "NVRTC per arch: "
        + ", ".join(f"sm_{a}: {n.version[0]}.{n.version[1]}" for a, n in nvrtcs.items())
        + ".",
        "",
        "| kernel | dtype | index | " + " | ".join(f"sm_{a}" for a in ARCHS) + " |",
        "|---|---|---|" + "---:|" * len(ARCHS),
    ]
    for kernel in SOURCE_OF_KERNEL:
        for template_args in specialisations(SOURCE_OF_KERNEL[kernel]):
            label = kernel + (
                "" if not template_args else f"<{', '.join(map(str, template_args))}>"
            )
            for dtype_name in DTYPES:
                for bits in INDEX_C_TYPES:
                    cells = [
                        _format_cell(_RESULTS.get((kernel, template_args, dtype_name, bits, a)))
                        for a in ARCHS
                    ]
                    lines.append(
                        f"| {label} | {dtype_name} | i{bits} | " + " | ".join(cells) + " |"
                    )
    lines.append("")
    lines.append(
        "Max registers per kernel (all dtypes, index widths, archs): "
        + ", ".join(
            f"{kernel} {max(r.registers or 0 for (k, *_), r in _RESULTS.items() if k == kernel)}"
            for kernel in SOURCE_OF_KERNEL
            if any(k == kernel for k, *_ in _RESULTS)
        )
        + "."
    )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _write_register_report():
    yield
    path = os.environ.get("CUPYDCN_REGISTER_REPORT")
    if path and _RESULTS:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(register_report())


# ---------------------------------------------------------------- parameter lists

_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(.*)$", re.MULTILINE)


def _source_parameters(source: str, kernel: str) -> tuple[str, ...]:
    """The parameter list of ``kernel`` as the source declares it, object-like macros
    expanded, normalised to KERNEL_PARAMETERS' spelling."""
    text = source.replace("\\\n", " ")  # line continuations
    macros = dict(_DEFINE.findall(text))
    match = re.search(rf"__global__\s+void\s+{kernel}\s*\(([^)]*)\)", text)
    assert match, f"no __global__ void {kernel}(...) in the source"
    params = match.group(1)
    for _ in range(8):  # macros may use macros
        params = re.sub(r"\b\w+\b", lambda m: macros.get(m.group(0), m.group(0)), params)
    normalised = []
    for item in params.split(","):
        item = item.replace("__restrict__", " ").replace("acc_t<T>", "A")
        item = re.sub(r"\s*\*\s*", "* ", " ".join(item.split()))
        normalised.append(item.strip())
    return tuple(normalised)


def test_kernel_parameters_declared_for_every_kernel():
    assert set(KERNEL_PARAMETERS) == set(SOURCE_OF_KERNEL)


@pytest.mark.parametrize("kernel", sorted(SOURCE_OF_KERNEL))
def test_kernel_parameters_match_source(kernel):
    """KERNEL_PARAMETERS, which the CUDA backends and the CuPy launcher order and check
    launch arguments by, is the parameter list of the .cu source: names, types, order."""
    declared = _source_parameters(module_source(SOURCE_OF_KERNEL[kernel]), kernel)
    assert tuple(map(parse_parameter, declared)) == kernel_parameters(kernel), (
        f"{kernel}: the source declares\n  {', '.join(declared)}\nKERNEL_PARAMETERS has\n  "
        + KERNEL_PARAMETERS[kernel]
    )


def test_source_parameters_expands_macros():
    source = (
        "#define SIZES_A I a, \\\n  I b\n#define SIZES SIZES_A, I c\n"
        "template <typename T, typename I>\n__global__ void k(const acc_t<T>* __restrict__ x,"
        "\n T *__restrict__ y, SIZES) {}\n"
    )
    assert _source_parameters(source, "k") == ("const A* x", "T* y", "I a", "I b", "I c")


# ---------------------------------------------------------------- CuPy's compiler path

CUPY_ARCH = "90"


def _cupy_compile(cupy_compiler, monkeypatch, source, options, name_expressions):
    """``cupy.cuda.compiler.compile_using_nvrtc`` for sm_90 without a GPU.

    In CuPy 14 ``compile_using_nvrtc`` turns ``arch`` into ``-arch=sm_XX`` through
    ``_get_arch_for_options_for_nvrtc``, which is memoised per device and so asks the
    runtime for the current device even when ``arch`` is given; with no driver that
    raises. That one lookup is replaced by what it returns for an explicit arch at or
    below NVRTC's newest (cubin output); everything else is CuPy's own code.
    """
    monkeypatch.setattr(
        cupy_compiler,
        "_get_arch_for_options_for_nvrtc",
        lambda arch=None: (f"-arch=sm_{arch}", "cubin"),
    )
    return cupy_compiler.compile_using_nvrtc(
        source,
        options=options,
        arch=CUPY_ARCH,
        name_expressions=name_expressions,
    )


@pytest.mark.parametrize(
    "source_file, dtype_name, index_bits",
    SPECS,
    ids=[f"{s.removesuffix('.cu')}-{d}-i{i}" for s, d, i in SPECS],
)
def test_cupy_compiler_accepts_source(monkeypatch, pch_root, source_file, dtype_name, index_bits):
    """The module source compiles through CuPy's NVRTC path with the options CuPy's
    RawModule would use (its include directories, and ``-ftz=true``, which CuPy adds to
    every RawModule build), and CuPy finds the same lowered names as our binding."""
    pytest.importorskip("cupy")
    from cupy._core.core import assemble_cupy_compiler_options
    from cupy.cuda import compiler

    options = tuple(assemble_cupy_compiler_options(tuple(NVRTC_OPTIONS))) + ("-ftz=true",)
    expressions = list(_all_expressions(source_file, dtype_name, index_bits))
    cubin, mapping = _cupy_compile(
        compiler, monkeypatch, module_source(source_file), options, expressions
    )
    assert cubin
    assert set(mapping) == set(expressions)

    ours = nvrtc_build.installed().get(compiler._get_nvrtc_version()[0])
    if ours is not None:
        result = ours.compile(
            module_source(source_file),
            expressions,
            CUPY_ARCH,
            _compile_options(ours, pch_root),
            program_name=source_file,
        )
        assert mapping == result.lowered_names


def _cupy_rawmodule_options(cupy_compiler, monkeypatch) -> tuple[str, ...]:
    """The NVRTC options of a RawModule(code, options=NVRTC_OPTIONS, name_expressions)
    build, as CuPy assembles them (cupy._core.core.compile_with_cache, the function
    RawModule compiles through). No GPU: the device's architecture is fixed at sm_90 and
    CuPy's NVRTC program is replaced by one that records its options and stops."""
    from cupy._core import core

    class Captured(Exception):
        pass

    class RecordingProgram:
        def __init__(self, source, *args, name_expressions=None, **kwargs):
            self.name_expressions = name_expressions

        def compile(self, options=(), log_stream=None):
            if not self.name_expressions:  # CuPy's preprocessing of an empty file
                return b"", {}
            raise Captured(tuple(options))

    monkeypatch.setenv("CUPY_CACHE_IN_MEMORY", "1")
    monkeypatch.setattr(cupy_compiler, "_get_arch", lambda: CUPY_ARCH)
    monkeypatch.setattr(
        cupy_compiler,
        "_get_arch_for_options_for_nvrtc",
        lambda arch=None: (f"-arch=sm_{arch}", "cubin"),
    )
    monkeypatch.setattr(cupy_compiler, "_NVRTCProgram", RecordingProgram)
    monkeypatch.setattr(cupy_compiler, "_empty_file_preprocess_cache", {})
    source = module_source("convert.cu")
    with pytest.raises(Captured) as captured:
        core.compile_with_cache(
            source,
            tuple(NVRTC_OPTIONS),
            prepend_cupy_headers=False,
            name_expressions=list(name_expressions("convert.cu", "float32", 32)),
        )
    return captured.value.args[0]


def test_build_options_are_cupys(monkeypatch):
    """The build tests compile with what CuPy's RawModule passes NVRTC, -ftz=true
    included (less the include directories, -arch and --pch, which they add per NVRTC)."""
    pytest.importorskip("cupy")
    from cupy.cuda import compiler

    options = _cupy_rawmodule_options(compiler, monkeypatch)
    relevant = tuple(
        o
        for o in options
        if not o.startswith(("-I", "--include-path", "-arch", "--gpu-architecture"))
        and o != "--pch"
    )
    assert relevant == RUNTIME_OPTIONS, (
        f"CuPy now compiles RawModules with {options}; update CUPY_ADDED_NVRTC_OPTIONS in "
        "cupydcn/cuda/kernel_source.py (and check what a new option means for the emulator)"
    )
