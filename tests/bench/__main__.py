"""`make bench`: every benchmark in turn, or those named (`make bench ARGS="store watch"`).

Arguments after `--` go to each benchmark named: `make bench ARGS="load -- --fill store"`.

Each prints its figures next to a baseline measured in the same run, since these
machines are too noisy for absolute numbers to mean much.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import rmgrpc

BENCHMARKS = {
    "scheduler": "tests.bench.scheduler_bench",
    "store": "tests.bench.store_bench",
    "watch": "tests.bench.watch_bench",
    "rpc": "tests.bench.rpc_bench",
    "load": "tests.bench.load_bench",
    "telemetry": "tests.bench.telemetry_bench",
    "estimate": "tests.bench.estimate_bench",
}


def main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    names = argv or list(BENCHMARKS)
    # Which tree is measured matters when comparing before/after checkouts.
    print(f"rmgrpc from {Path(rmgrpc.__file__).parent}")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
        return 2
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        sys.argv = [BENCHMARKS[name], *extra]
        runpy.run_module(BENCHMARKS[name], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
