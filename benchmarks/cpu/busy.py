"""A bounded background spinner: "the machine busy" for the CPU benchmarks.

``Spinner`` starts one process that spins on the CPU (pure Python, no BLAS) until it is
stopped or its time limit passes, whichever comes first, so a crashed harness never leaves
it behind.
"""

from __future__ import annotations

import subprocess
import sys
import time

_SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


class Spinner:
    """Context manager: one process spinning for at most ``limit_s`` seconds."""

    def __init__(self, limit_s: float = 600.0):
        self.limit_s = float(limit_s)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Spinner:
        self.process = subprocess.Popen([sys.executable, "-c", _SPIN.format(limit=self.limit_s)])
        time.sleep(0.2)  # let it reach the loop
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
