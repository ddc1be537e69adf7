"""``serve`` binds its port before it re-indexes the archive.

The storage directory is pre-populated with instances that are not indexed yet.
"Indexing is in progress" is a state the test holds rather than a race against the
machine's speed:

- port in use: the archive also holds a FIFO named like an instance file, which a
  re-index would block on forever: one line on stderr, exit 7, about as fast as a
  command that does nothing (``serve --version``), nobody opened the FIFO and no index
  was built;
- while indexing (the test holds the lock a re-index takes, so it waits): the port is
  bound and listening; DCMTK ``echoscu`` and our ``echo`` wait ``--paused-wait`` (0.3 s here, 5 by default), then get
  A-ASSOCIATE-RJ rejected-transient (temporary congestion), ``/healthz`` answers 503;
  once the lock is released the "listening on" line reports the indexed instances and
  associations are accepted (``/healthz`` 200);
- a request arriving during a short re-index just waits for it and is accepted;
- SIGTERM while indexing: the server stops without admitting anyone and exits 0; the
  re-index stops before its next file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk, free_port, stop_process
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "dimse_async"]
HOST = "127.0.0.1"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
INSTANCES = 40


def populate(storage: Path, count: int = INSTANCES) -> None:
    """``count`` CT instances, not indexed yet."""
    storage.mkdir(parents=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(storage / f"{i:04d}.dcm")


class ReindexLock:
    """The lock a re-index takes (one at a time across processes: ``.locks/reindex.lock``
    in the storage directory), held by the test: the re-index waits until :meth:`release`."""

    def __init__(self, storage: Path):
        (storage / ".locks").mkdir(exist_ok=True)
        self.fd: int | None = os.open(storage / ".locks" / "reindex.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextmanager
def reindex_locked(storage: Path) -> Iterator[ReindexLock]:
    lock = ReindexLock(storage)
    try:
        yield lock
    finally:
        lock.release()


def wait_preparing(proc: subprocess.Popen[str], port: int, log: Path) -> None:
    """Until serve listens on ``port`` (it then prepares - re-indexes - before admitting)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.02)
    pytest.fail(f"serve never listened: {log.read_text()}")


def fifo_opened(fifo: Path) -> bool:
    """Whether something has the FIFO open for reading."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no reader
            return False
        raise
    os.close(fd)
    return True


def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=5) as rsp:
            return int(rsp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@contextmanager
def starting_serve(
    storage: Path, port: int, http_port: int | None, log: Path, workers: int = 1, extra: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[str]]:
    http = ["--http-port", str(http_port), *extra] if http_port else list(extra)
    with log.open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "serve", "--host", HOST, "--port", str(port), "--storage-dir", str(storage),
             "--workers", str(workers), *http],
            stdout=subprocess.PIPE, stderr=err, text=True, env=ENV, start_new_session=True,
        )  # fmt: skip
    try:
        yield proc
    finally:
        stop_process(proc)  # type: ignore[arg-type]


@pytest.mark.parametrize("workers", [1, 2])
def test_port_in_use_fails_before_indexing(tmp_path: Path, workers: int) -> None:
    storage = tmp_path / "archive"
    populate(storage)
    fifo = storage / "0000-fifo.dcm"
    os.mkfifo(fifo)
    with socket_listening() as port:
        done = subprocess.run(
            [*CLI, "serve", "--host", HOST, "--port", str(port), "--storage-dir", str(storage),
             "--workers", str(workers)],
            capture_output=True, text=True, env=ENV, timeout=30, check=False,
        )  # fmt: skip
    assert done.returncode == 7, done
    lines = done.stderr.strip().splitlines()
    assert lines == [f"dimse-async serve: cannot listen on {HOST}:{port}: address already in use"], done.stderr
    assert done.stdout == ""
    # A re-index would open the FIFO and block there until the 30 s timeout: not opened
    # means the port was judged before any indexing (no timing against a baseline,
    # which a loaded machine made unreliable).
    assert not fifo_opened(fifo)
    assert not (storage / "index.sqlite").exists() or _indexed(storage) == 0


def _indexed(storage: Path) -> int:
    with sqlite3.connect(storage / "index.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])


@contextmanager
def socket_listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_associations_during_indexing_are_rejected_transient_then_accepted(tmp_path: Path, workers: int) -> None:
    """With ``--workers 2`` the parent re-indexes while a paused server holds the port.
    ``--paused-wait 0.3``: a request waits 0.3 s (not the default 5) before the rejection."""
    storage = tmp_path / "archive"
    populate(storage)
    port = free_port()
    http_port = free_port() if workers == 1 else None
    log = tmp_path / "serve.log"
    paused = ("--paused-wait", "0.3")
    with reindex_locked(storage) as lock, starting_serve(storage, port, http_port, log, workers, paused) as proc:
        wait_preparing(proc, port, log)
        # bound, listening, not admitting: rejected-transient, temporary congestion
        started = time.monotonic()
        echo = subprocess.run(
            [dcmtk("echoscu"), "-to", "10", "-ta", "10", "-aec", "ARCHIVE", HOST, str(port)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert time.monotonic() - started < 4.5  # the default wait is 5 s
        assert echo.returncode != 0, echo
        assert re.search(r"Rejected.*Transient", echo.stderr + echo.stdout, re.S), echo
        assert "Temporary Congestion" in echo.stderr + echo.stdout, echo
        if workers == 1:  # the same for the parent of --workers: DCMTK's view is enough there
            assert healthz(http_port) == 503
            ours = subprocess.run(
                [*CLI, "echo", HOST, str(port), "--timeout", "10"],
                capture_output=True, text=True, env=ENV, timeout=30, check=False,
            )  # fmt: skip
            assert ours.returncode == 4, ours
            assert "rejected-transient" in ours.stderr and "temporary-congestion" in ours.stderr, ours.stderr
        assert proc.poll() is None and "listening on" not in log.read_text()
        lock.release()  # indexing may go on
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"listening on {HOST}:{port}" in line, (line, log.read_text())
        if workers == 1:
            assert f"{INSTANCES} instances ({INSTANCES} indexed now, 0 not indexed, 0 gone)" in line, line
            assert healthz(http_port) == 200
        else:
            assert f"{INSTANCES} instances" in line and "(2 workers, pids" in line, line
        echo = subprocess.run(
            [*CLI, "echo", HOST, str(port)], capture_output=True, text=True, env=ENV, timeout=30, check=False
        )
        assert echo.returncode == 0, echo
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    text = log.read_text()
    assert "association refused: not open yet" in text and 'reason="server starting"' in text, text


def test_sigterm_while_indexing_stops_without_admitting(tmp_path: Path) -> None:
    storage = tmp_path / "archive"
    populate(storage, count=5)
    port, http_port = free_port(), free_port()
    log = tmp_path / "serve.log"
    with reindex_locked(storage) as lock, starting_serve(storage, port, http_port, log) as proc:
        wait_preparing(proc, port, log)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "stopped before accepting associations" not in log.read_text():
            assert time.monotonic() < deadline, f"SIGTERM not acted on while indexing: {log.read_text()}"
            time.sleep(0.02)
        lock.release()  # the re-index thread gets the lock, sees it was stopped
        assert proc.wait(20) == 0, log.read_text()
        assert proc.stdout is not None and "listening on" not in proc.stdout.read()
    text = log.read_text()
    assert "stopped before accepting associations" in text and "re-index stopped" in text, text
    assert _indexed(storage) == 0


def test_a_request_during_a_short_reindex_waits_and_is_accepted(tmp_path: Path) -> None:
    storage = tmp_path / "archive"
    populate(storage, count=3)
    port = free_port()
    log = tmp_path / "serve.log"
    # A wait long enough for the re-index to finish after the lock is released, however
    # loaded the machine (the default 5 s is what the rejected-transient test relies on).
    paused = ("--paused-wait", "20")
    with reindex_locked(storage) as lock, starting_serve(storage, port, None, log, extra=paused) as proc:
        wait_preparing(proc, port, log)
        echo = subprocess.Popen(
            [*CLI, "echo", HOST, str(port), "--timeout", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        # the association request is in; the index catches up well within the wait
        deadline = time.monotonic() + 20
        while "association request waiting" not in log.read_text():
            assert time.monotonic() < deadline and echo.poll() is None, log.read_text()
            time.sleep(0.02)
        lock.release()
        out, err = echo.communicate(timeout=45)
        assert echo.returncode == 0, (out, err, log.read_text())
        assert "association refused" not in log.read_text()


async def test_library_paused_server_rejects_transient_until_open() -> None:
    """``AE.start_server(paused=True)``: listening, unready; a request waits up to
    ``paused_wait`` and is rejected-transient (temporary congestion) unless the server
    opens meanwhile; after :meth:`Server.open` associations are accepted."""
    import asyncio

    import dimse_async as da

    scp = da.AE("PAUSED", require_called_ae=False)
    scp.add_supported_context(da.Verification)
    scu = da.AE("SCU")
    scu.add_requested_context(da.Verification)
    async with await scp.start_server(HOST, 0, paused=True) as server:
        server.paused_wait = 0.3
        assert not server.ready
        with pytest.raises(da.AssociationRejected) as rejected:
            await scu.associate(HOST, server.port, "PAUSED")
        assert (int(rejected.value.result), int(rejected.value.source), int(rejected.value.reason)) == (2, 3, 1)
        server.paused_wait = 10.0
        waiting = asyncio.ensure_future(scu.associate(HOST, server.port, "PAUSED"))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # held while paused
        server.open()
        assoc = await asyncio.wait_for(waiting, 10)
        assert server.ready
        assert (await assoc.c_echo()).is_success
        await assoc.release()


async def test_closing_a_paused_server_refuses_its_waiting_requests_at_once() -> None:
    """A request waiting on a paused server (``serve --workers N``'s placeholder while the
    workers start) is rejected-transient as soon as that server closes, so the peer can
    retry on the workers at once instead of waiting out ``paused_wait``."""
    import asyncio

    import dimse_async as da

    scp = da.AE("PAUSED", require_called_ae=False)
    scp.add_supported_context(da.Verification)
    scu = da.AE("SCU")
    scu.add_requested_context(da.Verification)
    server = await scp.start_server(HOST, 0, paused=True)
    try:
        server.paused_wait = 60.0
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(scu.associate(HOST, server.port, "PAUSED"))
        deadline = loop.time() + 10
        while not server.associations and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # the request is in, waiting for the server to open
        assert not waiting.done()
        closed_at = loop.time()
        server.close()
        with pytest.raises(da.AssociationRejected) as rejected:
            await asyncio.wait_for(waiting, 10)
        assert loop.time() - closed_at < 5
        assert (int(rejected.value.result), int(rejected.value.source), int(rejected.value.reason)) == (2, 3, 1)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("store", ["mpps", "index"])
def test_full_disk_at_start_is_one_line_that_says_so(tmp_path: Path, store: str) -> None:
    """An archive whose file system is full cannot create its MPPS store (or, with MPPS
    off, its index): one line on stderr, exit 3, and the line says the disk is full
    (SQLite itself says "disk I/O error" or "database or disk is full")."""
    from test_integrity import small_tmpfs

    config = tmp_path / "serve.toml"
    config.write_text(f"mpps = {'true' if store == 'mpps' else 'false'}\n")
    with small_tmpfs(tmp_path / "fs", "2m") as fs:
        storage = fs / "archive"
        populate(storage, 2)
        with (fs / "filler").open("wb") as filler:
            with pytest.raises(OSError) as full:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
        assert full.value.errno == errno.ENOSPC
        done = subprocess.run(
            [*CLI, "serve", "--config", str(config), "--host", HOST, "--port", str(free_port()),
             "--storage-dir", str(storage)],
            capture_output=True, text=True, env=ENV, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 3, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    what = f"MPPS store {storage / 'mpps.sqlite'}" if store == "mpps" else f"index {storage / 'index.sqlite'}"
    assert lines[0].startswith(f"dimse-async serve: {what}: "), lines
    assert f"(no space left: the file system of {storage} has " in lines[0], lines
    assert done.stdout == ""
