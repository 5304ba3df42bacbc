"""``python -m featcache.runtime.peak CMD ...``: run CMD and report what it cost.

Passes CMD's stdout through (and the tail of its stderr), then prints one
last line ``@@ WALL_SECONDS PEAK_MB STATUS``: the wall time, the peak
resident memory of the largest process CMD ran (this wrapper's children
only, so the measuring process itself is not counted) and CMD's exit status.
Benchmarks run each side under it, so every side is measured the same way.
"""

from __future__ import annotations

import subprocess
import sys
import time

from featcache.runtime.device import peak_children_mb


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr[-4000:])
    print("@@", time.perf_counter() - start, peak_children_mb(), proc.returncode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
