"""Idle associations: what holding 1k / 5k / 10k open associations costs a server.

For each server and each N, this script starts a fresh server on 127.0.0.1, opens N
associations (raw sockets, Verification only, from 127.0.0.1-127.0.0.4) and leaves
them idle, then measures:

- memory per association: the server's RSS growth / N (for DCMTK ``storescp --fork``,
  which runs one process per association, the growth of the PSS summed over the
  parent and its children, read from /proc/<pid>/smaps_rollup);
- idle CPU: CPU seconds the server (and its children) use over ``--idle`` seconds, as
  a percentage of one core;
- echo latency: median / p95 round trip of a C-ECHO on 50 of the open associations;
- new-association cost: median / p95 wall time of 50 fresh associate + release
  round trips from another address while the N stay open.

Servers, side by side: ``dimse-async echo-scp`` (ours), DCMTK ``storescp --fork``
(a process per association) and DCMTK ``storescp`` without ``--fork``, which serves one
association at a time: of the N it answers one A-ASSOCIATE-RQ (the others wait 5 s and
give up), so its row shows how many were associated, its memory and idle CPU with the N
connections made, the C-ECHO on the one it serves, and whether a new association gets
an A-ASSOCIATE-AC within 5 s while that one stays open.

    python benchmarks/bench_idle.py                        # 1000 5000 10000, all servers
    python benchmarks/bench_idle.py --counts 1000 --servers ours
    python benchmarks/bench_idle.py --quick                # 200 associations, 2 idle seconds

Prints one JSON line per measurement, then a markdown table of all of them.

Raises the soft RLIMIT_NOFILE to the hard limit (it needs N + a few hundred
descriptors in this process and in the server).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dimse_async.acse import ContextSpec, build_request  # noqa: E402
from dimse_async.dimse import Command, CommandField, encode_command  # noqa: E402
from dimse_async.pdu import PDV, PDataTF, ReleaseRQ  # noqa: E402

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
SOURCES = ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"]
PROBE_SOURCE = "127.0.0.9"


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RQ = build_request("IDLE", "BENCH", [ContextSpec(VERIFICATION, [IMPLICIT_LE])], max_pdu=16384).encode()
ECHO = PDataTF(
    [PDV(1, True, True, encode_command(Command(CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid=VERIFICATION)))]
).encode()


async def read_pdu(reader: asyncio.StreamReader) -> bytes:
    header = await reader.readexactly(6)
    (length,) = struct.unpack(">I", header[2:])
    return header + await reader.readexactly(length)


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str, timeout: float = 30.0) -> Conn:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), timeout
        )
        conn = cls(reader, writer)
        writer.write(RQ)
        reply = await asyncio.wait_for(read_pdu(reader), timeout)
        if reply[0] != 0x02:
            writer.close()
            raise RuntimeError(f"association refused: {reply.hex()}")
        return conn

    async def echo(self) -> float:
        start = time.perf_counter()
        self.writer.write(ECHO)
        reply = await asyncio.wait_for(read_pdu(self.reader), 30)
        assert reply[0] == 0x04, reply
        return time.perf_counter() - start

    async def release(self) -> None:
        self.writer.write(ReleaseRQ().encode())
        with contextlib.suppress(Exception):
            await asyncio.wait_for(read_pdu(self.reader), 10)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree(proc: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [proc, *proc.children(recursive=True)]
    return [proc]


def memory_bytes(proc: psutil.Process, per_process_pss: bool) -> int:
    if per_process_pss:
        return sum(pss_kib(p.pid) for p in tree(proc)) * 1024
    return int(proc.memory_info().rss)


def cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of the server's processes: every thread's exact time on a CPU from
    ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds; 10 ms clock ticks from
    ``cpu_times`` were too coarse for 500 new associations)."""
    total = 0.0
    for p in tree(proc):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):  # a thread gone meanwhile
                    total += int(Path(f"/proc/{p.pid}/task/{tid}/schedstat").read_text().split()[0]) / 1e9
    return total


def start_server(kind: str, port: int, workdir: Path, n: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if kind == "ours":
        argv = [
            sys.executable, "-m", "dimse_async", "echo-scp", "--host", "127.0.0.1", "--port", str(port),
            "--aet", "IDLE", "--max-associations", str(n + 100), "--log-level", "ERROR",
        ]  # fmt: skip
        argv += _admission_flags(n)
    elif kind == "dcmtk-fork":
        argv = ["/usr/bin/storescp", "--fork", "-od", str(workdir), "-aet", "IDLE", "-ta", "3600", "-ts", "0", str(port)]
    else:
        argv = ["/usr/bin/storescp", "-od", str(workdir), "-aet", "IDLE", str(port)]
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _admission_flags(n: int) -> list[str]:
    """Lift the per-address / per-AE / pending caps when this version has them."""
    help_text = subprocess.run(
        [sys.executable, "-m", "dimse_async", "echo-scp", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    ).stdout
    flags = []
    for flag in ("--max-per-address", "--max-per-calling-ae", "--max-pending"):
        if flag in help_text:
            flags += [flag, str(n + 100)]
    return flags


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not listen")


def stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class _PortTaken(RuntimeError):
    """The server could not listen: its port was taken meanwhile (a port in TIME_WAIT
    after thousands of connections, or another program)."""


async def measure(kind: str, n: int, idle: float) -> dict[str, object]:
    """:func:`_measure_once`, on another free port when the one picked was taken."""
    for _ in range(2):
        with contextlib.suppress(_PortTaken):
            return await _measure_once(kind, n, idle)
    return await _measure_once(kind, n, idle)


async def _measure_once(kind: str, n: int, idle: float) -> dict[str, object]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(kind, port, Path(tmp), n)
        conns: list[Conn] = []
        try:
            try:
                wait_port(port, proc)
            except RuntimeError as exc:
                log = (Path(tmp) / "server.log").read_text(errors="replace")[-2000:]
                error = _PortTaken if "Address already in use" in log else RuntimeError
                raise error(f"{kind} n={n}: {exc}\n{log}") from None
            ps = psutil.Process(proc.pid)
            per_process = kind == "dcmtk-fork"
            await asyncio.sleep(0.5)
            base_mem = memory_bytes(ps, per_process)
            start = time.perf_counter()
            serial = kind == "dcmtk"  # one association at a time: the rest wait 5 s at once
            sem = asyncio.Semaphore(n if serial else 64)

            async def one(i: int) -> Conn | None:
                async with sem:
                    try:
                        return await Conn.open(port, SOURCES[i % len(SOURCES)], timeout=5 if serial else 60)
                    except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError):
                        return None

            results = await asyncio.gather(*(one(i) for i in range(n)))
            conns = [c for c in results if c is not None]
            open_seconds = time.perf_counter() - start
            out: dict[str, object] = {"server": kind, "n": n, "associated": len(conns), "open_s": round(open_seconds, 2)}
            await asyncio.sleep(2.0)  # let allocations settle
            mem = memory_bytes(ps, per_process)
            out["mem_total_mib"] = round(mem / 2**20, 1)
            if conns:
                out["mem_per_assoc_kib"] = round((mem - base_mem) / len(conns) / 1024, 1)
            cpu0 = cpu_seconds(ps)
            await asyncio.sleep(idle)
            out["idle_cpu_pct"] = round(100 * (cpu_seconds(ps) - cpu0) / idle, 2)
            if not conns and n:
                return out
            if conns:
                probes = conns[:: max(1, len(conns) // 50)][:50]
                latencies = [await c.echo() for c in probes]
                out["echo_ms_median"] = round(1000 * statistics.median(latencies), 2)
                out["echo_ms_p95"] = round(1000 * pct(latencies, 0.95), 2)
            fresh = []
            tries = 3 if serial else NEW_ASSOCIATIONS
            cpu0 = cpu_seconds(ps)
            for _ in range(tries):
                t0 = time.perf_counter()
                try:
                    c = await Conn.open(port, PROBE_SOURCE, timeout=5 if serial else 30)
                except (OSError, RuntimeError, TimeoutError, asyncio.IncompleteReadError):
                    continue  # no A-ASSOCIATE-AC while the N stay open
                await c.release()
                fresh.append(time.perf_counter() - t0)
            out["new_assoc_ok"] = f"{len(fresh)}/{tries}"
            if fresh:
                # The server's CPU per new association (associate + release), less
                # disturbed by other load than the latencies.
                out["new_assoc_cpu_ms"] = round(1000 * (cpu_seconds(ps) - cpu0) / len(fresh), 3)
                out["new_assoc_ms_median"] = round(1000 * statistics.median(fresh), 2)
                out["new_assoc_ms_p95"] = round(1000 * pct(fresh, 0.95), 2)
            return out
        finally:
            for c in conns:
                c.close()
            stop(proc)


NEW_ASSOCIATIONS = 500  # associate + release round trips measured beside the idle ones


def _append(path: str, row: dict[str, object]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 5000, 10000])
    parser.add_argument("--servers", nargs="+", default=["ours", "dcmtk-fork", "dcmtk"])
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "idle.jsonl"))
    parser.add_argument("--quick", action="store_true", help="200 associations, 2 idle seconds")
    args = parser.parse_args()
    if args.quick:
        args.counts, args.idle = [200], 2.0
    limit = raise_nofile()
    print(f"RLIMIT_NOFILE soft limit {limit}", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.counts:
        for kind in args.servers:
            if n + 200 > limit:
                print(f"skipping {kind} n={n}: RLIMIT_NOFILE {limit} too low", file=sys.stderr)
                continue
            row = await measure(kind, n, args.idle)
            print(json.dumps(row), flush=True)
            _append(args.out, row)
            rows.append(row)
    print()
    print(markdown(rows))


NAMES = {"ours": "dimse-async echo-scp", "dcmtk-fork": "DCMTK storescp --fork", "dcmtk": "DCMTK storescp"}


def markdown(rows: list[dict[str, object]]) -> str:
    """The measurements side by side, one row per server and N."""
    lines = [
        "| server | N | associated | open all (s) | memory / association | idle CPU | "
        "C-ECHO median / p95 (ms) | new association with N open: ok, median / p95 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = f"{r.get('mem_per_assoc_kib', '-')} KiB ({r['mem_total_mib']} MiB in all)" if "mem_total_mib" in r else "-"
        echo = f"{r['echo_ms_median']} / {r['echo_ms_p95']}" if "echo_ms_median" in r else "-"
        new = str(r.get("new_assoc_ok", "-"))
        if "new_assoc_ms_median" in r:
            new += f", {r['new_assoc_ms_median']} / {r['new_assoc_ms_p95']}"
        cpu = f"{r['idle_cpu_pct']} %" if "idle_cpu_pct" in r else "-"
        name = NAMES.get(str(r["server"]), str(r["server"]))
        lines.append(f"| {name} | {r['n']:,} | {r['associated']:,} | {r['open_s']} | {per} | {cpu} | {echo} | {new} |")
    return "\n".join(lines)


if __name__ == "__main__":
    asyncio.run(main())
