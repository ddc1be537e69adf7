#!/usr/bin/env python3
"""The event loop's stall that ``serve``'s first C-STORE and C-FIND cause.

Runs ``dimse-async serve`` (an empty archive, in a temporary directory) with a probe task
on its event loop that wakes every 5 ms and records how late it woke; sends one C-STORE
(DCMTK storescu) ``--delay`` seconds after the port listens, then a C-FIND (findscu),
and prints the largest lateness seen from the store's start to the find's end (and the
clients' wall times). ``--tree DIR`` runs another checkout (e.g. the tree before a
change). Alternate trees and repeat: the machine's load shows in every number.

    python benchmarks/bench_first_store.py --runs 5 --delay 0 --delay 1
    python benchmarks/bench_first_store.py --tree /tmp/before --runs 5

Not a test: prints a markdown table, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Runs in the ``serve`` process: wraps ``serve`` with a lag probe; prints the lateness
#: of each wake-up (ms) with its time to $LAG_LOG at exit.
PROBE = r"""
import asyncio, atexit, os, sys, time
import dimse_async.archive.serve as s
log = open(os.environ["LAG_LOG"], "w")
samples = []
atexit.register(lambda: (log.write("\n".join(f"{t:.4f} {lag:.2f}" for t, lag in samples)), log.close()))
original = s.serve
async def probe():
    while True:
        t = time.monotonic()
        await asyncio.sleep(0.005)
        samples.append((time.monotonic(), (time.monotonic() - t - 0.005) * 1000))
async def serve(args):
    task = asyncio.ensure_future(probe())
    try:
        return await original(args)
    finally:
        task.cancel()
s.serve = serve
from dimse_async.cli import console
sys.argv = ["dimse-async", *sys.argv[1:]]
sys.exit(console())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one(tree: Path, delay: float, instance: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port, lag = free_port(), Path(tmp) / "lag"
        env = {**os.environ, "PYTHONPATH": str(tree), "LAG_LOG": str(lag)}
        argv = [sys.executable, "-c", PROBE, "serve", "--port", str(port), "--aet", "ARCHIVE",
                "--storage-dir", str(Path(tmp) / "archive")]  # fmt: skip
        proc = subprocess.Popen(argv, env=env, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening" in line, line
            time.sleep(delay)
            t0 = time.monotonic()
            subprocess.run(["/usr/bin/storescu", "-aec", "ARCHIVE", "127.0.0.1", str(port), str(instance)],
                           check=True, timeout=60)  # fmt: skip
            t1 = time.monotonic()
            subprocess.run(["/usr/bin/findscu", "-S", "-aec", "ARCHIVE", "-k", "QueryRetrieveLevel=STUDY", "-k",
                            "StudyInstanceUID", "127.0.0.1", str(port)], check=True, timeout=60, capture_output=True)  # fmt: skip
            t2 = time.monotonic()
        finally:
            proc.terminate()
            proc.wait(30)
        window = [
            ms for t, ms in (map(float, row.split()) for row in lag.read_text().splitlines()) if t0 <= t <= t2 + 0.05
        ]
        return {"stall": max(window, default=0.0), "store": (t1 - t0) * 1000, "find": (t2 - t1) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=HERE.parent)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--delay", type=float, action="append", help="seconds from listening to the C-STORE")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent / "tests"))
    from test_interop_tls import make_instances

    with tempfile.TemporaryDirectory() as tmp:
        (instance,) = make_instances(Path(tmp), 1)
        print(
            f"tree {args.tree}\n\n| delay s | loop stall ms (max, median of runs) | C-STORE ms | C-FIND ms |\n|---|---|---|---|"
        )
        for delay in args.delay or [0.0, 1.0]:
            rows = [one(args.tree, delay, instance) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(
                f"| {delay} | {max(r['stall'] for r in rows):.0f}, {med['stall']:.0f} | {med['store']:.0f} | {med['find']:.0f} |"
            )
            print(json.dumps(rows), file=sys.stderr)


if __name__ == "__main__":
    main()
