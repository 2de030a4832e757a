"""Command line: ``python -m cupydcn check``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cupydcn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "check",
        help="report backends and devices; run every op forward and backward on each "
        "against the reference and print a table of errors and times",
    )
    args = parser.parse_args(argv)
    if args.command == "check":
        from ._check import run_check

        return run_check()
    return 2  # argparse rejects unknown commands before this


if __name__ == "__main__":
    sys.exit(main())
