"""Command line: python -m cupydcn check | bench | demo | compile.

``main(argv)`` is the front end; each command lives in a module of its own here
(``check``, ``bench``, ``demo``, ``compile``), imported only when it runs.
"""

from __future__ import annotations

import argparse

from cupydcn import __version__

DESCRIPTION = "Command line of cupydcn: python -m cupydcn check | bench | demo | compile."

# Commands that parse their own options (python -m cupydcn bench --help).
_PASS_THROUGH = ("bench", "demo", "compile")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the command, return its
    exit code."""
    parser = argparse.ArgumentParser(prog="python -m cupydcn", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cupydcn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check",
        help="report backends and devices; run every op forward and backward on each, and "
        "through the PyTorch and JAX adapters, against the reference and print a table of "
        "errors and times",
        description="Find the backends and devices, run every op forward and backward on "
        "each against the float64 reference, and through the PyTorch and JAX adapters "
        "(when importable) against the functional API; print a table of errors and times.",
    )
    commands.add_parser(
        "bench",
        add_help=False,
        help="quick benchmark on the present device (CUDA kernels against torchvision and "
        "cuDNN when importable; the NumPy backend on scaled-down shapes on the CPU); "
        "options: python -m cupydcn bench --help",
    )
    commands.add_parser(
        "demo",
        add_help=False,
        help="train a tiny deformable network with cupydcn's explicit forward and backward "
        "(under a minute on a CPU) and write a PNG of its learned sampling locations; "
        "options: python -m cupydcn demo --help",
    )
    commands.add_parser(
        "compile",
        add_help=False,
        help="build the CUDA kernels into CuPy's kernel cache ahead of time (no GPU needed "
        "with --arch); options: python -m cupydcn compile --help",
    )
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in _PASS_THROUGH:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "check":
        from cupydcn.cli.check import run_check

        return run_check()
    if args.command == "bench":
        from cupydcn.cli.bench import run_bench

        return run_bench(rest)
    if args.command == "demo":
        from cupydcn.cli.demo import run_demo

        return run_demo(rest)
    if args.command == "compile":
        from cupydcn.cli.compile import run_compile

        return run_compile(rest)
    return 2  # argparse rejects unknown commands before this
