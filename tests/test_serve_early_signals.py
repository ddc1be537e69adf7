"""SIGTERM while ``dimse-async serve`` starts: at every step a clean stop (exit 0, a
log line saying so), never death by the signal (exit -15, no line) as before the
event loop's handlers were installed (:mod:`dimse_async.early_signals`).

The steps are held, not raced: the signal goes when the process has installed its
handling (its SIGTERM is caught, read from ``/proc``), while it reads a configuration
file that is a FIFO (the test writes it only after the signal), while its index
migration waits for a lock the test holds (SQLite), and while the supervisor of
``--workers 2`` starts."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import free_port, stop_process

pytestmark = [pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
HOST = "127.0.0.1"


def start(tmp_path: Path, *args: str, name: str = "serve") -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / f"{name}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dimse_async", "serve", "--host", HOST, "--port", str(free_port()),
             "--storage-dir", str(tmp_path / "archive"), *args],
            stdout=sink, stderr=subprocess.STDOUT, env=ENV, start_new_session=True,
        )  # fmt: skip
    return proc, log


def sigterm_caught(pid: int) -> bool:
    """Whether the process catches SIGTERM (its ``SigCgt`` mask in ``/proc``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def wait_until(predicate, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached (exit {proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.001)


def stopped_cleanly(proc: subprocess.Popen[bytes], log: Path) -> str:
    try:
        code = proc.wait(30)
    finally:
        stop_process(proc)
    text = log.read_text(errors="replace")
    assert code == 0, f"exit {code}:\n{text[-3000:]}"
    assert "Traceback" not in text and "listening on" not in text, text[-3000:]
    return text


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_as_soon_as_it_is_caught(tmp_path: Path, workers: int) -> None:
    """The first moment the process catches SIGTERM: before it read its arguments'
    configuration, opened anything or imported the archive."""
    proc, log = start(tmp_path, "--workers", str(workers))
    wait_until(lambda: sigterm_caught(proc.pid), proc, log, "SIGTERM caught")
    proc.send_signal(signal.SIGTERM)
    text = stopped_cleanly(proc, log)
    # before its first step (main's); before, SIGTERM was caught once the port listened
    assert "stopped during start-up signal=SIGTERM before=starting" in text, text


def test_sigterm_while_reading_the_configuration(tmp_path: Path) -> None:
    """``--config`` a FIFO (``<(...)`` in a shell): the signal arrives while ``serve``
    waits in its read; the configuration is written after it. Before: exit -15."""
    fifo = tmp_path / "serve.toml"
    os.mkfifo(fifo)
    proc, log = start(tmp_path, "--config", str(fifo))
    opened = threading.Event()
    writer: list[int] = []

    def open_writer() -> None:  # returns once serve opened the FIFO for reading
        writer.append(os.open(fifo, os.O_WRONLY))
        opened.set()

    thread = threading.Thread(target=open_writer, daemon=True)
    thread.start()
    try:
        wait_until(opened.is_set, proc, log, "configuration opened")
        time.sleep(0.05)  # in its read
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        os.write(writer[0], b'ae_title = "EARLY"\n')
    finally:
        if writer:
            os.close(writer[0])
        elif proc.poll() is None:
            with contextlib.suppress(OSError):  # unblock the opener thread
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    text = stopped_cleanly(proc, log)
    assert "stopped during start-up" in text and "SIGTERM" in text, text


def test_sigterm_while_the_index_migration_waits(tmp_path: Path) -> None:
    """The index is locked by another writer (here the test) while ``serve`` opens and
    migrates it: the signal stops it once the lock is given back, exit 0."""
    storage = tmp_path / "archive"
    storage.mkdir()
    db = sqlite3.connect(storage / "index.sqlite", isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN IMMEDIATE")
        proc, log = start(tmp_path)
        wait_until(lambda: _listening(proc, log), proc, log, "listening (migration waiting)")
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
    finally:
        db.execute("ROLLBACK")
        db.close()
    text = stopped_cleanly(proc, log)
    assert "stopped before accepting associations" in text, text


def _listening(proc: subprocess.Popen[bytes], log: Path) -> bool:
    import socket

    port = int(proc.args[proc.args.index("--port") + 1])  # type: ignore[union-attr]
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((HOST, port)) == 0
