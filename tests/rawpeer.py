"""Raw-socket DICOM peers and a ``dimse-async`` server in a subprocess, for the hostile
client tests (fuzzer and attacks).

The server runs as ``python -m dimse_async ...`` with JSON logs on stderr captured to a
file, so a test can look for tracebacks and internal errors and measure the server
process's memory (RSS, with psutil) from outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import free_port, stop_process, wait_tcp
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dimse_async.acse import ContextSpec, build_request
from dimse_async.dimse import Command, CommandField, encode_command
from dimse_async.pdu import PDV, PDataTF, ReleaseRQ
from dimse_async.services.storage import encode_dataset

HOST = "127.0.0.1"
LEGIT_HOST = "127.0.0.2"  # legitimate clients come from another source address
MiB = 1 << 20

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"

#: Context ids as proposed by :func:`rq_bytes` (1, 3, 5, ... in this order).
CONTEXTS = {
    1: (VERIFICATION, IMPLICIT_LE),
    3: (CT_IMAGE_STORAGE, EXPLICIT_LE),
    5: (CT_IMAGE_STORAGE, DEFLATED_LE),
    7: (STUDY_FIND, EXPLICIT_LE),
    9: (STUDY_FIND, DEFLATED_LE),
    11: (STUDY_MOVE, IMPLICIT_LE),
}


def raise_nofile(want: int = 65536) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (up to the hard limit); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rq_bytes(calling: str = "RAW", called: str = "ARCHIVE", max_pdu: int = 65536) -> bytes:
    """An A-ASSOCIATE-RQ proposing :data:`CONTEXTS`, one transfer syntax each."""
    specs = [ContextSpec(a, [ts]) for a, ts in CONTEXTS.values()]
    return build_request(called, calling, specs, max_pdu=max_pdu).encode()


def pdata(ctx: int, data: bytes, *, command: bool, last: bool = True) -> bytes:
    return PDataTF([PDV(ctx, command, last, data)]).encode()


def command_bytes(cmd: Command) -> bytes:
    return encode_command(cmd)


def echo_rq(message_id: int = 1, ctx: int = 1) -> bytes:
    cmd = Command(CommandField.C_ECHO_RQ, message_id=message_id, affected_sop_class_uid=VERIFICATION)
    return pdata(ctx, command_bytes(cmd), command=True)


def ct_dataset(patient: str = "FUZZ", study: str | None = None, rnd: random.Random | None = None) -> Dataset:
    """A small CT instance; its UIDs come from ``rnd`` when given (reproducible cases)."""

    def uid(pool: int) -> str:
        # From a small pool when reproducible, so a long run re-stores the same instances.
        return f"2.25.{pool}{rnd.randrange(pool)}" if rnd is not None else generate_uid()

    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = uid(1000)
    ds.StudyInstanceUID = study or uid(10)
    ds.SeriesInstanceUID = uid(30)
    ds.PatientID = patient
    ds.PatientName = "Fuzz^Patient"
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    return ds


def find_identifier(level: str = "STUDY") -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = level
    q.PatientID = ""
    q.PatientName = "*"
    q.StudyInstanceUID = ""
    return q


def store_rq(ds: Dataset, ctx: int = 3, message_id: int = 1) -> tuple[bytes, bytes]:
    """(command set, data set) of a C-STORE-RQ of ``ds`` on ``ctx``."""
    cmd = Command(
        CommandField.C_STORE_RQ,
        message_id=message_id,
        affected_sop_class_uid=str(ds.SOPClassUID),
        affected_sop_instance_uid=str(ds.SOPInstanceUID),
        priority=0,
        data_set_type=0x0000,
    )
    return command_bytes(cmd), encode_dataset(ds, CONTEXTS[ctx][1])


def find_rq(identifier: Dataset, ctx: int = 7, message_id: int = 1) -> tuple[bytes, bytes]:
    cmd = Command(
        CommandField.C_FIND_RQ, message_id=message_id, affected_sop_class_uid=STUDY_FIND, priority=0, data_set_type=0
    )
    return command_bytes(cmd), encode_dataset(identifier, CONTEXTS[ctx][1])


# ---------------------------------------------------------------------------------
# A raw peer
# ---------------------------------------------------------------------------------


class RawPeer:
    """One TCP connection speaking bytes; reads whole PDUs."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, source: str = HOST, timeout: float = 5.0) -> RawPeer:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, local_addr=(source, 0), limit=1 << 22), timeout
        )
        return cls(reader, writer)

    async def send(self, data: bytes, timeout: float = 5.0) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), timeout)

    async def read_pdu(self, timeout: float = 5.0) -> bytes | None:
        """One whole PDU, or ``None`` at EOF (also EOF inside a PDU, which tests flag)."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(6), timeout)
            (length,) = struct.unpack(">I", header[2:])
            return header + await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None

    async def associate(self, rq: bytes | None = None, timeout: float = 5.0) -> bytes:
        await self.send(rq or rq_bytes())
        reply = await self.read_pdu(timeout)
        assert reply is not None and reply[0] == 0x02, f"expected an A-ASSOCIATE-AC, got {reply!r}"
        return reply

    async def release(self, timeout: float = 5.0) -> None:
        await self.send(ReleaseRQ().encode())
        while True:
            reply = await self.read_pdu(timeout)
            assert reply is not None, "closed instead of answering the A-RELEASE-RQ"
            if reply[0] == 0x06:
                return

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


def response_status(pdu: bytes) -> tuple[int, int | None]:
    """(command field, status) of a P-DATA-TF PDU holding one whole command set."""
    from dimse_async.dimse import decode_command

    body = pdu[6:]
    (length,) = struct.unpack_from(">I", body, 0)
    cmd = decode_command(body[6 : 4 + length])
    return cmd.command_field, cmd.status


async def legit_echo(port: int, *, called: str = "ARCHIVE", timeout: float = 5.0) -> float:
    """A whole association + C-ECHO + release from :data:`LEGIT_HOST`; its duration in s."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def run() -> None:
        peer = await RawPeer.connect(port, LEGIT_HOST)
        try:
            await peer.associate(rq_bytes("LEGIT", called))
            await peer.send(echo_rq(1))
            reply = await peer.read_pdu()
            assert reply is not None and reply[0] == 0x04, reply
            assert response_status(reply) == (0x8030, 0)
            await peer.release()
        finally:
            await peer.close()

    await asyncio.wait_for(run(), timeout)
    return loop.time() - start


@dataclass
class LegitClient:
    """Runs :func:`legit_echo` in a loop while an attack runs; every one must succeed."""

    port: int
    interval: float = 0.2
    called: str = "ARCHIVE"
    timeout: float = 10.0
    durations: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            try:
                self.durations.append(await legit_echo(self.port, called=self.called, timeout=self.timeout))
            except Exception as exc:  # recorded and asserted on by check()
                self.failures.append(repr(exc))
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> LegitClient:
        self._task = asyncio.ensure_future(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def check(self, minimum: int = 1) -> None:
        assert not self.failures, f"legitimate client failed: {self.failures[:5]}"
        assert len(self.durations) >= minimum, f"only {len(self.durations)} legitimate echoes completed"


# ---------------------------------------------------------------------------------
# The server under attack: a subprocess
# ---------------------------------------------------------------------------------

#: Log text that must never appear, whatever a peer sends.
FORBIDDEN = ("Traceback", "internal error", "Exception in callback", "exception was never retrieved")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    root: Path

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def peak_rss(self) -> int:
        """The process's RSS high-water mark (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def listening(self) -> set[str]:
        """Addresses this process listens on at :attr:`port`."""
        return {
            c.laddr.ip
            for c in self.ps.net_connections()
            if c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
        }

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def check_log(self) -> None:
        text = self.log_text()
        for bad in FORBIDDEN:
            assert bad not in text, f"server log contains {bad!r}:\n" + _around(text, bad)


def _around(text: str, needle: str, width: int = 3000) -> str:
    i = text.find(needle)
    return text[max(0, i - 500) : i + width]


@contextlib.contextmanager
def server_process(
    tmp_path: Path,
    command: str = "serve",
    *extra: str,
    host: str | None = HOST,
    env_extra: dict[str, str] | None = None,
    nofile: int | None = None,
    storage: Path | None = None,
) -> Iterator[ServerProcess]:
    """``dimse-async <command>`` on <host>:<free port> (no ``--host`` when ``host`` is
    None), JSON logs at INFO to a file."""
    port = free_port()
    root = tmp_path / "server"
    root.mkdir(exist_ok=True)
    log = tmp_path / f"{command}.log"
    argv = [sys.executable, "-m", "dimse_async", command, "--port", str(port)]
    if host is not None:
        argv += ["--host", host]
    if command == "serve":
        argv += ["--storage-dir", str(storage or root / "archive"), "--aet", "ARCHIVE"]
    elif command == "store-scp":
        argv += ["--out", str(root / "in"), "--aet", "ARCHIVE"]
    else:
        argv += ["--aet", "ARCHIVE"]
    argv += ["--log-level", "INFO", "--log-json", "--drain-grace", "2", *extra]
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parent.parent))
    env.update(env_extra or {})
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            argv,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            preexec_fn=None if nofile is None else lambda: _limit_nofile(nofile),
        )
    try:
        wait_tcp(proc, port, log)
        server = ServerProcess(proc, port, log, root)
        # The port answered; make sure it is this process listening (not a port reused by another).
        deadline = time.monotonic() + 30
        while not server.listening():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command} is not listening on port {port}:\n{server.log_text()}")
            time.sleep(0.05)
        # Listening comes first; the "listening on" line once it admits associations
        # (serve re-indexes in between).
        while not any(
            not line.startswith("{") and "listening on " in line and f":{port}" in line
            for line in server.log_text().splitlines()
        ):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command} never announced it was ready:\n{server.log_text()}")
            time.sleep(0.05)
        yield server
    finally:
        stop_process(proc)


def _limit_nofile(n: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


class RSSWatch:
    """Samples a process's RSS in the background; ``peak`` is the highest seen."""

    def __init__(self, server: ServerProcess, interval: float = 0.05):
        self.server, self.interval = server, interval
        self.baseline = server.rss()
        self.peak = self.baseline
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.server.rss())
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> RSSWatch:
        self._task = asyncio.ensure_future(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, self.server.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def check(self, limit: int) -> None:
        assert self.growth < limit, f"server RSS grew {self.growth / MiB:.1f} MiB (limit {limit / MiB:.0f} MiB)"


async def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        await asyncio.sleep(0.05)
