"""Command line: ``python -m cupydcn check | bench | demo``."""

from __future__ import annotations

import argparse
import sys

# Commands that parse their own options (``python -m cupydcn bench --help``).
_PASS_THROUGH = ("bench", "demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cupydcn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check",
        help="report backends and devices; run every op forward and backward on each "
        "against the reference and print a table of errors and times",
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
    return 2  # argparse rejects unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
