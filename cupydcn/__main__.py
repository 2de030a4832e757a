"""python -m cupydcn: the command line (cupydcn.cli.main)."""

import sys

from cupydcn.cli import main

if __name__ == "__main__":
    sys.exit(main())
