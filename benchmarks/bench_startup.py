#!/usr/bin/env python3
"""Start-up of ``dimse-async``: what a short run costs before and around its work.

Times, each the best and the median of ``--runs`` fresh processes (wall and CPU):

* ``python -c pass``: the interpreter alone (the floor);
* ``dimse-async --version`` and ``dimse-async send --version``: parsing only;
* ``dimse-async send`` of one ~39 KB instance to DCMTK ``storescp``, and the same with
  ``/usr/bin/storescu`` (TCP_NODELAY=1);

and lists what a one-instance send imports (``python -X importtime``): the heaviest
modules and the share of this package's own. ``--tree DIR`` measures another checkout
(its ``dimse_async`` directory is put first on PYTHONPATH), e.g. the tree before a change.
Byte-compiled files are written first and used (as an installed package has them).

    python benchmarks/bench_startup.py
    python benchmarks/bench_startup.py --tree /tmp/before --runs 20

Not a test: prints a markdown table, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_store as bs  # noqa: E402

#: Commands run from here, so that ``python -m dimse_async`` finds the tree on PYTHONPATH
#: and not a checkout in the current directory.
NEUTRAL_CWD = tempfile.gettempdir()


def timed(argv: list[str], env: dict[str, str], runs: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        res = subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60, cwd=NEUTRAL_CWD
        )
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {res.stderr.decode(errors='replace')[-400:]}")
    return {
        "wall_min_ms": min(walls) * 1e3,
        "wall_median_ms": statistics.median(walls) * 1e3,
        "cpu_min_ms": min(cpus) * 1e3,
        "cpu_median_ms": statistics.median(cpus) * 1e3,
    }


def import_profile(argv: list[str], env: dict[str, str]) -> tuple[float, float, list[tuple[float, str]]]:
    """(all imports ms, this package's own ms, heaviest modules) from -X importtime (self times)."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", *argv], env=env, capture_output=True, text=True, cwd=NEUTRAL_CWD
    )
    rows = []
    for line in res.stderr.splitlines():
        if line.startswith("import time:") and "cumulative" not in line:
            parts = line.split("|")
            rows.append((int(parts[0].split(":")[1]) / 1e3, parts[2].strip()))
    total = sum(ms for ms, _ in rows)
    own = sum(ms for ms, name in rows if name.startswith("dimse_async"))
    return total, own, sorted(rows, reverse=True)[:12]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="start-up of dimse-async (benchmarks/README.md)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--tree", help="a checkout whose dimse_async to measure (default: this one)")
    p.add_argument("--json", default=str(bs.RESULTS_DIR / "startup.json"))
    args = p.parse_args(argv)
    tree = Path(args.tree).resolve() if args.tree else HERE.parent
    env = bs._py_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cli = [sys.executable, "-m", "dimse_async"]
    # write the .pyc files (an installed package has them)
    subprocess.run([*cli, "--help"], env=env, stdout=subprocess.DEVNULL, check=False, cwd=NEUTRAL_CWD)
    subprocess.run([sys.executable, "-c", "import dimse_async.cli, dimse_async.ae, dimse_async.services.send"],
                   env=env, check=False, cwd=NEUTRAL_CWD)  # fmt: skip
    found = subprocess.run([sys.executable, "-c", "import dimse_async; print(dimse_async.__file__)"], env=env,
                           capture_output=True, text=True, cwd=NEUTRAL_CWD).stdout.strip()  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        wl = bs.make_small(Path(tmp) / "in", 1)
        (one,) = sorted(str(f) for f in wl.directory.iterdir())
        out = Path(tmp) / "out"
        out.mkdir()
        port = bs.free_port()
        scp = subprocess.Popen(bs._storescp(port, out, None), env=bs._dcmtk_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            bs.wait_listening(scp, port, bs.READY_TIMEOUT, "storescp")
            send = [*cli, "send", bs.HOST, str(port), one, "--aec", bs.SCP_AET]
            rows["python -c pass"] = timed([sys.executable, "-c", "pass"], env, args.runs)
            rows["dimse-async --version"] = timed([*cli, "--version"], env, args.runs)
            rows["dimse-async send --version"] = timed([*cli, "send", "--version"], env, args.runs)
            rows["dimse-async send, 1 instance -> storescp"] = timed(send, env, args.runs)
            rows["storescu, 1 instance -> storescp"] = timed(
                [bs.STORESCU, "-aec", bs.SCP_AET, bs.HOST, str(port), one], bs._dcmtk_env(), args.runs
            )
            total, own, heavy = import_profile(send[1:], env)
        finally:
            bs.stop(scp)
    print(f"tree: {tree} (dimse_async loaded from {found})\n")
    print("| run | wall best ms | wall median ms | CPU best ms | CPU median ms |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_min_ms']:.0f} | {r['wall_median_ms']:.0f} | {r['cpu_min_ms']:.0f} "
              f"| {r['cpu_median_ms']:.0f} |")  # fmt: skip
    print(f"\nimports of a one-instance send (-X importtime self times): {total:.0f} ms in all, "
          f"{own:.0f} ms in dimse_async; heaviest:")  # fmt: skip
    for ms, name in heavy:
        print(f"  {ms:6.1f} ms  {name}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tree": str(tree), "environment": bs.environment(), "runs": rows,
                                "imports_ms": total, "own_imports_ms": own}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
