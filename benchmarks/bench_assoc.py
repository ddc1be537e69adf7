#!/usr/bin/env python3
"""Association rate: associate, C-ECHO, release, by 16 concurrent clients, for a while.

Servers, each fresh on 127.0.0.1:

* ``ours-info``: ``dimse-async echo-scp --log-level INFO`` (its log to a file): what an
  operator runs, one line per association;
* ``ours-warning``: the same with ``--log-level WARNING``;
* ``storescp``: DCMTK ``storescp -dhl`` (single process, TCP_NODELAY=1), which answers
  C-ECHO too.

Clients are raw sockets driven from protocol callbacks (``_Cycle``: a fixed
A-ASSOCIATE-RQ, one C-ECHO-RQ, A-RELEASE-RQ; no streams or tasks, so they cost little
CPU beside the server), 16 loops spread over ``--client-procs`` processes so that the clients are
not the limit, each loop from its own 127.x.y.z source address (so TIME_WAIT sockets of one
address do not slow the next connects). After a short warm-up every completed cycle within ``--seconds`` counts.

    python benchmarks/bench_assoc.py              # 5 s per server
    python benchmarks/bench_assoc.py --quick      # 2 s per server

Prints a markdown table (associations/s, p50/p95 of one cycle, server and clients' CPU
per association) and the ratios of ours over storescp (rate, server CPU); benchmarks/results/assoc.json.
Not a test: asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_store as bs  # noqa: E402

SERVERS = ("ours-info", "ours-warning", "storescp")


#: ``--before TREE``: the same servers from another source tree (``PYTHONPATH=TREE``).
BEFORE: dict[str, str] = {}


def server_argv(key: str, port: int, work: Path) -> tuple[list[str], dict[str, str]]:
    if key == "storescp":
        return [bs.STORESCP, "-dhl", "-aet", "BENCH", "-od", str(work), str(port)], bs._dcmtk_env()
    env = bs._py_env()
    if key.startswith("before-"):
        env["PYTHONPATH"] = BEFORE["tree"]
        key = "ours-" + key.removeprefix("before-")
    level = "INFO" if key == "ours-info" else "WARNING"
    argv = [sys.executable, "-m", "dimse_async", "echo-scp", "--host", bs.HOST, "--port", str(port), "--aet", "BENCH",
            "--log-level", level]  # fmt: skip
    return argv, env


# --------------------------------------------------------------------------- client process


class _Cycle(asyncio.Protocol):
    """One association, driven from the protocol callbacks (no streams, no tasks, so
    that the clients cost little beside the server): A-ASSOCIATE-RQ once connected,
    C-ECHO-RQ on the A-ASSOCIATE-AC, A-RELEASE-RQ on the C-ECHO-RSP, close on the
    A-RELEASE-RP. ``done`` gets ``True``, or an exception on anything else."""

    # PDU types expected in turn: A-ASSOCIATE-AC, P-DATA-TF, A-RELEASE-RP
    EXPECT = (0x02, 0x04, 0x06)

    def __init__(self, done: asyncio.Future[bool], rq: bytes, echo: bytes, release: bytes):
        self.done, self.buf, self.step = done, bytearray(), 0
        self.next = (echo, release, None)
        self.rq = rq
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.rq)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 6:
            end = 6 + int.from_bytes(buf[2:6], "big")
            if len(buf) < end:
                return
            kind = buf[0]
            del buf[:end]
            if self.step >= 3 or kind != self.EXPECT[self.step]:
                self._end(RuntimeError(f"unexpected PDU type {kind:#04x} at step {self.step}"))
                return
            out = self.next[self.step]
            self.step += 1
            if out is None:
                self._end(None)
                return
            self.transport.write(out)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed at step {self.step}: {exc}"))

    def _end(self, exc: Exception | None) -> None:
        self.transport.abort()  # type: ignore[union-attr]
        if not self.done.done():
            if exc is None:
                self.done.set_result(True)
            else:
                self.done.set_exception(exc)


async def _client_main(port: int, loops: int, warmup: float, seconds: float) -> dict[str, object]:
    from bench_idle import ECHO, RQ

    from dimse_async.pdu import ReleaseRQ

    release = ReleaseRQ().encode()
    cpu0 = os.times()
    loop = asyncio.get_running_loop()
    done: list[float] = []
    errors = 0
    start = time.perf_counter()
    t_begin, t_end = start + warmup, start + warmup + seconds

    async def cycle(source: str) -> None:
        finished: asyncio.Future[bool] = loop.create_future()
        transport, _ = await loop.create_connection(
            lambda: _Cycle(finished, RQ, ECHO, release), "127.0.0.1", port, local_addr=(source, 0)
        )
        try:
            await asyncio.wait_for(finished, 10)
        finally:
            transport.abort()

    async def run(source: str) -> None:
        nonlocal errors
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            try:
                await cycle(source)
            except Exception:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            t1 = time.perf_counter()
            if t0 >= t_begin and t1 <= t_end:
                done.append(t1 - t0)

    # each loop connects from its own loopback address: one address's ephemeral ports run
    # out in TIME_WAIT after a few seconds at thousands of associations per second, and
    # the rate then measures the client's port search, not the server
    tag = os.getpid() % 200 + 20
    await asyncio.gather(*(run(f"127.{tag}.{i // 200}.{i % 200 + 2}") for i in range(loops)))
    cpu = os.times()  # the cycles' CPU, not the interpreter's start-up and imports
    return {"latencies": done, "errors": errors, "cpu_s": cpu.user + cpu.system - cpu0.user - cpu0.system}


def client(argv: list[str]) -> int:
    port, loops, warmup, seconds, out = int(argv[0]), int(argv[1]), float(argv[2]), float(argv[3]), Path(argv[4])
    try:
        import uvloop

        result = uvloop.run(_client_main(port, loops, warmup, seconds))
    except ImportError:
        result = asyncio.run(_client_main(port, loops, warmup, seconds))
    # a file, not stdout: a fast run's latencies are several pipe buffers long
    out.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- one server


def measure(key: str, clients: int, procs: int, warmup: float, seconds: float) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"assoc-{key}-"))
    port = bs.free_port()
    argv, env = server_argv(key, port, work)
    server = None
    out: dict[str, object] = {"server": key}
    try:
        with open(work / "server.log", "wb") as log:
            server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work)
        bs.wait_listening(server, port, bs.READY_TIMEOUT, key)
        cpu0 = bs.proc_status(server.pid).get("cpu_s", 0.0)
        per = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        outs = [work / f"client-{i}.json" for i in range(len(per))]
        runners = [
            subprocess.Popen([sys.executable, __file__, "--client", str(port), str(n), str(warmup), str(seconds), str(o)],
                             env=bs._py_env())
            for n, o in zip(per, outs) if n
        ]  # fmt: skip
        for r in runners:
            r.wait(timeout=seconds + warmup + 60)
        results = [json.loads(o.read_text()) for n, o in zip(per, outs) if n]
        cpu1 = bs.proc_status(server.pid).get("cpu_s", 0.0)
        lat = sorted(x for r in results for x in r["latencies"])
        n = len(lat)
        out.update(
            associations=n,
            per_s=n / seconds,
            p50_ms=statistics.median(lat) * 1e3 if lat else None,
            p95_ms=lat[int(0.95 * (n - 1))] * 1e3 if lat else None,
            errors=sum(r["errors"] for r in results),
            # the server's CPU over warm-up + measured window, per association completed in all
            server_cpu_ms_per_assoc=(cpu1 - cpu0) * 1e3 / max(1, n) * seconds / (seconds + warmup),
            client_cpu_s=sum(r["cpu_s"] for r in results),
            # the clients' CPU over warm-up + measured window, the same way
            client_cpu_ms_per_assoc=sum(r["cpu_s"] for r in results) * 1e3 / max(1, n) * seconds / (seconds + warmup),
            log_bytes=(work / "server.log").stat().st_size,
        )
    finally:
        bs.stop(server)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--client":
        return client(argv[1:])
    p = argparse.ArgumentParser(description="association rate: associate, C-ECHO, release (benchmarks/README.md)")
    p.add_argument("--quick", action="store_true", help="2 s per server")
    p.add_argument("--seconds", type=float, help="measured seconds per server (default 5)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--repeat", type=int, default=1, help="runs per server, interleaved; the best counts")
    p.add_argument("--json", default=str(bs.RESULTS_DIR / "assoc.json"))
    p.add_argument("--before", metavar="TREE", help="also run before-info / before-warning: echo-scp from this source tree")
    args = p.parse_args(argv)
    servers = [k.strip() for k in args.servers.split(",")]
    if args.before:
        BEFORE["tree"] = str(Path(args.before).resolve())
        servers = [k for key in servers for k in ([key.replace("ours-", "before-"), key] if key.startswith("ours-") else [key])]
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    bs._warm_up()
    runs = []
    for _ in range(args.repeat):
        for key in servers:
            r = measure(key, args.clients, args.client_procs, 0.5, seconds)
            runs.append(r)
            print(f"{key}: {r.get('per_s', 0):.0f} associations/s", file=sys.stderr, flush=True)
    best: dict[str, dict[str, object]] = {}
    for r in runs:
        k = str(r["server"])
        if k not in best or float(r.get("per_s") or 0) > float(best[k].get("per_s") or 0):  # type: ignore[arg-type]
            best[k] = r
    print("| server | associations/s | p50 ms | p95 ms | server CPU ms/association | clients' CPU ms/association "
          "| errors | log bytes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for k, r in best.items():
        print(f"| {k} | {r['per_s']:.0f} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{r['server_cpu_ms_per_assoc']:.3f} | {r['client_cpu_ms_per_assoc']:.3f} | {r['errors']} | {r['log_bytes']} |")  # fmt: skip
    ratios: dict[str, float] = {}
    cpu_ratios: dict[str, float] = {}
    if "storescp" in best:
        print()
        for k in ("ours-info", "ours-warning", "before-info", "before-warning"):
            if k in best and best["storescp"].get("per_s"):
                ratios[k] = float(best[k]["per_s"]) / float(best["storescp"]["per_s"])  # type: ignore[arg-type]
                cpu_ratios[k] = float(best[k]["server_cpu_ms_per_assoc"]) / max(  # type: ignore[arg-type]
                    1e-9, float(best["storescp"]["server_cpu_ms_per_assoc"])  # type: ignore[arg-type]
                )
                print(f"{k} vs storescp: {ratios[k]:.2f}x associations/s, {cpu_ratios[k]:.2f}x server CPU per association")
    # On two cores the 16 client loops take CPU too: when the machine is saturated the rate
    # follows everyone's CPU per association, and the server's CPU per association is the
    # measure of the server (see benchmarks/README.md).
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": bs.environment(), "clients": args.clients, "seconds": seconds,
                                "runs": runs, "ratios": ratios, "server_cpu_ratios": cpu_ratios}, indent=2) + "\n")  # fmt: skip
    return 0 if all(not r.get("errors") for r in best.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
