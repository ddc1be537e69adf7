"""Shared fixtures: quiet structured logs, loopback servers, free ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from dimse_async.log import configure_logging

configure_logging("WARNING", capture_warnings=False)


def _compile_package() -> None:
    """The package's modules compiled to bytecode (in their ``__pycache__`` directories,
    as an install does) before any test starts a process that imports them: where
    ``PYTHONDONTWRITEBYTECODE`` is set (this machine, CI) and the tree is a fresh clone,
    every ``python -m dimse_async`` the tests start (a few hundred) otherwise compiles
    the modules it imports anew, ~0.25 s of CPU each. Files already up to date are left
    alone; ``compileall`` writes whatever that variable says."""
    import compileall

    import dimse_async

    compileall.compile_dir(Path(dimse_async.__file__).parent, quiet=1)


_compile_package()

# Property tests judge answers, not speed: on a loaded 2-core machine a single example
# may take longer than hypothesis' 200 ms deadline, and generating inputs may look slow.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

DCMTK = "/usr/bin"


_PORTS = random.Random(os.getpid() ^ time.time_ns())
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port that is free now, below the kernel's ephemeral range (32768+ on Linux), so
    that no client connection's source port takes it before the test's server binds it;
    never the same port twice in one run, so two servers started together cannot collide."""
    for _ in range(200):
        port = _PORTS.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port between 20000 and 32000")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """After each test body: end the pynetdicom associations it left running.

    A pynetdicom 3 requestor waits for its reactor thread to pause by spinning on a flag,
    without a time limit; seen once on a loaded machine: the flag stayed unset while the
    reactor was blocked, the test failed on its own bounded wait, and the thread it had
    run pynetdicom in kept spinning, so the event loop's shutdown (which joins that
    thread) hung the whole run instead of failing one test. ``kill()`` sets the flag and
    stops the association's network thread, so such a thread ends."""
    yield
    association = sys.modules.get("pynetdicom.association")
    if association is None:
        return
    import threading

    for thread in threading.enumerate():
        if isinstance(thread, association.Association) and thread.is_alive():
            thread.kill()


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool; DCMTK is a required test dependency (README, .ci/run)."""
    path = f"{DCMTK}/{tool}"
    if shutil.which(path) is None:
        pytest.fail(f"{path} not found: install DCMTK (apt-get install -y dcmtk)")
    return path


@pytest.fixture
def port() -> int:
    return free_port()


async def communicate(
    argv: tuple[str, ...],
    *,
    env: dict[str, str] | None = None,
    cwd: object = None,
    timeout: float = 30.0,
    merge_stderr: bool = False,
) -> tuple[int, str, str]:
    """Run a peer to completion without blocking the event loop (in-process SCPs keep
    serving); bounded by ``timeout``, killed if it overruns. Returns (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT if merge_stderr else asyncio.subprocess.PIPE,
        env=env,
        cwd=cwd,  # type: ignore[arg-type]
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        pytest.fail(f"{' '.join(argv)} did not finish within {timeout} s")
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), (err or b"").decode(errors="replace")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, wait, SIGKILL if it lingers; then end children left in its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # only exists if it was started in its own session
    return proc.returncode


def kill_process(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL and reap, then end children left in its process group: for a peer whose
    state goes with its temporary directory, where a graceful shutdown (Orthanc's takes
    seconds) is neither needed nor under test."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # only exists if it was started in its own session
    return proc.returncode


def wait_tcp(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 60.0) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port`` (bounded; fails if
    the process dies, showing its log)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    pytest.fail(f"{proc.args} not listening on port {port} after {timeout} s")


async def text_with(path: Path, *needles: str, since: int = 0, timeout: float = 30.0) -> str:
    """The text of ``path`` (a running process's log) from byte ``since`` on, once it
    contains every one of ``needles``: a server may log an association after its peer
    got every answer. After ``timeout`` seconds, the text as it is then (the caller's
    asserts say what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        text = ""
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        if all(needle in text for needle in needles) or time.monotonic() >= deadline:
            return text
        await asyncio.sleep(0.02)


def acknowledged(storescu_output: str) -> set[str]:
    """Files DCMTK storescu (run with -v) sent and got a Success response for."""
    done, current = set(), None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            done.add(current)
            current = None
    return done


# --------------------------------------------------------------------------- PostgreSQL

def _pg_bin() -> Path:
    """Debian's PostgreSQL server programs (the newest installed major version)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
PG_USER = "dimsepg"  # initdb and the server refuse to run as root: an unprivileged account


def _as_pg_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *argv] if os.geteuid() == 0 else argv


class PostgreSQLServer:
    """A throw-away PostgreSQL cluster (Debian's ``postgresql`` package) on a loopback
    port: ``initdb`` and ``pg_ctl`` as an unprivileged user into a temporary directory;
    trust authentication for the ``postgres`` role from 127.0.0.1 only."""

    def __init__(self, base: Path):
        for tool in ("initdb", "pg_ctl", "psql"):
            if not (PG_BIN / tool).exists():
                pytest.fail(f"{PG_BIN / tool} not found: install PostgreSQL (apt-get install -y postgresql)")
        if os.geteuid() == 0 and subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                           check=True, capture_output=True)  # fmt: skip
        self.dir = base
        self.data = base / "data"
        self.log = base / "postgresql.log"
        self.port = free_port()
        self._databases = 0
        if os.geteuid() == 0:
            shutil.chown(base, PG_USER)
            base.chmod(0o700)
        init = subprocess.run(
            _as_pg_user([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                         "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"]),
            capture_output=True, timeout=120,
        )  # fmt: skip
        if init.returncode != 0:
            pytest.fail(f"initdb failed: {init.stdout.decode(errors='replace')}{init.stderr.decode(errors='replace')}")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={base} "
                   "-c fsync=off -c full_page_writes=off -c max_connections=300")  # fmt: skip
        start = subprocess.run(
            _as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                         "-o", options, "start"]),
            capture_output=True, timeout=90,
        )  # fmt: skip
        if start.returncode != 0:
            pytest.fail(f"pg_ctl start failed: {start.stderr.decode(errors='replace')}\n{self.log.read_text(errors='replace')}")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, dsn: str | None = None) -> str:
        """Run ``sql`` (in the database at ``dsn``, else ``postgres``); its rows, ``|``-separated."""
        done = subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn or self.dsn(), "-c", sql],
            capture_output=True, timeout=60,
        )  # fmt: skip
        if done.returncode != 0:
            pytest.fail(f"psql {sql!r}: {done.stderr.decode(errors='replace')}")
        return done.stdout.decode()

    def new_database(self) -> str:
        """A fresh, empty database; its URL. From PostgreSQL 15 on, copied file by file
        from ``template1`` (a few MB): quicker than the default strategy there, which
        writes all of it to the WAL."""
        self._databases += 1
        name = f"archive_{os.getpid()}_{self._databases}"
        file_copy = " STRATEGY = FILE_COPY" if PG_BIN.parent.name.isdigit() and int(PG_BIN.parent.name) >= 15 else ""
        self.psql(f"CREATE DATABASE {name}{file_copy}")
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        """Drop the database of ``dsn`` (from :meth:`new_database`), its connections ended,
        so that the cluster stays small (its directory is removed at the end of the run);
        best effort: the directory goes anyway."""
        name = dsn.rsplit("/", 1)[1]
        subprocess.run(
            [str(PG_BIN / "psql"), "-X", "-q", "-d", self.dsn(), "-c", f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"],
            capture_output=True, timeout=60,
        )  # fmt: skip

    def stop(self) -> None:
        subprocess.run(
            _as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop"]),
            capture_output=True, timeout=60,
        )  # fmt: skip


def _pg_watchdog(base: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A process that stops the cluster in ``base`` and removes it once this process is
    gone, however it ended (tests/pg_watchdog.py); and the pipe end that keeps it waiting."""
    read, write = os.pipe()  # not inherited by the subprocesses tests start
    stop = _as_pg_user([str(PG_BIN / "pg_ctl"), "-D", str(base / "data"), "-m", "immediate", "-w", "-t", "30", "stop"])
    try:
        watchdog = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("pg_watchdog.py")), str(read), str(os.getpid()), str(base), *stop],
            pass_fds=(read,), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    return watchdog, write


@pytest.fixture(scope="session")
def postgresql() -> Iterator[PostgreSQLServer]:
    """One PostgreSQL server for the session (started on first use, stopped at the end).
    Its directory is directly under the system temporary directory: pytest's own are
    private to the user running the tests. A watchdog process stops it should this
    process end without its teardown (killed, ``kill -9`` included)."""
    base = Path(tempfile.mkdtemp(prefix="dimse-async-pg-"))
    watchdog, lifeline = _pg_watchdog(base)
    try:
        server = PostgreSQLServer(base)
        try:
            yield server
        finally:
            server.stop()
    finally:
        os.close(lifeline)  # the watchdog finds the cluster stopped, removes the directory, ends
        try:
            watchdog.wait(timeout=90)
        except subprocess.TimeoutExpired:
            watchdog.kill()
            watchdog.wait()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The archive index of a test run against both back ends: ``None`` (SQLite in the
    storage directory) or the URL of a fresh PostgreSQL database (dropped after the test)."""
    if request.param == "sqlite":
        yield None
        return
    server: PostgreSQLServer = request.getfixturevalue("postgresql")
    dsn = server.new_database()
    yield dsn
    server.drop_database(dsn)


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The library's log lines (its logger does not propagate to the root)."""
    logger = logging.getLogger("dimse_async")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="dimse_async")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
