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


def _echo_once(port: int) -> bool:
    """One association + C-ECHO + release on a blocking socket; False if not (yet) accepted."""
    import socket
    import struct

    from dimse_async.acse import ContextSpec, build_request
    from dimse_async.dimse import Command, CommandField, encode_command
    from dimse_async.pdu import PDV, PDataTF, ReleaseRQ

    def read_pdu(sock: socket.socket) -> bytes:
        data = b""
        while len(data) < 6 or len(data) < 6 + struct.unpack(">I", data[2:6])[0]:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    rq = build_request("ANY-SCP", "BENCH", [ContextSpec(VERIFICATION, ["1.2.840.10008.1.2"])],
                       max_pdu=65536).encode()  # fmt: skip
    cmd = Command(CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid=VERIFICATION)
    try:
        with socket.create_connection((bs.HOST, port), timeout=10) as sock:
            sock.sendall(rq)
            if read_pdu(sock)[0] != 0x02:
                return False
            sock.sendall(PDataTF([PDV(1, True, True, encode_command(cmd))]).encode())
            if read_pdu(sock)[0] != 0x04:
                return False
            sock.sendall(ReleaseRQ().encode())
            read_pdu(sock)
            return True
    except OSError:
        return False


VERIFICATION = "1.2.840.10008.1.1"


def server_ready(argv: list[str], env: dict[str, str], runs: int, tmp: Path) -> dict[str, float]:
    """Wall time from starting a server process to its first accepted C-ECHO (its
    association, C-ECHO-RSP and release), best and median of ``runs`` fresh processes."""
    walls = []
    for n in range(runs):
        port = bs.free_port()
        out = tmp / f"srv{n}"
        full = [a.replace("{port}", str(port)).replace("{out}", str(out)) for a in argv]
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=NEUTRAL_CWD)  # fmt: skip
        try:
            deadline = t0 + 60
            while not _echo_once(port):
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise SystemExit(f"{' '.join(full)} did not answer a C-ECHO")
                time.sleep(0.002)
            walls.append(time.perf_counter() - t0)
        finally:
            bs.stop(proc)
    return {"wall_min_ms": min(walls) * 1e3, "wall_median_ms": statistics.median(walls) * 1e3}


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
    p.add_argument("--servers", action="store_true",
                   help="only the servers: wall time from start to the first accepted C-ECHO")  # fmt: skip
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
    if args.servers:
        servers = {
            "store-scp": [*cli, "store-scp", "--port", "{port}", "--out", "{out}"],
            "serve": [*cli, "serve", "--port", "{port}", "--storage-dir", "{out}"],
        }
        walls: dict[str, list[float]] = {name: [] for name in servers}
        with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
            for argv_ in servers.values():
                server_ready(argv_, env, 1, Path(tmp))  # .pyc files
            for _ in range(args.runs):  # the two alternating, one process each per round
                for name, argv_ in servers.items():
                    walls[name].append(server_ready(argv_, env, 1, Path(tmp))["wall_min_ms"])
        print(f"tree: {tree} (dimse_async loaded from {found})\n")
        print("| server: start to first accepted C-ECHO | wall best ms | wall median ms |")
        print("|---|---|---|")
        for name, ms in walls.items():
            print(f"| {name} | {min(ms):.0f} | {statistics.median(ms):.0f} |")
        return 0
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
