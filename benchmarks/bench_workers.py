"""8 concurrent DCMTK storescu into one receiver: ``store-scp --workers 2`` vs
``--workers 1`` vs DCMTK ``storescp --fork -pdu 131072 +B -dhl``, and the archive
``serve`` (which indexes every instance) with its SQLite index and with a PostgreSQL
index, one and two workers.

Reports wall time, throughput and the receiver's CPU seconds per instance (the parent
and all its worker or forked processes, reaped ones included) and, for PostgreSQL, the
database server's CPU per instance beside it. PostgreSQL: ``--postgresql URL`` of a
server you run, else a throw-away cluster is started from Debian's ``postgresql``
package (``initdb`` / ``pg_ctl``, as an unprivileged user when run as root), with
``fsync`` on like the SQLite index. Standalone: measures, asserts nothing.
``python benchmarks/bench_workers.py [--senders 8] [--files 100] [--only serve]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_files(base: Path, senders: int, per_sender: int) -> list[Path]:
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    dirs = []
    for s in range(senders):
        d = base / f"s{s}"
        d.mkdir()
        for i in range(per_sender):
            uid = generate_uid()
            src.SOPInstanceUID = uid
            src.file_meta.MediaStorageSOPInstanceUID = uid
            src.save_as(d / f"{i}.dcm", enforce_file_format=True)
        dirs.append(d)
    return dirs


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def receiver_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


LISTENING = re.compile(r"listening on [^ ]*:(\d+)")


def announced_port(recv: subprocess.Popen[bytes], timeout: float = 120) -> int:
    """The port in the receiver's ``listening on host:port`` line, which ``--workers N``
    prints only once every worker listens (before that, a start-up placeholder answers
    A-ASSOCIATE-RJ rejected-transient: senders started then would fail). Its stdout is
    drained in a thread from then on."""
    assert recv.stdout is not None
    lines: queue.Queue[bytes | None] = queue.Queue()

    def pump() -> None:
        assert recv.stdout is not None
        for line in recv.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        if found := LISTENING.search(line.decode(errors="replace")):
            return int(found.group(1))
    raise RuntimeError(f"the receiver never announced its port (exit code {recv.poll()})")


def failure(log: Path) -> str:
    """A failed storescu's reason: its first error lines (``F:`` / ``E:``)."""
    errors = [ln[3:].strip() for ln in log.read_text(errors="replace").splitlines() if ln[:2] in ("F:", "E:")]
    return " ".join(errors[:3]) or "no error output"


def run(
    name: str, command: list[str], port: int | None, dirs: list[Path], database: psutil.Process | None = None
) -> dict[str, object]:
    """``port``: DCMTK's fixed port; ``None`` for ours, started on port 0 (no free-port race
    with other programs), the port taken from their announcement."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    logs = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    recv_log = (logs / "receiver.log").open("wb")
    ours = port is None
    recv = subprocess.Popen(command, stdout=subprocess.PIPE if ours else subprocess.DEVNULL, stderr=recv_log, env=env)
    try:
        if port is None:
            port = announced_port(recv)
        else:
            wait_port(port)
            time.sleep(1)
        if recv.poll() is not None:
            raise RuntimeError(f"{name}: the receiver exited ({recv.returncode}); see {logs / 'receiver.log'}")
        ps = psutil.Process(recv.pid)
        cpu0 = receiver_cpu(ps)
        db0 = receiver_cpu(database) if database is not None else 0.0
        start = time.monotonic()
        sender_logs = [logs / f"sender{i}.log" for i in range(len(dirs))]
        senders = []
        for d, log in zip(dirs, sender_logs):
            with log.open("wb") as out:
                argv = ["/usr/bin/storescu", "-aec", "ANY-SCP", "+sd", "-pdu", "131072", "127.0.0.1", str(port), str(d)]
                senders.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        codes = [s.wait(600) for s in senders]
        seconds = time.monotonic() - start
        time.sleep(0.5)  # forked storescp children finish and are reaped
        cpu = receiver_cpu(ps) - cpu0
        db = receiver_cpu(database) - db0 if database is not None else float("nan")
    finally:
        recv.terminate()
        try:
            recv.wait(60)
        except subprocess.TimeoutExpired:
            recv.kill()
            recv.wait()
        recv_log.close()
    failed = [f"sender {i} exit {c}: {failure(log)}" for i, (c, log) in enumerate(zip(codes, sender_logs)) if c != 0]
    if failed:
        print(f"{name}: {len(failed)} of {len(codes)} senders failed (logs in {logs})", file=sys.stderr)
        for line in failed:
            print("  " + line, file=sys.stderr)
    else:
        shutil.rmtree(logs, ignore_errors=True)
    n = sum(len(list(d.iterdir())) for d in dirs)
    size = sum(f.stat().st_size for d in dirs for f in d.iterdir())
    return {
        "name": name,
        "failed": failed,
        "seconds": seconds,
        "instances/s": n / seconds,
        "MB/s": size / seconds / 1e6,
        "cpu ms/instance": cpu / n * 1000,
        "db ms/instance": db / n * 1000,
    }


PG_USER = "dimsepg"


@contextlib.contextmanager
def postgresql_cluster() -> Iterator[tuple[str, psutil.Process] | None]:
    """A throw-away PostgreSQL server on a free loopback port: (URL, postmaster); ``None``
    when Debian's PostgreSQL is not installed."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        yield None
        return
    bin_dir = found[-1].parent
    base = Path(tempfile.mkdtemp(prefix="bench-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        if subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--system", "--no-create-home", PG_USER], check=True)
        shutil.chown(base, PG_USER)
        as_user = ["runuser", "-u", PG_USER, "--"]
    port = free_port()
    data = base / "data"
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                        "--encoding=UTF8", "--locale=C.UTF-8"], check=True, capture_output=True)  # fmt: skip
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} -c max_connections=200"
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                        options, "start"], check=True, capture_output=True)  # fmt: skip
        pid = int((data / "postmaster.pid").read_text().split()[0])
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", psutil.Process(pid)
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """``CREATE DATABASE name`` on the server at ``url``; the new database's URL."""
    import asyncio

    import asyncpg  # type: ignore[import-untyped]

    async def create() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name}")
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return url.rsplit("/", 1)[0] + "/" + name


def database_process(url: str) -> psutil.Process | None:
    """The postmaster of a server on this machine listening on ``url``'s port, if found."""
    port = int(url.split("@")[-1].split("/")[0].rsplit(":", 1)[-1]) if ":" in url.split("@")[-1] else 5432
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return psutil.Process(conn.pid)
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--files", type=int, default=100, help="instances per sender")
    ap.add_argument("--only", choices=["store-scp", "serve", "storescp"], action="append",
                    help="run only these receivers (repeatable; default all)")  # fmt: skip
    ap.add_argument("--postgresql", metavar="URL", help="a PostgreSQL server to use (default: start one)")
    args = ap.parse_args()
    only = set(args.only or ["store-scp", "serve", "storescp"])
    results = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        dirs = make_files(base, args.senders, args.files)
        if "store-scp" in only:
            for workers, durable in ((1, False), (2, False), (1, True)):  # --durable: fsync, group commit
                name = f"store-scp --workers {workers}" + (" --durable" if durable else "")
                out = base / name.replace(" ", "_")
                cmd = [sys.executable, "-m", "dimse_async", "store-scp", "--any-called-ae", "--port", "0"]
                cmd += ["--out", str(out), "--log-level", "WARNING", "--workers", str(workers)]
                cmd += ["--durable"] if durable else []
                results.append(run(name, cmd, None, dirs))
        if "serve" in only:
            server: tuple[str, psutil.Process | None] | None
            if args.postgresql:
                server = (args.postgresql, database_process(args.postgresql))
            else:
                server = stack.enter_context(postgresql_cluster())
            for index in ("sqlite", "postgresql"):
                if index == "postgresql" and server is None:
                    print("PostgreSQL not installed: serve on PostgreSQL skipped", file=sys.stderr)
                    continue
                for workers in (1, 2):
                    name = f"serve {index} --workers {workers}"
                    cmd = [sys.executable, "-m", "dimse_async", "serve", "--port", "0", "--log-level", "WARNING",
                           "--storage-dir", str(base / name.replace(" ", "_")), "--workers", str(workers)]  # fmt: skip
                    database = None
                    if index == "postgresql":
                        assert server is not None
                        cmd += ["--index", fresh_database(server[0], f"bench_{workers}")]
                        database = server[1]
                    results.append(run(name, cmd, None, dirs, database))
        if "storescp" in only:
            port = free_port()
            out = base / "storescp"
            out.mkdir()
            cmd = ["/usr/bin/storescp", "--fork", "-pdu", "131072", "+B", "-dhl", "-od", str(out), str(port)]
            results.append(run("storescp --fork", cmd, port, dirs))
    cpus = os.cpu_count()
    print(f"{args.senders} concurrent storescu x {args.files} instances (~39 KB each); {cpus} CPUs shared with senders")
    print()
    print("| receiver | ok | seconds | instances/s | MB/s | receiver CPU ms/instance | PostgreSQL CPU ms/instance |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        db = float(r["db ms/instance"])  # type: ignore[arg-type]
        failed: list[str] = r["failed"]  # type: ignore[assignment]
        ok = "yes" if not failed else f"NO: {len(failed)} of {args.senders} senders failed"
        print(
            f"| `{r['name']}` | {ok} | {r['seconds']:.2f} | {r['instances/s']:.1f} | "
            f"{r['MB/s']:.1f} | {r['cpu ms/instance']:.2f} | {'' if db != db else f'{db:.2f}'} |"
        )
    failures = [f"- `{r['name']}`: {why}" for r in results for why in r["failed"]]  # type: ignore[attr-defined]
    if failures:
        print()
        print("\n".join(failures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
