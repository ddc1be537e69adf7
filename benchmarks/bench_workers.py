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
``python benchmarks/bench_workers.py [--senders 8] [--files 100] [--only serve] [--repeat 2]``.

Receiver CPU (:class:`CpuMeter`): the receiver's own user/system time from
``/proc/<pid>/stat``, plus its reaped children's (``cutime``/``cstime``: what
``storescp --fork`` forks per association, reaped by its SIGCHLD handler with
``waitpid``), plus the live descendants' (``--workers`` processes). The meter waits
for the children forked during the run to be reaped before the last sample, and
polls every descendant while it lives, so a child whose times never reach the parent
(a receiver that ignores SIGCHLD: the kernel reaps those children and drops their
times) is still counted, from its last sample. Rounds alternate the receivers' order
(``--repeat``): the kernel's cost of creating a file (ext4 inode allocation) swings
with what the machine deleted in the last ~30 s, so a fixed order favours whoever
runs at a calm moment.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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


TICK = os.sysconf("SC_CLK_TCK")
SIGCHLD_BIT = 1 << (17 - 1)  # SIGCHLD is 17 on Linux; SigIgn is a mask of signal number - 1


def proc_times(pid: int) -> tuple[float, float, float, float] | None:
    """``utime, stime, cutime, cstime`` (seconds) of ``pid`` from ``/proc/<pid>/stat``
    (a zombie's too), or ``None`` once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return tuple(int(x) / TICK for x in fields[11:15])  # type: ignore[return-value]


def ignores_sigchld(pid: int) -> bool:
    """Whether ``pid`` ignores SIGCHLD: its children are reaped by the kernel and their
    CPU time never reaches its ``cutime``/``cstime``."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & SIGCHLD_BIT)
    except OSError:
        pass
    return False


class CpuMeter:
    """CPU user/system seconds of a process and all its descendants, those that exit
    during the measurement included (see the module docstring)."""

    POLL = 0.02  # seconds between samples of the descendants

    def __init__(self, proc: psutil.Process):
        self.proc = proc
        self.ignores_sigchld = ignores_sigchld(proc.pid)
        self._last: dict[int, tuple[float, float]] = {}  # descendant pid -> (user, system) last seen
        self._gone: dict[int, tuple[float, float]] = {}  # descendants seen that exited meanwhile
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._start = self._descendants()
        self.before = self._total()
        self.forked = 0  # children that came and went during the measurement
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _descendants(self) -> set[int]:
        try:
            return {p.pid for p in self.proc.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def _sample(self) -> None:
        pids = self._descendants()
        with self._lock:
            for pid in pids:
                t = proc_times(pid)
                if t is not None:
                    self._last[pid] = (t[0], t[1])
            for pid in list(self._last):
                if pid not in pids and proc_times(pid) is None:
                    self._gone[pid] = self._last.pop(pid)

    def _poll(self) -> None:
        while not self._stop.wait(self.POLL):
            self._sample()

    def _total(self) -> tuple[float, float]:
        """Now: the process's own and reaped children's time plus its live descendants'."""
        own = proc_times(self.proc.pid)
        if own is None:
            return 0.0, 0.0
        user, system = own[0] + own[2], own[1] + own[3]
        for pid in self._descendants():  # reaped ones are in their parents' cutime/cstime
            t = proc_times(pid)
            if t is not None:
                user, system = user + t[0] + t[2], system + t[1] + t[3]
        return user, system

    def stop(self, settle: float = 10.0) -> tuple[float, float]:
        """User and system seconds since the start. Waits (up to ``settle`` s) until the
        children forked during the run are gone, reaped, so that their time is in their
        parent's ``cutime``/``cstime``."""
        deadline = time.monotonic() + settle
        while self._descendants() - self._start and time.monotonic() < deadline:
            time.sleep(self.POLL)
        self._stop.set()
        self._thread.join()
        self._sample()
        user, system = self._total()
        self.forked = len(set(self._gone) - self._start)
        if self.ignores_sigchld:  # their times never reached the parent: the last samples
            for u, s in self._gone.values():
                user, system = user + u, system + s
        return user - self.before[0], system - self.before[1]


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (``/proc/stat``: user, nice, system,
    irq, softirq, steal; guest time is already in user and nice)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK


def dcmtk_env() -> dict[str, str]:
    """Debian's DCMTK leaves Nagle on unless TCP_NODELAY is set (~40 ms per message)."""
    return {**os.environ, "TCP_NODELAY": "1"}


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
    name: str,
    command: list[str],
    port: int | None,
    dirs: list[Path],
    out: Path,
    database: psutil.Process | None = None,
) -> dict[str, object]:
    """``port``: DCMTK's fixed port; ``None`` for ours, started on port 0 (no free-port race
    with other programs), the port taken from their announcement. ``out``: where the
    receiver writes (checked afterwards: every instance there)."""
    env = dict(dcmtk_env(), PYTHONPATH=str(ROOT))
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
        meter = CpuMeter(psutil.Process(recv.pid))
        db_meter = CpuMeter(database) if database is not None else None
        busy0, children0 = machine_busy(), resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        sender_logs = [logs / f"sender{i}.log" for i in range(len(dirs))]
        senders = []
        for d, log in zip(dirs, sender_logs):
            with log.open("wb") as sink:
                argv = ["/usr/bin/storescu", "-aec", "ANY-SCP", "+sd", "-pdu", "131072", "127.0.0.1", str(port), str(d)]
                senders.append(subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=dcmtk_env()))
        codes = [s.wait(600) for s in senders]
        seconds = time.monotonic() - start
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the senders, just reaped
        user, system = meter.stop()  # forked storescp children finish and are reaped
        busy = machine_busy() - busy0
        sent = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        db = sum(db_meter.stop(settle=0)) if db_meter is not None else float("nan")
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
    received = sum(1 for f in out.rglob("*") if f.is_file() and not f.name.endswith(".partial") and f.suffix != ".db")
    if not failed and received < n and "serve" not in name:  # serve's layout holds more than the instances
        failed.append(f"{received} of {n} instances in {out}")
        print(f"{name}: only {received} of {n} instances received", file=sys.stderr)
    return {
        "name": name,
        "failed": failed,
        "seconds": seconds,
        "instances/s": n / seconds,
        "MB/s": size / seconds / 1e6,
        "cpu ms/instance": (user + system) / n * 1000,
        "user ms/instance": user / n * 1000,
        "system ms/instance": system / n * 1000,
        "forked": meter.forked,
        "senders ms/instance": sent / n * 1000,
        # CPUs kept busy by everything else meanwhile (other work, kernel threads, steal)
        "other CPUs": max(0.0, busy - user - system - sent) / seconds,
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


Made = tuple[list[str], int | None, psutil.Process | None]  # command, DCMTK's port, database server
Case = tuple[str, Callable[[Path, int], Made]]  # name, (out, round) -> Made


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--senders", type=int, default=8)
    ap.add_argument("--files", type=int, default=100, help="instances per sender")
    ap.add_argument("--only", choices=["store-scp", "serve", "storescp"], action="append",
                    help="run only these receivers (repeatable; default all)")  # fmt: skip
    ap.add_argument("--workers", type=int, action="append", metavar="N",
                    help="store-scp --workers N to run (repeatable; default 1, 2 and 1 --durable)")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1, help="rounds, the receivers' order alternating (default 1)")
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=PATH",
                    help="also run store-scp from this source tree (PYTHONPATH), e.g. before=/tmp/main")  # fmt: skip
    ap.add_argument("--tmpdir", metavar="DIR", help="where the instances and every receiver's files go "
                    "(default: the system's temporary directory; a tmpfs takes the file system's cost out)")  # fmt: skip
    ap.add_argument("--postgresql", metavar="URL", help="a PostgreSQL server to use (default: start one)")
    args = ap.parse_args()
    only = set(args.only or ["store-scp", "serve", "storescp"])
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        dirs = make_files(base, args.senders, args.files)
        cases: list[Case] = []
        if "store-scp" in only:
            plans = [(w, False) for w in args.workers] if args.workers else [(1, False), (2, False), (1, True)]
            for workers, durable in plans:  # --durable: fsync, group commit
                for label, tree in [("", None), *(t.split("=", 1) for t in args.tree)]:

                    def ours(
                        out: Path, _round: int, workers: int = workers, durable: bool = durable, tree: str | None = tree
                    ) -> Made:
                        cmd = ["env", f"PYTHONPATH={Path(tree).resolve()}"] if tree else []  # env execs: same pid
                        cmd += [sys.executable, "-m", "dimse_async", "store-scp", "--any-called-ae", "--port", "0"]
                        cmd += ["--out", str(out), "--log-level", "WARNING", "--workers", str(workers)]
                        return cmd + (["--durable"] if durable else []), None, None

                    name = f"store-scp --workers {workers}" + (" --durable" if durable else "")
                    cases.append((name + (f" [{label}]" if label else ""), ours))
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

                    def serve(out: Path, round_: int, index: str = index, workers: int = workers) -> Made:
                        cmd = [sys.executable, "-m", "dimse_async", "serve", "--port", "0", "--log-level", "WARNING",
                               "--storage-dir", str(out), "--workers", str(workers)]  # fmt: skip
                        if index != "postgresql":
                            return cmd, None, None
                        assert server is not None
                        cmd += ["--index", fresh_database(server[0], f"bench_{workers}_{round_}")]
                        return cmd, None, server[1]

                    cases.append((f"serve {index} --workers {workers}", serve))
        if "storescp" in only:

            def storescp(out: Path, _round: int) -> Made:
                out.mkdir()
                port = free_port()
                cmd = ["/usr/bin/storescp", "--fork", "-pdu", "131072", "+B", "-dhl", "-od", str(out), str(port)]
                return cmd, port, None

            cases.append(("storescp --fork", storescp))
        # Every receiver writes flat into a directory of its own beside the others, on the
        # same file system (ours <uid>.dcm, storescp CT.<uid>); nothing is removed before
        # the end (a deletion makes the next inode allocations dearer for ~30 s).
        for round_ in range(args.repeat):
            for name, make in cases if round_ % 2 == 0 else cases[::-1]:
                out = base / f"{name.replace(' ', '_')}.{round_}"
                cmd, port, database = make(out, round_)
                result = run(name, cmd, port, dirs, out, database)
                result["round"] = round_ + 1
                results.append(result)
    cpus = os.cpu_count()
    print(f"{args.senders} concurrent storescu x {args.files} instances (~39 KB each); {cpus} CPUs shared with senders")
    print()
    print("| receiver | round | ok | seconds | instances/s | MB/s | receiver CPU ms/instance (user/system) "
          "| senders CPU ms/instance | other CPUs busy | PostgreSQL CPU ms/instance |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        db = float(r["db ms/instance"])  # type: ignore[arg-type]
        failed: list[str] = r["failed"]  # type: ignore[assignment]
        ok = "yes" if not failed else f"NO: {len(failed)} failures"
        print(
            f"| `{r['name']}` | {r['round']} | {ok} | {r['seconds']:.2f} | {r['instances/s']:.1f} | "
            f"{r['MB/s']:.1f} | {r['cpu ms/instance']:.2f} ({r['user ms/instance']:.2f}/{r['system ms/instance']:.2f}) "
            f"| {r['senders ms/instance']:.2f} | {r['other CPUs']:.2f} | {'' if db != db else f'{db:.2f}'} |"
        )
    reference = {r["round"]: r for r in results if r["name"] == "storescp --fork"}
    ratios = [
        (r["name"], r["round"], float(r["instances/s"]) / float(ref["instances/s"]),  # type: ignore[arg-type]
         float(r["cpu ms/instance"]) / float(ref["cpu ms/instance"]))  # type: ignore[arg-type]
        for r in results if r["name"] != "storescp --fork" and (ref := reference.get(r["round"])) is not None
    ]  # fmt: skip
    if ratios:
        print()
        print("Against `storescp --fork` in the same round: instances/s ratio (>= 1.0 is the target), CPU ratio")
        for name, round_, wall, cpu in ratios:
            print(f"- `{name}` round {round_}: {wall:.2f}x, CPU {cpu:.2f}x")
    failures = [f"- `{r['name']}`: {why}" for r in results for why in r["failed"]]  # type: ignore[attr-defined]
    if failures:
        print()
        print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
