"""Whole sessions of real clients, recorded and replayed to ``dimse-async serve`` with
mutations (seeded).

DCMTK storescu (two proposals, one with 4 KiB PDUs: many fragments), findscu, getscu
(whose C-STORE-RSPs answer the server's sub-operations) and echoscu talk to a ``serve``
through a recording proxy; their byte streams are cut into PDUs. Each case replays one
session, each PDU sent once the server has answered as much as in the recording,
after 1 to 3 mutations at the PDU level: a bit flipped, the PDU or PDV item length
changed, the message control header or presentation context id changed, a value
truncated, a PDV split in two, the PDU type changed, two PDUs swapped, one dropped or
sent twice, an A-RELEASE-RQ or A-ABORT put in the middle (a C-STORE data set half
sent), the session cut (between PDUs or inside one), and a fifth of the connections
reset instead of closed. Whatever comes, the server must

- log no traceback, internal error or ERROR line;
- keep serving a legitimate client from 127.0.0.2 throughout, and its memory bounded;
- hold no connection once the clients are gone.

(Whether each case got the standard's answer is :mod:`test_fuzz`'s job, one PDU at a
time; a mutated multi-message session has no single right transcript.)

~100 cases by default; ``DIMSE_ASYNC_LONG=1`` runs 5,000 (or
``DIMSE_ASYNC_REPLAY_CASES=N``); ``DIMSE_ASYNC_REPLAY_SEED`` picks the seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import time
from pathlib import Path

import pytest
from conftest import communicate, dcmtk, free_port
from pydicom.data import get_testdata_file
from rawpeer import HOST, LegitClient, MiB, RawPeer, RSSWatch, raise_nofile, server_process, wait_for

LONG = os.environ.get("DIMSE_ASYNC_LONG") == "1"
CASES = int(os.environ.get("DIMSE_ASYNC_REPLAY_CASES", 5_000 if LONG else 100))
SEED = int(os.environ.get("DIMSE_ASYNC_REPLAY_SEED", 20261204))
WORKERS = 8
ANSWER_WAIT = 0.75  # seconds a replayed PDU waits for the answers it followed in the recording
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}

#: (server PDUs seen before it, one client PDU) for every client PDU of a session.
Turns = list[tuple[int, bytes]]

RELEASE_RQ = bytes.fromhex("05000000000400000000")
ABORT_RQ = bytes.fromhex("07000000000400000000")


# ---------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------


class Recorder:
    """A TCP proxy in front of the server that keeps each connection's traffic in order."""

    def __init__(self, target: int, out: Path):
        self.target, self.out = target, out
        self.sessions: list[tuple[str, list[tuple[bool, bytes]]]] = []
        self.label = ""

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(HOST, self.target)
        events: list[tuple[bool, bytes]] = []
        self.sessions.append((self.label, events))

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_client: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(1 << 16):
                    events.append((from_client, data))
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False))

    async def record(self) -> list[tuple[str, Turns]]:
        port = free_port()
        proxy = await asyncio.start_server(self._handle, HOST, port)
        files = [get_testdata_file(name) for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm")]
        ct_study = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"  # CT_small.dcm's
        runs = {
            "storescu": (dcmtk("storescu"), "-aec", "ARCHIVE", "-xe", HOST, str(port), *files),
            "storescu-4k": (dcmtk("storescu"), "-aec", "ARCHIVE", "-pdu", "4096", HOST, str(port), *files),
            "findscu": (dcmtk("findscu"), "-aec", "ARCHIVE", "-S", "-k", "QueryRetrieveLevel=STUDY",
                        "-k", "PatientName=*", "-k", "StudyInstanceUID", HOST, str(port)),
            "getscu": (dcmtk("getscu"), "-aec", "ARCHIVE", "-S", "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"StudyInstanceUID={ct_study}", "-od", str(self.out), HOST, str(port)),
            "echoscu": (dcmtk("echoscu"), "-aec", "ARCHIVE", "--repeat", "2", HOST, str(port)),
        }  # fmt: skip
        try:
            for label, argv in runs.items():
                self.label = label
                code, stdout, stderr = await communicate(argv, env=DCMTK_ENV)
                assert code == 0, f"{label}: {stdout}{stderr}"
        finally:
            proxy.close()
            await proxy.wait_closed()
        return [(label, turns(events)) for label, events in self.sessions]


def _whole_pdus(buf: bytes) -> tuple[list[bytes], bytes]:
    pdus, pos = [], 0
    while pos + 6 <= len(buf):
        end = pos + 6 + struct.unpack_from(">I", buf, pos + 2)[0]
        if end > len(buf):
            break
        pdus.append(buf[pos:end])
        pos = end
    return pdus, buf[pos:]


def turns(events: list[tuple[bool, bytes]]) -> Turns:
    out: Turns = []
    seen, from_server, from_client = 0, b"", b""
    for client, data in events:
        if client:
            pdus, from_client = _whole_pdus(from_client + data)
            out += [(seen, pdu) for pdu in pdus]
        else:
            pdus, from_server = _whole_pdus(from_server + data)
            seen += len(pdus)
    return out


# ---------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------


def mutate_pdu(rnd: random.Random, pdu: bytes) -> bytes:
    b = bytearray(pdu)
    pdata = b[0] == 0x04 and len(b) >= 12
    op = rnd.randrange(9)
    if op == 0 and len(b) > 6:  # a bit
        b[rnd.randrange(6, len(b))] ^= 1 << rnd.randrange(8)
    elif op == 1:  # the PDU length
        n = struct.unpack_from(">I", b, 2)[0]
        b[2:6] = struct.pack(">I", max(0, rnd.choice((n - 1, n + 1, n - 4, n + 4, 0, 2 * n))))
    elif op == 2 and pdata:  # the PDV item length
        n = struct.unpack_from(">I", b, 6)[0]
        b[6:10] = struct.pack(">I", max(0, rnd.choice((n - 1, n + 1, n + 6, 0, 1, 2, n - 6))))
    elif op == 3 and pdata:  # the message control header
        b[11] = rnd.choice((0, 1, 2, 3, b[11] ^ 1, b[11] ^ 2, 0xFF, 4))
    elif op == 4 and pdata:  # the presentation context
        b[10] = rnd.choice((0, 1, 2, 3, 5, 7, 9, 255, (b[10] + 2) & 0xFF))
    elif op == 5 and len(b) > 12:  # the value cut short, lengths made to agree
        del b[rnd.randrange(12, len(b)) :]
        b[2:6] = struct.pack(">I", len(b) - 6)
        if pdata:
            b[6:10] = struct.pack(">I", len(b) - 10)
    elif op == 6 and len(b) > 16:  # a run of 0x00 / 0xFF / space / backslash in a value
        i, n = rnd.randrange(12, len(b)), rnd.choice((1, 2, 4, 8))
        b[i : i + n] = bytes([rnd.choice((0, 0xFF, 0x20, 0x5C))]) * len(b[i : i + n])
    elif op == 7 and pdata and struct.unpack_from(">I", b, 6)[0] > 4:  # one PDV split in two
        n = struct.unpack_from(">I", b, 6)[0]
        ctx, control, value = b[10], b[11], bytes(b[12 : 10 + n])
        k = rnd.randrange(1, len(value))
        body = (
            struct.pack(">IBB", k + 2, ctx, control & ~2) + value[:k]
            + struct.pack(">IBB", len(value) - k + 2, ctx, control) + value[k:] + bytes(b[10 + n :])
        )  # fmt: skip
        b = bytearray(b[:2] + struct.pack(">I", len(body)) + body)
    elif op == 8:  # the PDU type
        b[0] = rnd.choice((0, 1, 2, 3, 4, 5, 6, 7, 8))
    return bytes(b)


def mutate_session(rnd: random.Random, session: Turns) -> Turns:
    """1 to 3 mutations; the A-ASSOCIATE-RQ (the first PDU) is left alone."""
    t = list(session)
    for _ in range(rnd.choice((1, 1, 1, 2, 3))):
        if len(t) < 2:
            break
        i = rnd.randrange(1, len(t))
        op = rnd.randrange(10)
        if op <= 2:
            t[i] = (t[i][0], mutate_pdu(rnd, t[i][1]))
        elif op == 3 and i + 1 < len(t):  # two PDUs swapped
            t[i], t[i + 1] = (t[i][0], t[i + 1][1]), (t[i + 1][0], t[i][1])
        elif op == 4:
            del t[i]
        elif op == 5:
            t.insert(i, t[i])
        elif op == 6:
            t.insert(i, (t[i][0], RELEASE_RQ))
        elif op == 7:
            t.insert(i, (t[i][0], ABORT_RQ))
        elif op == 8:
            t = t[:i]
        else:  # cut inside a PDU
            pdu = t[i][1]
            t = [*t[:i], (t[i][0], pdu[: rnd.randrange(1, len(pdu))] if len(pdu) > 1 else pdu)]
    return t


# ---------------------------------------------------------------------------------
# Replay
# ---------------------------------------------------------------------------------


async def replay(port: int, rnd: random.Random | None, session: Turns) -> None:
    """Send ``session``; ``rnd``: split some PDUs in two writes and reset a fifth of the
    connections (``None``: as recorded)."""
    peer = await RawPeer.connect(port)
    got: list[bytes] = []

    async def read() -> None:
        while (pdu := await peer.read_pdu(10)) is not None:
            got.append(pdu)

    reader = asyncio.ensure_future(read())
    try:
        waiting = True  # once an answer does not come, the rest goes without waiting
        for seen, pdu in session:
            deadline = time.monotonic() + ANSWER_WAIT
            while waiting and len(got) < seen and not reader.done():
                if time.monotonic() > deadline:
                    waiting = False
                await asyncio.sleep(0.005)
            if reader.done():
                break
            try:
                if rnd is not None and len(pdu) > 8 and rnd.random() < 0.1:  # in two segments
                    k = rnd.randrange(1, len(pdu))
                    await peer.send(pdu[:k])
                    await asyncio.sleep(0.005)
                    pdu = pdu[k:]
                await peer.send(pdu)
            except (ConnectionError, TimeoutError):
                break
        if rnd is not None and rnd.random() < 0.2:  # reset, not closed
            with contextlib.suppress(OSError):
                sock = peer.writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            peer.writer.transport.abort()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(reader), 0.1)
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        await peer.close()


def test_mutations_of_a_session_are_deterministic() -> None:
    session = [(0, b"\x01\x00\x00\x00\x00\x02ab"), *[(i, bytes([4, 0, 0, 0, 0, 14]) + bytes(14)) for i in range(1, 8)]]
    assert mutate_session(random.Random(7), session) == mutate_session(random.Random(7), session)


@pytest.mark.timeout(3600 if LONG else 180)
async def test_replayed_sessions_with_mutations_harm_no_one(tmp_path: Path) -> None:
    raise_nofile()
    with server_process(tmp_path, "serve") as server:
        (tmp_path / "get").mkdir()
        sessions = await Recorder(server.port, tmp_path / "get").record()
        labels = {label for label, _ in sessions}
        assert labels == {"storescu", "storescu-4k", "findscu", "getscu", "echoscu"}, labels
        # The recording replays as it was (a mutation is all that changes a case).
        for label, session in sessions:
            if label.startswith("storescu"):
                await replay(server.port, None, session)
        async with LegitClient(server.port, interval=0.3, timeout=10) as legit, RSSWatch(server) as rss:
            seeds = iter(range(SEED, SEED + CASES))

            async def worker() -> None:
                for seed in seeds:
                    rnd = random.Random(seed)
                    _label, session = rnd.choice(sessions)
                    await replay(server.port, rnd, mutate_session(rnd, session))

            await asyncio.gather(*(worker() for _ in range(WORKERS)))
        server.check_log()
        text = server.log_text()
        assert '"level": "error"' not in text
        assert "DIMSE protocol violation" in text  # the mutations reach the DIMSE layer
        legit.check(minimum=2)
        rss.check(64 * MiB if not LONG else 128 * MiB)

        def connections() -> int:
            return sum(1 for c in server.ps.net_connections() if c.status != "LISTEN" and c.laddr.port == server.port)

        await wait_for(lambda: connections() == 0, 10, "every connection of the replayed clients closed")
        assert server.proc.poll() is None
