"""Group commit throughput of the store: commits/s with one committer vs many concurrent.

    python -m tests.bench.store_bench [--commits 5000] [--concurrency 50]

Each commit is what the engine writes for one state change: one event and one object put.
With one committer every commit is its own transaction; concurrent committers share
transactions, which is the point of group commit (most visible with synchronous=FULL,
where each transaction is an fsync).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from pathlib import Path

from rmgrpc.model import Event, EventKind
from rmgrpc.store import Store, Write

PAYLOAD = b"x" * 256


def write(revision: int) -> Write:
    event = Event(revision, EventKind.ALLOCATION, 2, f"a{revision}", time.time(), PAYLOAD, "org")
    return Write(events=[event], puts=[(EventKind.ALLOCATION, f"a{revision % 1000}", PAYLOAD)])


async def run(path: str, synchronous: str, commits: int, concurrency: int) -> tuple[float, int]:
    """Return (commits/s, transactions) for `commits` commits from `concurrency` tasks."""
    store = await Store.open(path, synchronous=synchronous)
    revisions = itertools.count(1)
    per_task = commits // concurrency

    async def committer() -> None:
        for _ in range(per_task):
            # Take the revision and submit with no await between: as the engine does.
            await store.submit(write(next(revisions)))

    try:
        start = time.perf_counter()
        await asyncio.gather(*(committer() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        return per_task * concurrency / elapsed, store.transactions_committed
    finally:
        await store.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--synchronous", default="NORMAL,FULL")
    args = parser.parse_args()
    print(f"{args.commits} commits (1 event + 1 put each)")
    print(f"{'synchronous':<12}{'committers':>11}{'commits/s':>12}{'transactions':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.synchronous.split(","):
            rates = []
            for concurrency in (1, args.concurrency):
                path = str(Path(tmp) / f"{mode}-{concurrency}.db")
                rate, txns = await run(path, mode, args.commits, concurrency)
                rates.append(rate)
                print(f"{mode:<12}{concurrency:>11}{rate:>12.0f}{txns:>14}")
            print(f"{mode:<12}{'ratio':>11}{rates[1] / rates[0]:>12.1f}x")


if __name__ == "__main__":
    asyncio.run(main())
