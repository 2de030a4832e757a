"""``python -m cupydcn compile``: build the CUDA kernels into CuPy's on-disk cache ahead of
time (container images, CI), with :func:`cupydcn.precompile`, and print a table of the
modules with their compile times."""

from __future__ import annotations

import argparse
import sys
import time

from cupydcn.cli.options import fail

PROG = "python -m cupydcn compile"


def _parser() -> argparse.ArgumentParser:
    from cupydcn.core.dtypes import DTYPES, INDEX_C_TYPES
    from cupydcn.cuda.precompile import OPS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compile cupydcn's CUDA kernels into CuPy's kernel cache "
        "($CUPY_CACHE_DIR, default ~/.cupy/kernel_cache) so later runs load them without "
        "compiling. With --arch no GPU is needed. An entry is reused only with the same "
        "cupydcn kernels, CuPy, NVRTC version and architecture.",
    )
    parser.add_argument(
        "--ops",
        nargs="+",
        default=["all"],
        metavar="OP",
        help=f"ops to build: all (default) or some of {', '.join(OPS)}",
    )
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=["all"],
        metavar="DTYPE",
        help=f"dtypes: all (default) or some of {', '.join(DTYPES)}",
    )
    parser.add_argument(
        "--index-bits",
        nargs="+",
        default=["all"],
        metavar="BITS",
        help=f"index widths: all (default) or some of {', '.join(map(str, INDEX_C_TYPES))}",
    )
    parser.add_argument(
        "--arch",
        nargs="+",
        default=None,
        metavar="ARCH",
        help="target architectures, e.g. sm_90 sm_80 (default: the current GPU's; with "
        "--arch no GPU nor driver is needed)",
    )
    parser.add_argument(
        "--no-deterministic",
        action="store_true",
        help="skip the modules only the deterministic=True backward uses",
    )
    return parser


def _one(values: list[str]):
    return "all" if values == ["all"] else values


def run_compile(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from cupydcn.core.errors import CupydcnError
    from cupydcn.cuda.precompile import cache_dir, format_table, modules_for, precompile

    try:
        modules = modules_for(
            _one(args.ops), _one(args.dtypes), _one(args.index_bits), not args.no_deterministic
        )
    except CupydcnError as exc:
        return fail(PROG, str(exc))
    print(f"building {len(modules)} modules per architecture", flush=True)
    start = time.perf_counter()
    try:
        builds = precompile(
            _one(args.ops),
            _one(args.dtypes),
            _one(args.index_bits),
            arch=args.arch,
            deterministic=not args.no_deterministic,
        )
    except CupydcnError as exc:
        return fail(PROG, str(exc), code=1)
    total = time.perf_counter() - start
    print(format_table(builds))
    compiled = sum(not b.cached for b in builds)
    print(
        f"\n{compiled} compiled, {len(builds) - compiled} already cached, "
        f"{total:.1f} s in all; cache: {cache_dir()}"
    )
    sys.stdout.flush()
    return 0
