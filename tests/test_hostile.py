"""Hostile peers against our SCP, on raw TCP sockets.

Every test runs a dimse_async SCP in-process on 127.0.0.1, attacks it with raw bytes
(stalled, oversized, garbage, malformed and out-of-order PDUs, illegal DIMSE framing,
too many associations, silent peers) and, while the attack is in progress, proves that
a legitimate C-ECHO from our own SCU still succeeds.

Expected replies are the exact bytes the upper layer (PS3.8 §9.2, Table 9-10) sends:

- an A-ABORT with service-provider source (2) and the reason of the fault: 1
  unrecognized-PDU, 2 unexpected-PDU, 5 unexpected-PDU-parameter, 6
  invalid-PDU-parameter-value; 0 (not specified) for a DIMSE framing violation;
- an A-ABORT with service-user source (0) when the association idles out;
- nothing at all when ARTIM expires in Sta2 (AA-2 just closes the connection).

After an A-ABORT the acceptor waits in Sta13 for the peer to close, at most ARTIM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dimse_async import AE, AssociationAborted, AssociationRejected, Server, Verification
from dimse_async.acse import ContextSpec, build_request
from dimse_async.dimse import NO_DATASET, Command, CommandField, decode_command, encode_command
from dimse_async.pdu import (
    APPLICATION_CONTEXT,
    PDV,
    Abort,
    AssociateAC,
    AssociateRJ,
    PDataTF,
    PresentationContextAC,
    ReleaseRP,
    ReleaseRQ,
    UserInformation,
    decode_pdu,
)

HOST = "127.0.0.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MiB = 1 << 20

PROVIDER, USER = 2, 0
NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU, UNEXPECTED_PDU_PARAMETER = 0, 1, 2, 5
UNEXPECTED_PARAMETER, INVALID_PARAMETER_VALUE = 5, 6


def a_abort(source: int, reason: int) -> bytes:
    """An A-ABORT PDU, spelled out byte by byte (PS3.8 §9.3.8)."""
    return bytes((0x07, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, source, reason))


class Warnings(logging.Handler):
    """The WARNING lines of the ``dimse_async`` loggers while attached: (event, fields)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[tuple[str, dict[str, object]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(getattr(record, "dimse_async", {}))
        self.lines.append((str(fields.pop("event", record.getMessage())), fields))

    def __enter__(self) -> Warnings:
        logging.getLogger("dimse_async").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("dimse_async").removeHandler(self)

    def events(self, event: str) -> list[dict[str, object]]:
        return [fields for name, fields in self.lines if name == event]


def a_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU, spelled out byte by byte (PS3.8 §9.3.4)."""
    return bytes((0x03, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, result, source, reason))


# ---------------------------------------------------------------------------------
# Hand-built A-ASSOCIATE-RQ pieces (PS3.8 §9.3.2), so lengths can be made wrong
# ---------------------------------------------------------------------------------


def item(item_type: int, value: bytes, length: int | None = None) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value) if length is None else length) + value


def context_value(ctx_id: int = 1, abstract: str = Verification, syntaxes: tuple[str, ...] = (IMPLICIT_LE,)) -> bytes:
    subs = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return bytes((ctx_id, 0, 0, 0)) + subs


APP_CONTEXT = item(0x10, b"1.2.840.10008.3.1.1.1")
CONTEXT = item(0x20, context_value())
USER_INFO = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))


def associate_rq(items: bytes, *, length_delta: int = 0, called: bytes = b"SCP", calling: bytes = b"RAW") -> bytes:
    """A-ASSOCIATE-RQ from ``calling`` to ``called`` (16 bytes: padded with spaces);
    ``length_delta`` falsifies the PDU length."""
    fields = called.ljust(16)[:16] + calling.ljust(16)[:16]
    body = struct.pack(">HH", 1, 0) + fields + bytes(32) + items
    return struct.pack(">BBI", 0x01, 0, len(body) + length_delta) + body


def library_rq(*abstracts: str) -> bytes:
    """A valid A-ASSOCIATE-RQ encoded by dimse_async; context ids 1, 3, 5, ..."""
    specs = [ContextSpec(a, [IMPLICIT_LE]) for a in abstracts or (Verification,)]
    return build_request("SCP", "RAW", specs, max_pdu=16384).encode()


def echo_rq_pdata(ctx_id: int = 1, message_id: int = 7) -> bytes:
    cmd = encode_command(Command(CommandField.C_ECHO_RQ, message_id=message_id, affected_sop_class_uid=Verification))
    return PDataTF([PDV(ctx_id, True, True, cmd)]).encode()


# ---------------------------------------------------------------------------------
# Harness: our SCP, raw peers, a legitimate SCU
# ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_scp(**options: object) -> AsyncIterator[Server]:
    options.setdefault("artim_timeout", 1.0)
    options.setdefault("network_timeout", 30.0)
    ae = AE("SCP", **options)  # type: ignore[arg-type]
    ae.add_supported_context(Verification)
    server = await ae.start_server(HOST, 0)
    try:
        yield server
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)


class Peer:
    """A raw TCP client that speaks the upper layer protocol badly on purpose."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Peer:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 5)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 5)

    async def read_pdu(self, timeout: float = 2.0) -> bytes | None:
        """One whole PDU (header included), or ``None`` at EOF."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(6), timeout)
        except asyncio.IncompleteReadError as exc:
            assert not exc.partial, f"connection closed inside a PDU header: {exc.partial!r}"
            return None
        except ConnectionResetError:
            return None
        (length,) = struct.unpack(">I", header[2:])
        assert length <= MiB, f"server sent a PDU header claiming {length} bytes: {header.hex()}"
        return header + await asyncio.wait_for(self.reader.readexactly(length), timeout)

    async def expect_eof(self, timeout: float) -> bytes:
        """Read until the server closes (FIN or RST) and return what it sent before that.

        Fails the test if the connection is still open after ``timeout`` seconds.
        """
        received = bytearray()

        async def drain() -> None:
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    return
                if not chunk:
                    return
                received.extend(chunk)

        try:
            await asyncio.wait_for(drain(), timeout)
        except TimeoutError:
            pytest.fail(f"the server kept the connection open for more than {timeout} s (got {bytes(received)!r})")
        return bytes(received)

    def is_open(self) -> bool:
        return not self.reader.at_eof() and self.reader.exception() is None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


@contextlib.asynccontextmanager
async def raw_peer(port: int) -> AsyncIterator[Peer]:
    peer = await Peer.connect(port)
    try:
        yield peer
    finally:
        await peer.close()


async def raw_associate(peer: Peer, *abstracts: str) -> AssociateAC:
    """Associate over a raw socket with dimse_async's own RQ encoder; return the AC."""
    await peer.send(library_rq(*abstracts))
    reply = await peer.read_pdu(5)
    assert reply is not None and reply[0] == 0x02, f"expected an A-ASSOCIATE-AC, got {reply!r}"
    ac = decode_pdu(reply[0], reply[6:])
    assert isinstance(ac, AssociateAC)
    return ac


def scu(**options: object) -> AE:
    for name in ("connect_timeout", "acse_timeout", "dimse_timeout"):
        options.setdefault(name, 5.0)
    options.setdefault("network_timeout", None)
    ae = AE("SCU", **options)  # type: ignore[arg-type]
    ae.add_requested_context(Verification)
    return ae


async def echo_ok(port: int) -> None:
    """A legitimate association and C-ECHO must succeed promptly."""

    async def echo() -> int:
        async with scu().associate(HOST, port, called_ae="SCP") as assoc:
            return int(await assoc.c_echo())

    assert await asyncio.wait_for(echo(), 5) == 0x0000


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        await asyncio.sleep(0.02)


def split_pdus(data: bytes) -> list[bytes]:
    pdus, pos = [], 0
    while pos < len(data):
        assert len(data) - pos >= 6, f"trailing partial PDU header {data[pos:]!r}"
        (length,) = struct.unpack_from(">I", data, pos + 2)
        assert pos + 6 + length <= len(data), f"truncated PDU {data[pos:]!r}"
        pdus.append(data[pos : pos + 6 + length])
        pos += 6 + length
    return pdus


def assert_only_provider_aborts(reply: bytes, what: str) -> None:
    """Garbage may be answered with nothing or with A-ABORTs (source 2), never anything else."""
    for pdu in split_pdus(reply):
        assert pdu[:8] == a_abort(PROVIDER, 0)[:8] and pdu[8] == PROVIDER, f"{what}: unexpected reply {pdu.hex()}"
        assert pdu[9] in (UNRECOGNIZED_PDU, UNEXPECTED_PDU, 4, UNEXPECTED_PARAMETER, INVALID_PARAMETER_VALUE), what


# ---------------------------------------------------------------------------------
# 1. Stalled peers and ARTIM
# ---------------------------------------------------------------------------------


async def test_twelve_stalled_partial_pdus_are_closed_by_artim_and_lock_nobody_out() -> None:
    artim = 1.0
    loop = asyncio.get_running_loop()
    async with running_scp(artim_timeout=artim) as server:
        peers = [await Peer.connect(server.port) for _ in range(12)]
        try:
            start = loop.time()
            for peer in peers:
                await peer.send(library_rq()[:10])  # a header and four bytes of body, then silence
            await echo_ok(server.port)  # nobody is locked out while they hang
            assert loop.time() - start < artim * 0.8, "the legitimate C-ECHO had to wait for the stalled peers"
            assert all(p.is_open() for p in peers), "a stalled peer was closed before ARTIM expired"

            replies = await asyncio.wait_for(asyncio.gather(*(p.expect_eof(artim + 3) for p in peers)), artim + 5)
            elapsed = loop.time() - start
            assert replies == [b""] * 12  # Sta2 + ARTIM expiry is AA-2: close, send nothing
            assert artim * 0.8 <= elapsed <= artim + 3, elapsed
            await wait_until(lambda: not server.associations, 2, "the server forgot the stalled connections")
            await echo_ok(server.port)
        finally:
            for peer in peers:
                await peer.close()


@pytest.mark.parametrize(
    "payload",
    [b"", library_rq()[:6], library_rq()[:-1]],
    ids=["nothing", "pdu-header-only", "all-but-last-byte"],
)
async def test_silent_or_incomplete_peer_is_closed_after_artim(payload: bytes) -> None:
    artim = 0.5
    loop = asyncio.get_running_loop()
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        start = loop.time()
        if payload:
            await peer.send(payload)
        await echo_ok(server.port)
        assert await peer.expect_eof(artim + 3) == b""
        assert loop.time() - start >= artim * 0.8
        await echo_ok(server.port)


async def test_dribbling_peer_does_not_extend_artim() -> None:
    """A slowloris peer sends its RQ a byte at a time: receiving data must not restart ARTIM."""
    artim = 1.0
    loop = asyncio.get_running_loop()
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        rq = library_rq()

        async def dribble() -> None:
            for byte in rq:
                try:
                    peer.writer.write(bytes((byte,)))
                    await peer.writer.drain()
                except ConnectionError:
                    return
                await asyncio.sleep(0.1)

        dribbler = asyncio.ensure_future(dribble())
        try:
            start = loop.time()
            await echo_ok(server.port)
            assert await peer.expect_eof(artim + 3) == b""
            assert artim * 0.8 <= loop.time() - start <= artim + 3
        finally:
            dribbler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dribbler


# ---------------------------------------------------------------------------------
# 2. Oversized PDU claims
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pdu_type", [0x04, 0x01], ids=["P-DATA-TF", "A-ASSOCIATE-RQ"])
@pytest.mark.parametrize("associated", [False, True], ids=["sta2", "sta6"])
async def test_64_mib_pdu_claim_is_refused_from_its_header(pdu_type: int, associated: bool) -> None:
    artim = 1.0
    process = psutil.Process()
    loop = asyncio.get_running_loop()
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        if associated:
            await raw_associate(peer)
        rss_before = process.memory_info().rss
        start = loop.time()
        await peer.send(struct.pack(">BBI", pdu_type, 0, 0x04000000))  # claims 64 MiB, sends none of it
        reply = await peer.read_pdu(timeout=1.0)
        assert reply == a_abort(PROVIDER, INVALID_PARAMETER_VALUE)
        # answered before ARTIM could have run out (no body ever comes: waiting for it
        # would mean no answer, or only ARTIM's close)
        assert loop.time() - start < artim, "the server waited for the body before answering"

        # Whatever follows is not buffered: the stream cannot be framed any more.
        with contextlib.suppress(ConnectionError):
            await peer.send(bytes(MiB))
        await echo_ok(server.port)
        buffered = [a.fsm.reader.buffered for a in server.associations if a.fsm.reader.buffered]
        assert all(n <= 64 * 1024 for n in buffered), buffered
        assert process.memory_info().rss - rss_before < 16 * MiB

        assert await peer.expect_eof(artim + 3) == b""  # Sta13: ARTIM closes if we do not
    assert process.memory_info().rss - rss_before < 16 * MiB


# ---------------------------------------------------------------------------------
# 3. Garbage
# ---------------------------------------------------------------------------------


def garbage_for(seed: int) -> bytes:
    rnd = random.Random(seed)
    data = rnd.randbytes(rnd.randrange(1, 4096))
    if seed % 2:  # half of them start like a PDU of a known type, to get past the type check
        data = bytes((rnd.randrange(1, 8), 0)) + data
    return data


async def test_random_garbage_is_aborted_or_closed() -> None:
    artim = 0.5
    seeds = range(10)
    async with running_scp(artim_timeout=artim) as server:
        peers = [await Peer.connect(server.port) for _ in seeds]
        try:
            for seed, peer in zip(seeds, peers):
                with contextlib.suppress(ConnectionError):
                    await peer.send(garbage_for(seed))
            await echo_ok(server.port)
            replies = await asyncio.wait_for(asyncio.gather(*(p.expect_eof(artim + 3) for p in peers)), artim + 5)
            for seed, reply in zip(seeds, replies):
                assert_only_provider_aborts(reply, f"seed {seed}")
            # Plain garbage (first byte not a PDU type) is refused at once: unrecognized PDU.
            for seed, reply in zip(seeds, replies):
                if not 1 <= garbage_for(seed)[0] <= 7:
                    assert reply == a_abort(PROVIDER, UNRECOGNIZED_PDU), f"seed {seed}"
            await wait_until(lambda: not server.associations, 2, "the server forgot the garbage connections")
            await echo_ok(server.port)
        finally:
            for peer in peers:
                await peer.close()


async def _garbage_scenario(garbage: bytes) -> None:
    artim = 0.3
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        with contextlib.suppress(ConnectionError):
            await peer.send(garbage)
        await echo_ok(server.port)
        assert_only_provider_aborts(await peer.expect_eof(artim + 3), repr(garbage[:32]))
        await echo_ok(server.port)


_pdu_like = st.builds(
    lambda t, n, rest: struct.pack(">BBI", t, 0, n) + rest,
    st.integers(1, 7),
    st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)),
    st.binary(max_size=128),
)


@settings(max_examples=10, deadline=None, database=None)
@given(garbage=st.one_of(st.binary(min_size=1, max_size=256), _pdu_like))
def test_hypothesis_garbage_is_aborted_or_closed(garbage: bytes) -> None:
    asyncio.run(asyncio.wait_for(_garbage_scenario(garbage), 10))


# ---------------------------------------------------------------------------------
# 4. Malformed A-ASSOCIATE-RQ
# ---------------------------------------------------------------------------------


async def test_hand_built_associate_rq_is_accepted() -> None:
    """Positive control: without the faults below, the hand-built RQ gets an AC."""
    async with running_scp() as server, raw_peer(server.port) as peer:
        await peer.send(associate_rq(APP_CONTEXT + CONTEXT + USER_INFO))
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x02, reply
        ac = decode_pdu(0x02, reply[6:])
        assert isinstance(ac, AssociateAC)
        assert [(pc.id, pc.result, pc.transfer_syntax) for pc in ac.presentation_contexts] == [(1, 0, IMPLICIT_LE)]


_VALUE = context_value()
MALFORMED_RQ = {
    "context-item-overruns-pdu": (
        associate_rq(APP_CONTEXT + item(0x20, _VALUE, length=len(_VALUE) + 200) + USER_INFO),
        INVALID_PARAMETER_VALUE,
    ),
    "abstract-syntax-overruns-context": (
        associate_rq(
            APP_CONTEXT + item(0x20, b"\x01\x00\x00\x00" + item(0x30, Verification.encode(), 0xFFFF)) + USER_INFO
        ),
        INVALID_PARAMETER_VALUE,
    ),
    "truncated-context-item": (
        associate_rq(APP_CONTEXT + item(0x20, b"\x01\x00") + USER_INFO),
        INVALID_PARAMETER_VALUE,
    ),
    "context-without-transfer-syntax": (
        associate_rq(APP_CONTEXT + item(0x20, context_value(syntaxes=())) + USER_INFO),
        INVALID_PARAMETER_VALUE,
    ),
    "pdu-length-cuts-user-info": (
        associate_rq(APP_CONTEXT + CONTEXT + USER_INFO, length_delta=-5),
        INVALID_PARAMETER_VALUE,
    ),
    "pdu-shorter-than-fixed-fields": (struct.pack(">BBI", 0x01, 0, 20) + bytes(20), INVALID_PARAMETER_VALUE),
    "max-length-sub-item-of-2-bytes": (
        associate_rq(APP_CONTEXT + CONTEXT + item(0x50, item(0x51, b"\x40\x00") + item(0x52, b"1.2.3"))),
        INVALID_PARAMETER_VALUE,
    ),
    "pdu-length-covers-zero-padding": (
        associate_rq(APP_CONTEXT + CONTEXT + USER_INFO + bytes(8)),
        UNEXPECTED_PARAMETER,
    ),
}


@pytest.mark.parametrize("name", list(MALFORMED_RQ))
async def test_malformed_associate_rq_is_aborted(name: str) -> None:
    data, reason = MALFORMED_RQ[name]
    artim = 0.5
    with Warnings() as log:
        async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
            await peer.send(data)
            assert await peer.read_pdu(1.0) == a_abort(PROVIDER, reason)
            await echo_ok(server.port)
            assert await peer.expect_eof(artim + 3) == b""
            await wait_until(lambda: not server.associations, 2, "the server forgot the connection")
    (line,) = log.events("connection refused")
    assert str(line["reason"]).startswith("invalid PDU: ") and str(line["peer"]).startswith(HOST), line


@pytest.mark.parametrize(
    ("name", "data", "answer", "why"),
    [
        ("no-presentation-context", associate_rq(APP_CONTEXT + USER_INFO), a_associate_rj(1, 2, 1), "no presentation"),
        (
            "protocol-version-2",
            associate_rq(APP_CONTEXT + CONTEXT + USER_INFO).replace(b"\x00\x01\x00\x00SCP", b"\x00\x02\x00\x00SCP", 1),
            a_associate_rj(1, 2, 2),
            "protocol version 0x0002",
        ),
    ],
)
async def test_request_the_provider_rejects_is_logged_even_when_the_peer_closes_at_once(
    name: str, data: bytes, answer: bytes, why: str
) -> None:
    """AE-6's own rejections (PS3.8 Table 9-7): rejected-permanent, service-provider
    (ACSE); the peer closes at once (no ARTIM expiry to log), the WARNING says why."""
    with Warnings() as log:
        async with running_scp(artim_timeout=5.0) as server, raw_peer(server.port) as peer:
            await peer.send(data)
            assert await peer.read_pdu(1.0) == answer
            await peer.close()
            await wait_until(lambda: not server.associations, 2, "the server forgot the connection")
            await echo_ok(server.port)
    (line,) = log.events("connection refused")
    assert why in str(line["reason"]), line


async def test_associate_rq_longer_than_sent_waits_only_until_artim() -> None:
    """A PDU length larger than what is sent is indistinguishable from a slow peer: ARTIM."""
    artim = 0.5
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        await peer.send(associate_rq(APP_CONTEXT + CONTEXT + USER_INFO, length_delta=100))
        await echo_ok(server.port)
        assert await peer.expect_eof(artim + 3) == b""


CALLED_NOT_RECOGNIZED = a_associate_rj(1, 1, 7)
CALLING_NOT_RECOGNIZED = a_associate_rj(1, 1, 3)

#: AE title fields the AE VR does not allow (PS3.5 §6.2, PS3.8 Table 9-11): 16 bytes each.
BAD_TITLES = {
    "called-all-spaces": (b" " * 16, b"RAW", CALLED_NOT_RECOGNIZED),
    "calling-all-spaces": (b"SCP", b" " * 16, CALLING_NOT_RECOGNIZED),
    "calling-all-nul": (b"SCP", bytes(16), CALLING_NOT_RECOGNIZED),
    "calling-nul-padded": (b"SCP", b"RAW".ljust(16, b"\x00"), CALLING_NOT_RECOGNIZED),
    "calling-escape": (b"SCP", b"R\x1b[2JAW", CALLING_NOT_RECOGNIZED),
    "calling-newline": (b"SCP", b"RAW\nFORGED", CALLING_NOT_RECOGNIZED),
    "calling-tab": (b"SCP", b"R\tAW", CALLING_NOT_RECOGNIZED),
    "calling-backslash": (b"SCP", b"R\\AW", CALLING_NOT_RECOGNIZED),
    "calling-del": (b"SCP", b"RAW\x7f", CALLING_NOT_RECOGNIZED),
    "calling-not-ascii": (b"SCP", b"R\xe9AW", CALLING_NOT_RECOGNIZED),
    "called-control": (b"S\x00CP", b"RAW", CALLED_NOT_RECOGNIZED),
    "both-blank": (b" " * 16, b" " * 16, CALLED_NOT_RECOGNIZED),
}


@pytest.mark.parametrize("name", list(BAD_TITLES))
async def test_ae_title_the_ae_vr_forbids_is_rejected_with_a_warning(name: str) -> None:
    """Refused even by an SCP that answers any called title and any calling title."""
    called, calling, answer = BAD_TITLES[name]
    with Warnings() as log:
        async with running_scp(require_called_ae=False, artim_timeout=0.5) as server, raw_peer(server.port) as peer:
            await peer.send(associate_rq(APP_CONTEXT + CONTEXT + USER_INFO, called=called, calling=calling))
            assert await peer.read_pdu(2.0) == answer
            assert await peer.expect_eof(3) == b""
            await echo_ok(server.port)
            await wait_until(lambda: not server.associations, 2, "the server forgot the rejected association")
    (line,) = log.events("association rejected")
    which = "called" if answer == CALLED_NOT_RECOGNIZED else "calling"
    assert str(line["why"]).startswith(f"{which} AE title"), line
    assert str(line["peer"]).startswith(HOST), line
    assert "not-recognized" in str(line["answer"]), line


#: Odd titles the AE VR allows: spaces around them, 16 characters, any printable but backslash.
GOOD_TITLES = [b"  LEADING", b"X" * 16, b"~!#$%&'()*+,-./:", b';<=>?@[]^_`{|}"', b"A B", b"1"]


@pytest.mark.parametrize("title", GOOD_TITLES, ids=[t.decode() for t in GOOD_TITLES])
async def test_odd_but_valid_ae_titles_are_accepted(title: bytes) -> None:
    significant = title.decode().strip(" ")
    async with running_scp(allowed_calling_aes=[significant]) as server, raw_peer(server.port) as peer:
        await peer.send(associate_rq(APP_CONTEXT + CONTEXT + USER_INFO, calling=title))
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x02, reply
        ac = decode_pdu(0x02, reply[6:])
        assert isinstance(ac, AssociateAC) and ac.calling_ae == significant
        await peer.send(echo_rq_pdata())
        assert (await peer.read_pdu()) is not None
        await peer.send(ReleaseRQ().encode())
        assert await peer.read_pdu() == ReleaseRP().encode()


@pytest.mark.parametrize("max_length", [1, 6, 63, 64, 1023])
async def test_tiny_maximum_length_is_rejected_with_a_warning(max_length: int) -> None:
    """PS3.8 D.1 sets no minimum; below the 1024 bytes we allow ourselves, refused:
    rejected-permanent, service-user, no-reason-given, and one WARNING saying why."""
    user_info = item(0x50, item(0x51, struct.pack(">I", max_length)) + item(0x52, b"1.2.3"))
    with Warnings() as log:
        async with running_scp(artim_timeout=0.5) as server, raw_peer(server.port) as peer:
            await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info))
            assert await peer.read_pdu(2.0) == a_associate_rj(1, 1, 1)
            assert await peer.expect_eof(3) == b""
            await echo_ok(server.port)
    (line,) = log.events("association rejected")
    assert f"maximum length received {max_length} " in str(line["why"]), line
    assert str(line["peer"]).startswith(HOST), line


@pytest.mark.parametrize("max_length", [0, 1024])
async def test_unlimited_or_smallest_usable_maximum_length_is_accepted(max_length: int) -> None:
    user_info = item(0x50, item(0x51, struct.pack(">I", max_length)) + item(0x52, b"1.2.3"))
    async with running_scp() as server, raw_peer(server.port) as peer:
        await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info))
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x02, reply
        await peer.send(echo_rq_pdata())
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x04 and len(reply) <= max(max_length, 1 << 20), reply
        await peer.send(ReleaseRQ().encode())
        assert await peer.read_pdu() == ReleaseRP().encode()


def uid_field(uid: str) -> bytes:
    return struct.pack(">H", len(uid)) + uid.encode()


async def test_extended_negotiation_is_answered_once_and_only_for_accepted_classes() -> None:
    """PS3.7 D.3.3.5: one AC sub-item per SOP class at most; classes not accepted on a
    context (here never proposed) are not put to the application."""
    asked: list[tuple[str, bytes]] = []
    ae = AE("SCP", artim_timeout=1.0)
    ae.add_supported_context(Verification)
    ae.add_supported_context(CT_IMAGE_STORAGE)

    @ae.on_extended_negotiation
    def reply(sop_class: str, info: bytes) -> bytes:
        asked.append((sop_class, info))
        return b"\x01"

    ext = [(Verification, b"\x01"), (Verification, b"\x02"), (CT_IMAGE_STORAGE, b"\x03")]
    user_info = item(
        0x50,
        item(0x51, struct.pack(">I", 16384))
        + item(0x52, b"1.2.3")
        + b"".join(item(0x56, uid_field(uid) + info) for uid, info in ext),
    )
    server = await ae.start_server(HOST, 0)
    try:
        async with raw_peer(server.port) as peer:
            await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info))
            reply_pdu = await peer.read_pdu()
            assert reply_pdu is not None and reply_pdu[0] == 0x02, reply_pdu
            ac = decode_pdu(0x02, reply_pdu[6:])
            assert isinstance(ac, AssociateAC)
            assert [(e.sop_class_uid, e.info) for e in ac.user_info.extended] == [(Verification, b"\x01")]
            await peer.send(ReleaseRQ().encode())
            assert await peer.read_pdu() == ReleaseRP().encode()
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)
    assert asked == [(Verification, b"\x01")]


@contextlib.asynccontextmanager
async def raw_acceptor(answer: Callable[[bytes], bytes]) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A raw acceptor: reads the A-ASSOCIATE-RQ, sends ``answer(rq)``, then records every
    PDU the requestor sends until it closes. Yields (port, PDUs received after the RQ)."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        try:
            rq = await peer.read_pdu(5)
            assert rq is not None and rq[0] == 0x01
            await peer.send(answer(rq))
            while (pdu := await peer.read_pdu(5)) is not None:
                received.append(pdu)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


@pytest.mark.parametrize("max_length", [1, 6, 1023])
async def test_requestor_aborts_an_association_whose_peer_takes_tiny_pdus(max_length: int) -> None:
    """An A-ASSOCIATE-AC whose maximum length is below 1024: our requestor cannot reject
    it, so it aborts (service-user source) with a WARNING, and ``associate()`` says why
    (a maximum length of 1..6 used to fail every later send with ValueError)."""

    def ac_for(rq: bytes) -> bytes:
        ui = UserInformation(max_length=max_length, implementation_class_uid="1.2.3")
        return AssociateAC("SCP", "SCU", [PresentationContextAC(1, 0, IMPLICIT_LE)], ui).encode()

    with Warnings() as log:
        async with raw_acceptor(ac_for) as (port, received):
            with pytest.raises(AssociationAborted, match=f"maximum length received {max_length} is below 1024"):
                await asyncio.wait_for(scu().associate(HOST, port, called_ae="SCP"), 5)
            await wait_until(lambda: bool(received), 5, "the A-ABORT arrived")
    assert received == [a_abort(USER, 0)]
    (line,) = log.events("association accepted by peer but unusable")
    assert str(max_length) in str(line["why"]), line


def reserved_set(data: bytes, *positions: int) -> bytes:
    out = bytearray(data)
    for pos in positions:
        out[pos] = 0xFF
    return bytes(out)


async def test_reserved_fields_are_not_tested() -> None:
    """PS3.8 §9.3 (Tables 9-11 ... 9-26) and Annex E: reserved fields are sent as zeros
    "but not tested" when received: nonzero reserved bytes and bits change nothing."""

    def rsv_item(item_type: int, value: bytes) -> bytes:
        return struct.pack(">BBH", item_type, 0xFF, len(value)) + value

    context = rsv_item(
        0x20, b"\x01\xff\xff\xff" + rsv_item(0x30, Verification.encode()) + rsv_item(0x40, IMPLICIT_LE.encode())
    )
    user_info = rsv_item(0x50, rsv_item(0x51, struct.pack(">I", 16384)) + rsv_item(0x52, b"1.2.3"))
    body = struct.pack(">H", 1) + b"\xff\xff" + b"SCP".ljust(16) + b"RAW".ljust(16) + b"\xff" * 32
    body += rsv_item(0x10, APPLICATION_CONTEXT.encode()) + context + user_info
    rq = struct.pack(">BBI", 0x01, 0xFF, len(body)) + body
    echo = reserved_set(echo_rq_pdata(), 1)  # PDU header's reserved byte
    echo = echo[:11] + bytes((echo[11] | 0xFC,)) + echo[12:]  # message control header bits 2-7
    async with running_scp() as server, raw_peer(server.port) as peer:
        await peer.send(rq)
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x02, reply
        await peer.send(echo)
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x04, reply
        rsp = decode_command(reply[12:])
        assert (rsp.command_field, rsp.status) == (0x8030, 0)
        await peer.send(bytes((0x05, 0xFF, 0, 0, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF)))  # A-RELEASE-RQ
        assert await peer.read_pdu() == ReleaseRP().encode()


async def test_a_abort_with_reserved_bytes_and_odd_source_and_reason_just_closes() -> None:
    """PS3.8 §9.3.8: source 1 and reasons past 6 are reserved values; any A-ABORT ends the
    association (AA-3): the connection closes, a WARNING names source and reason."""
    with Warnings() as log:
        async with running_scp() as server, raw_peer(server.port) as peer:
            await raw_associate(peer)
            await peer.send(bytes((0x07, 0xFF, 0, 0, 0, 4, 0xFF, 0xFF, 0x01, 0xFF)))
            assert await peer.expect_eof(2) == b""
            await wait_until(lambda: not server.associations, 2, "the server forgot the aborted association")
            await echo_ok(server.port)
    (line,) = log.events("association aborted")
    assert "source 1, reason 255" in str(line["reason"]), line


# ---------------------------------------------------------------------------------
# 5. PDUs out of order for the state
# ---------------------------------------------------------------------------------

OUT_OF_ORDER_IN_STA2 = {
    "P-DATA-TF": echo_rq_pdata(),
    "A-RELEASE-RQ": ReleaseRQ().encode(),
    "A-RELEASE-RP": ReleaseRP().encode(),
    "A-ASSOCIATE-RJ": AssociateRJ(1, 1, 1).encode(),
}


@pytest.mark.parametrize("name", list(OUT_OF_ORDER_IN_STA2))
async def test_pdu_before_association_is_aborted(name: str) -> None:
    artim = 0.5
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        await peer.send(OUT_OF_ORDER_IN_STA2[name])
        assert await peer.read_pdu(1.0) == a_abort(PROVIDER, UNEXPECTED_PDU)
        await echo_ok(server.port)
        assert await peer.expect_eof(artim + 3) == b""


async def test_a_abort_before_association_just_closes() -> None:
    async with running_scp(artim_timeout=5.0) as server, raw_peer(server.port) as peer:
        await peer.send(Abort(USER, 0).encode())
        assert await peer.expect_eof(1.0) == b""  # AA-2 at once, no ARTIM wait, no reply
        await echo_ok(server.port)


async def test_second_associate_rq_on_an_association_is_aborted() -> None:
    artim = 0.5
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        await raw_associate(peer)
        await peer.send(library_rq())
        assert await peer.read_pdu(1.0) == a_abort(PROVIDER, UNEXPECTED_PDU)
        await echo_ok(server.port)
        assert await peer.expect_eof(artim + 3) == b""
        await wait_until(lambda: not server.associations, 2, "the server forgot the aborted association")


# ---------------------------------------------------------------------------------
# 6. DIMSE framing violations on an established association
# ---------------------------------------------------------------------------------


async def test_raw_association_answers_a_c_echo() -> None:
    """Positive control for the DIMSE cases: the raw echo on the accepted context works."""
    async with running_scp() as server, raw_peer(server.port) as peer:
        ac = await raw_associate(peer, Verification, CT_IMAGE_STORAGE)
        assert [(pc.id, pc.result) for pc in ac.presentation_contexts] == [(1, 0), (3, 3)]
        await peer.send(echo_rq_pdata(1, message_id=7))
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x04, reply
        pdata = decode_pdu(0x04, reply[6:])
        assert isinstance(pdata, PDataTF)
        (pdv,) = pdata.pdvs
        assert pdv.context_id == 1 and pdv.is_command and pdv.is_last
        rsp = decode_command(pdv.data)
        assert (rsp.command_field, rsp.message_id_being_responded_to, rsp.status) == (0x8030, 7, 0)
        await peer.send(ReleaseRQ().encode())
        assert await peer.read_pdu() == ReleaseRP().encode()


DIMSE_VIOLATIONS = {
    "command-on-rejected-context": echo_rq_pdata(3),
    "command-on-never-proposed-context": echo_rq_pdata(0x7F),
    "data-set-without-command": PDataTF([PDV(1, False, True, b"\x08\x00\x18\x00\x02\x00\x00\x00OK")]).encode(),
    "response-to-a-request-never-sent": PDataTF(
        [
            PDV(
                1,
                True,
                True,
                encode_command(
                    Command(
                        CommandField.C_ECHO_RSP,
                        message_id_being_responded_to=99,
                        affected_sop_class_uid=Verification,
                        status=0,
                        data_set_type=NO_DATASET,
                    )
                ),
            )
        ]
    ).encode(),
    "command-set-without-command-field": PDataTF(
        [PDV(1, True, True, b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00")]
    ).encode(),
}


@pytest.mark.parametrize("name", list(DIMSE_VIOLATIONS))
async def test_dimse_framing_violation_is_aborted(name: str) -> None:
    artim = 0.5
    async with running_scp(artim_timeout=artim) as server, raw_peer(server.port) as peer:
        await raw_associate(peer, Verification, CT_IMAGE_STORAGE)
        await peer.send(DIMSE_VIOLATIONS[name])
        # A PDV out of turn (a data set where a command set is due) is an unexpected-PDU
        # parameter (PS3.8 Table 9-26, as dcm4che answers it); the others not specified.
        reason = UNEXPECTED_PDU_PARAMETER if name == "data-set-without-command" else NOT_SPECIFIED
        assert await peer.read_pdu(1.0) == a_abort(PROVIDER, reason)
        await echo_ok(server.port)
        assert await peer.expect_eof(artim + 3) == b""
        await wait_until(lambda: not server.associations, 2, "the server forgot the aborted association")


async def test_request_behind_a_violation_is_not_served() -> None:
    calls: list[str] = []
    ae = AE("SCP", artim_timeout=0.5)
    ae.add_supported_context(Verification)

    @ae.on_c_echo
    async def count(request: object) -> int:
        calls.append("c-echo")
        return 0

    server = await ae.start_server(HOST, 0)
    try:
        async with raw_peer(server.port) as peer:
            await raw_associate(peer)
            # One write, one segment: a command on a context that was never accepted,
            # then a well-formed C-ECHO-RQ. The first aborts the association (AA-8);
            # the second arrives in Sta13 and must be ignored (AA-6).
            await peer.send(echo_rq_pdata(9) + echo_rq_pdata(1))
            reply = await peer.expect_eof(3.5)
            assert split_pdus(reply)[0] == a_abort(PROVIDER, NOT_SPECIFIED)
        await wait_until(lambda: not server.associations, 2, "the server forgot the aborted association")
        assert calls == [], "the C-ECHO handler ran for a request received after the association was aborted"
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)


# ---------------------------------------------------------------------------------
# 7. max_associations
# ---------------------------------------------------------------------------------


async def test_max_associations_rejects_transient_local_limit() -> None:
    async with running_scp(max_associations=2, artim_timeout=0.5) as server:
        client = scu()
        # Connections that never associate (Sta2) do not take association slots.
        stalled = [await Peer.connect(server.port) for _ in range(3)]
        held = [await asyncio.wait_for(client.associate(HOST, server.port, called_ae="SCP"), 5) for _ in range(2)]
        try:
            with pytest.raises(AssociationRejected) as info:
                await asyncio.wait_for(client.associate(HOST, server.port, called_ae="SCP"), 5)
            assert (info.value.result, info.value.source, info.value.reason) == (2, 3, 2)

            async with raw_peer(server.port) as peer:
                await peer.send(library_rq())
                assert await peer.read_pdu() == bytes.fromhex("03 00 00000004 00 02 03 02")

            # The held associations are untouched by the refusals.
            assert [int(await asyncio.wait_for(a.c_echo(), 5)) for a in held] == [0, 0]
        finally:
            for assoc in held:
                await asyncio.wait_for(assoc.release(), 5)
            for peer in stalled:
                await peer.close()
        # Slots are given back on release.
        await wait_until(lambda: not server.over_limit(), 2, "released associations freed their slots")
        await echo_ok(server.port)


# ---------------------------------------------------------------------------------
# 8. Network idle timeout
# ---------------------------------------------------------------------------------


async def test_silent_raw_association_is_aborted_after_network_timeout() -> None:
    idle, artim = 0.6, 0.5
    loop = asyncio.get_running_loop()
    async with running_scp(network_timeout=idle, artim_timeout=artim) as server, raw_peer(server.port) as peer:
        start = loop.time()  # the idle time cannot start before this
        await raw_associate(peer)
        await echo_ok(server.port)
        reply = await peer.read_pdu(idle + 3)
        elapsed = loop.time() - start
        assert reply == a_abort(USER, 0)  # the local service-user gives up on the silent peer
        assert idle * 0.8 <= elapsed <= idle + 2, elapsed
        assert await peer.expect_eof(artim + 3) == b""
        await echo_ok(server.port)


async def test_peer_that_stops_reading_is_timed_out() -> None:
    idle, artim = 0.5, 0.5
    ae = AE("SCP", artim_timeout=artim, network_timeout=idle, max_associations=1)
    ae.add_supported_context(Verification)

    @ae.on_association("accepted")
    def small_buffers(assoc: object) -> None:
        # Shrink the server's buffers so a few hundred responses fill them; a real
        # attacker just sends more requests (the default high-water mark is 4 MiB).
        transport = assoc.transport  # type: ignore[attr-defined]
        transport.set_write_buffer_limits(high=4096)
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    server = await ae.start_server(HOST, 0)
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, server.port)), 5)
        reader, writer = await asyncio.open_connection(sock=sock)
        peer = Peer(reader, writer)
        try:
            await raw_associate(peer)
            # Pipeline requests and never read a response, then go silent.
            writer.write(echo_rq_pdata(1) * 2000)
            await wait_until(lambda: not server.associations, idle + artim + 3, "the non-reading peer was dropped")
            await echo_ok(server.port)  # its max_associations slot is free again
        finally:
            writer.transport.abort()
    finally:
        sock.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)


async def test_silent_scu_association_is_aborted_but_a_busy_one_is_not() -> None:
    idle = 0.5
    async with running_scp(network_timeout=idle, artim_timeout=0.5) as server:
        client = scu()
        busy = await asyncio.wait_for(client.associate(HOST, server.port, called_ae="SCP"), 5)
        silent = await asyncio.wait_for(client.associate(HOST, server.port, called_ae="SCP"), 5)
        try:
            # Traffic on ``busy`` every ~0.1 s (well inside the 0.5 s idle limit) for 1.2 s,
            # past the idle timeout, and until ``silent`` is closed (bounded).
            loop = asyncio.get_running_loop()
            start = loop.time()
            while loop.time() - start < 1.2 or not silent.is_closed:
                assert loop.time() - start < idle + 5, "the silent association was not closed"
                assert int(await asyncio.wait_for(busy.c_echo(), 5)) == 0
                await asyncio.sleep(0.1)
            await asyncio.wait_for(silent.wait_closed(), idle + 3)
            assert (silent.end_reason or "").startswith("aborted by peer (A-ABORT source 0"), silent.end_reason
            with pytest.raises(AssociationAborted):
                await silent.c_echo()
            assert busy.is_established
        finally:
            await asyncio.wait_for(busy.release(), 5)
            silent.abort()
