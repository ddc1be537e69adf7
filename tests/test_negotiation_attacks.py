"""Odd and hostile association negotiation, both ways, on raw sockets (PS3.8 §9, PS3.7 Annex D).

Our SCP answers hand-built A-ASSOCIATE-RQs that the other suites do not send: padded
and over-long abstract syntaxes, more than 128 presentation contexts, asynchronous
operations windows of 0 and 65535, role selection for a class never proposed or for
the SCP role only, user identity types it has no authenticator for, extended
negotiation for unknown classes, no implementation class UID, unusual protocol
version bits; then release misbehaviour (P-DATA-TF or a second A-RELEASE-RQ after the
A-RELEASE-RQ, an unsolicited A-RELEASE-RP). Our SCU meets a raw acceptor that takes
PDUs of 1024 and 1031 bytes, collides releases, sends P-DATA-TF while we wait for the
A-RELEASE-RP, aborts instead of answering the release, or answers the A-ASSOCIATE-RQ
with a PDU other than AC/RJ. The expected answers are bytes PS3.8 Table 9-10 and
§9.3 prescribe.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from test_hostile import (
    APP_CONTEXT,
    CONTEXT,
    CT_IMAGE_STORAGE,
    HOST,
    IMPLICIT_LE,
    INVALID_PARAMETER_VALUE,
    NOT_SPECIFIED,
    PROVIDER,
    UNEXPECTED_PDU,
    UNRECOGNIZED_PDU,
    Warnings,
    a_abort,
    a_associate_rj,
    associate_rq,
    context_value,
    echo_ok,
    echo_rq_pdata,
    item,
    raw_peer,
    running_scp,
    uid_field,
)

from dimse_async import AE, AssociationAborted, AssociationTimeout, Verification
from dimse_async.dimse import Command, CommandField, decode_command, encode_command
from dimse_async.pdu import (
    PDV,
    Abort,
    AssociateAC,
    PDataTF,
    PresentationContextAC,
    ReleaseRP,
    ReleaseRQ,
    UserInformation,
    decode_pdu,
)

EXPLICIT_LE = "1.2.840.10008.1.2.1"
USER_REJECTION, NO_REASON, ABSTRACT_NOT_SUPPORTED, TS_NOT_SUPPORTED = 1, 2, 3, 4


def user_info(*subs: bytes, max_length: int | None = 16384, impl: bytes | None = b"1.2.3") -> bytes:
    body = b"" if max_length is None else item(0x51, struct.pack(">I", max_length))
    if impl is not None:
        body += item(0x52, impl)
    return item(0x50, body + b"".join(subs))


def raw_context(ctx_id: int, abstract: bytes, *syntaxes: bytes) -> bytes:
    return item(0x20, bytes((ctx_id, 0, 0, 0)) + item(0x30, abstract) + b"".join(item(0x40, ts) for ts in syntaxes))


def identity(kind: int, primary: bytes, response: bool = True) -> bytes:
    return item(0x58, bytes((kind, int(response))) + struct.pack(">H", len(primary)) + primary + b"\x00\x00")


async def answer_to(rq: bytes) -> bytes | None:
    async with running_scp(artim_timeout=0.5) as server, raw_peer(server.port) as peer:
        await peer.send(rq)
        reply = await peer.read_pdu(2.0)
        if reply is not None and reply[0] == 0x02:
            await peer.send(ReleaseRQ().encode())
            assert await peer.read_pdu(2.0) == ReleaseRP().encode()
        return reply


def accepted(reply: bytes | None) -> AssociateAC:
    assert reply is not None and reply[0] == 0x02, reply
    ac = decode_pdu(0x02, reply[6:])
    assert isinstance(ac, AssociateAC)
    return ac


def results(ac: AssociateAC) -> list[tuple[int, int]]:
    return [(pc.id, pc.result) for pc in ac.presentation_contexts]


V, ILE = Verification.encode(), IMPLICIT_LE.encode()


@pytest.mark.parametrize(
    ("abstract", "syntax", "result"),
    [
        pytest.param(V + b"\x00", ILE + b"\x00", 0, id="nul-padded"),  # as UIDs in data sets are
        pytest.param(V + b" ", ILE + b" ", 0, id="space-padded"),
        pytest.param(b" " + V, ILE, 0, id="leading-space"),
        pytest.param(b"1." * 32 + b"1", ILE, ABSTRACT_NOT_SUPPORTED, id="65-characters"),  # no UID
        pytest.param(b"", ILE, ABSTRACT_NOT_SUPPORTED, id="empty-abstract-syntax"),
        pytest.param(V, b"", TS_NOT_SUPPORTED, id="empty-transfer-syntax"),
        pytest.param(V, b"1.2.840.10008.1.2.4.50", TS_NOT_SUPPORTED, id="jpeg-only"),
    ],
)
async def test_odd_syntax_names_get_their_context_result(abstract: bytes, syntax: bytes, result: int) -> None:
    """PS3.8 Table 9-18: padding around a UID is not significant; anything else not
    supported is answered per context, never by aborting the association."""
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + raw_context(1, abstract, syntax) + user_info())))
    assert results(ac) == [(1, result)]
    if result == 0:
        assert ac.presentation_contexts[0].transfer_syntax == IMPLICIT_LE


async def test_more_than_128_contexts_are_answered_each() -> None:
    """200 contexts (ids 1..200): the 100 even ids are refused no-reason (PS3.8 Table 9-13:
    odd ids only), the 100 odd ones accepted; the AC answers every item in order."""
    contexts = b"".join(item(0x20, context_value(i)) for i in range(1, 201))
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + contexts + user_info())))
    assert results(ac) == [(i, 0 if i % 2 else NO_REASON) for i in range(1, 201)]


@pytest.mark.parametrize(("proposed", "reply"), [((0, 0), (16, 16)), ((65535, 65535), (16, 16)), ((3, 1), (3, 1))])
async def test_async_operations_window_is_never_above_ours(proposed: tuple[int, int], reply: tuple[int, int]) -> None:
    """PS3.7 D.3.3.3: 0 means unlimited; the reply is the lesser of both sides (our
    default 16), from the requestor's point of view."""
    window = item(0x53, struct.pack(">HH", *proposed))
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + CONTEXT + user_info(window))))
    assert ac.user_info.async_ops is not None
    assert (ac.user_info.async_ops.max_ops_invoked, ac.user_info.async_ops.max_ops_performed) == reply


async def test_role_selection_for_a_class_not_proposed_is_not_answered() -> None:
    """PS3.7 D.3.3.4: a role selection item answers a proposed abstract syntax only."""
    role = item(0x54, uid_field(CT_IMAGE_STORAGE) + b"\x01\x01")
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + CONTEXT + user_info(role))))
    assert results(ac) == [(1, 0)] and ac.user_info.roles == []


@pytest.mark.parametrize("roles", [pytest.param(b"\x00\x01", id="scp-only"), pytest.param(b"\x00\x00", id="none")])
async def test_a_context_left_without_a_role_is_refused_by_the_user(roles: bytes) -> None:
    """The requestor offers only the SCP role (or none) for Verification, which our SCP
    does not let it take: the reply item says 0/0 and the context is user-rejected."""
    role = item(0x54, uid_field(Verification) + roles)
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + CONTEXT + user_info(role))))
    assert results(ac) == [(1, USER_REJECTION)]
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in ac.user_info.roles] == [(Verification, False, False)]


@pytest.mark.parametrize("kind", [3, 4, 5, 9, 0])
async def test_identity_without_an_authenticator_gets_no_server_response(kind: int) -> None:
    """Kerberos, SAML, JWT (5) or an unknown type with a positive response requested,
    and no authenticator: accepted without a User Identity AC sub-item (PS3.7 D.3.3.7.2:
    only an acceptor that checked the identity answers it)."""
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + CONTEXT + user_info(identity(kind, b"eyJ0.e30.x")))))
    assert results(ac) == [(1, 0)] and ac.user_info.identity_ac is None


async def test_extended_negotiation_for_an_unknown_class_is_not_answered() -> None:
    extended = item(0x56, uid_field("1.2.3.4.5.6") + b"\x01\x01")
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + CONTEXT + user_info(extended))))
    assert results(ac) == [(1, 0)] and ac.user_info.extended == []


@pytest.mark.parametrize(
    "ui",
    [
        pytest.param(user_info(impl=None), id="no-implementation-class-uid"),
        pytest.param(user_info(impl=b""), id="empty-implementation-class-uid"),
        pytest.param(user_info(max_length=None), id="no-maximum-length"),
        pytest.param(user_info(item(0x5F, b"new")), id="unknown-sub-item"),
    ],
)
async def test_user_information_short_of_mandatory_sub_items_or_with_unknown_ones_is_accepted(ui: bytes) -> None:
    """No implementation class UID, no maximum length (then unlimited), or an unknown
    sub-item (PS3.7 D.3.3: not fatal): the request is still negotiated."""
    ac = accepted(await answer_to(associate_rq(APP_CONTEXT + CONTEXT + ui)))
    assert results(ac) == [(1, 0)]


async def test_implementation_class_uid_that_is_not_ascii_is_aborted() -> None:
    reply = await answer_to(associate_rq(APP_CONTEXT + CONTEXT + user_info(impl=b"1.2.\xff")))
    assert reply == a_abort(PROVIDER, INVALID_PARAMETER_VALUE)


@pytest.mark.parametrize(("version", "ok"), [(0x0003, True), (0xFFFF, True), (0x8001, True), (0x0000, False)])
async def test_only_bit_0_of_the_protocol_version_is_tested(version: int, ok: bool) -> None:
    """PS3.8 §9.3.2: a receiver implementing version 1 only tests that bit 0 is set."""
    rq = associate_rq(APP_CONTEXT + CONTEXT + user_info())
    reply = await answer_to(rq[:6] + struct.pack(">H", version) + rq[8:])
    if ok:
        assert results(accepted(reply)) == [(1, 0)]
    else:
        assert reply == a_associate_rj(1, 2, 2)


# --------------------------------------------------------------------------- release misbehaviour (SCP)


#: What follows the A-ASSOCIATE-AC, and the A-ABORT reason it earns (PS3.8 Table 9-10).
VIOLATIONS = {
    "p-data-after-release-rq": (ReleaseRQ().encode() + echo_rq_pdata(), UNEXPECTED_PDU),  # Sta8: AA-8
    "second-release-rq": (ReleaseRQ().encode() + ReleaseRQ().encode(), UNEXPECTED_PDU),  # Sta8: AA-8
    "unsolicited-release-rp": (ReleaseRP().encode(), UNEXPECTED_PDU),  # Sta6: AA-8
    "associate-rj-in-sta6": (a_associate_rj(1, 1, 1), UNEXPECTED_PDU),  # Sta6: AA-8
    "unknown-pdu-type-in-sta6": (b"\x0a\x00\x00\x00\x00\x04\x00\x00\x00\x00", UNRECOGNIZED_PDU),  # AA-1
    "p-data-on-a-context-never-proposed": (echo_rq_pdata(3), NOT_SPECIFIED),  # a DIMSE violation
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
async def test_release_and_state_violations_are_aborted(name: str) -> None:
    """PS3.8 Table 9-10: the PDU the state does not allow is answered with an A-ABORT
    (service-provider), then the connection closes; other peers are served meanwhile."""
    after, reason = VIOLATIONS[name]
    async with running_scp(artim_timeout=0.2) as server, raw_peer(server.port) as peer:
        await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info()))
        accepted(await peer.read_pdu())
        await peer.send(after)
        assert await peer.read_pdu() == a_abort(PROVIDER, reason)
        assert await peer.expect_eof(3) == b""
        await echo_ok(server.port)


async def test_request_then_release_in_one_write_is_answered_then_released() -> None:
    """A C-ECHO-RQ and the A-RELEASE-RQ behind it: the response goes first (PS3.8 §7.2)."""
    async with running_scp() as server, raw_peer(server.port) as peer:
        await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info()))
        accepted(await peer.read_pdu())
        await peer.send(echo_rq_pdata() + ReleaseRQ().encode())
        reply = await peer.read_pdu()
        assert reply is not None and reply[0] == 0x04
        assert decode_command(reply[12:]).status == 0
        assert await peer.read_pdu() == ReleaseRP().encode()


async def test_a_abort_after_release_rq_just_closes() -> None:
    async with running_scp() as server, raw_peer(server.port) as peer:
        await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info()))
        accepted(await peer.read_pdu())
        await peer.send(ReleaseRQ().encode() + a_abort(0, 0))
        assert await peer.expect_eof(3) in (b"", ReleaseRP().encode())
        await echo_ok(server.port)


async def test_a_peer_keeping_the_connection_after_release_holds_no_shutdown() -> None:
    """After our A-RELEASE-RP the acceptor waits (Sta13, up to ARTIM: 30 s here) only for
    the peer to close the connection. A peer that never does used to hold the server's
    shutdown for the whole grace period (then 2 s more), with a WARNING that an
    association was still open; now it is closed at once."""
    with Warnings() as log:
        ae = AE("SCP", artim_timeout=30.0)
        ae.add_supported_context(Verification)
        server = await ae.start_server(HOST, 0)
        async with raw_peer(server.port) as peer:
            await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info()))
            accepted(await peer.read_pdu())
            await peer.send(ReleaseRQ().encode())
            assert await peer.read_pdu() == ReleaseRP().encode()
            loop = asyncio.get_running_loop()
            started = loop.time()
            server.close()
            await asyncio.wait_for(server.wait_closed(grace=5), 10)
            assert loop.time() - started < 1
            assert await peer.expect_eof(1) == b""
    assert not log.events("aborting association still open after the grace period")


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        pytest.param(a_abort(0, 0), b"", id="a-abort"),  # Sta3: AA-3, closed
        pytest.param(echo_rq_pdata(), a_abort(PROVIDER, UNEXPECTED_PDU), id="p-data"),  # Sta3: AA-8
        pytest.param(ReleaseRQ().encode(), a_abort(PROVIDER, UNEXPECTED_PDU), id="release-rq"),  # Sta3: AA-8
    ],
)
async def test_pdu_while_the_identity_is_checked_is_answered_by_sta3s_rules(sent: bytes, answer: bytes) -> None:
    """The authenticator is still deciding (Sta3) when the requestor sends another PDU:
    PS3.8 Table 9-10's answer, and no A-ASSOCIATE-AC after it."""
    ae = AE("SCP", artim_timeout=0.3)
    ae.add_supported_context(Verification)

    @ae.on_user_identity
    async def check(_identity: object, _assoc: object) -> tuple[bool, bytes]:
        await asyncio.sleep(0.2)
        return True, b"token"

    server = await ae.start_server(HOST, 0)
    try:
        async with raw_peer(server.port) as peer:
            await peer.send(associate_rq(APP_CONTEXT + CONTEXT + user_info(identity(5, b"eyJ0.e30.x"))))
            await asyncio.sleep(0.05)
            await peer.send(sent)
            assert await peer.expect_eof(2) == answer
        await echo_ok(server.port)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(grace=1), 10)


# --------------------------------------------------------------------------- our SCU against a raw acceptor


class RawAcceptor:
    """Accepts every proposed context (first transfer syntax) with ``max_length``,
    answers each C-ECHO/C-STORE with success, records the P-DATA-TF lengths and the
    PDU types it receives, and answers A-RELEASE-RQ as ``on_release`` says."""

    def __init__(
        self, max_length: int = 16384, on_release: str = "rp", answer_rq: Callable[[bytes], bytes] | None = None
    ):
        self.max_length, self.on_release, self.answer_rq = max_length, on_release, answer_rq
        self.received: list[int] = []
        self.pdata_lengths: list[int] = []
        self.data_set_bytes: list[int] = []
        self.aborts: list[bytes] = []

    async def _read(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            header = await asyncio.wait_for(reader.readexactly(6), 5)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        (length,) = struct.unpack(">I", header[2:])
        return header + await asyncio.wait_for(reader.readexactly(length), 5)

    def _accept(self, rq_pdu: bytes) -> bytes:
        rq = decode_pdu(0x01, rq_pdu[6:])
        contexts = [PresentationContextAC(pc.id, 0, pc.transfer_syntaxes[0]) for pc in rq.presentation_contexts]
        ui = UserInformation(max_length=self.max_length, implementation_class_uid="1.2.3")
        return AssociateAC(rq.called_ae, rq.calling_ae, contexts, ui).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            rq = await self._read(reader)
            assert rq is not None
            writer.write((self.answer_rq or self._accept)(rq))
            command, size = b"", 0
            rq_cmd = Command(CommandField.C_ECHO_RQ)
            while (pdu := await self._read(reader)) is not None:
                self.received.append(pdu[0])
                if pdu[0] == 0x07:
                    self.aborts.append(pdu)
                if pdu[0] == 0x04:
                    self.pdata_lengths.append(len(pdu) - 6)
                    data = decode_pdu(0x04, pdu[6:])
                    assert isinstance(data, PDataTF)
                    for pdv in data.pdvs:
                        if pdv.is_command:
                            command += bytes(pdv.data)
                        else:
                            size += len(pdv.data)
                        if pdv.is_last:
                            cmd = decode_command(command) if pdv.is_command else rq_cmd
                            if pdv.is_command:
                                rq_cmd, command = cmd, b""
                            if not pdv.is_command or cmd.data_set_type == 0x0101:
                                if not pdv.is_command:
                                    self.data_set_bytes.append(size)
                                    size = 0
                                writer.write(self._response(pdv.context_id, cmd))
                elif pdu[0] == 0x05:
                    if self.on_release == "rp":
                        writer.write(ReleaseRP().encode())
                    elif self.on_release == "collide":
                        writer.write(ReleaseRQ().encode())
                    elif self.on_release == "p-data-then-rp":
                        cmd = Command(CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid=Verification)
                        writer.write(self._response(1, cmd) + ReleaseRP().encode())
                    elif self.on_release == "abort":
                        writer.write(Abort(0, 0).encode())
                elif pdu[0] == 0x06 and self.on_release == "collide":
                    writer.write(ReleaseRP().encode())  # Sta10 -> Sta12: our answer after theirs
                elif pdu[0] == 0x07:
                    break
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    def _response(context_id: int, cmd: Command) -> bytes:
        rsp = Command(
            CommandField(cmd.command_field | 0x8000),
            message_id_being_responded_to=cmd.message_id,
            affected_sop_class_uid=cmd.affected_sop_class_uid,
            affected_sop_instance_uid=cmd.affected_sop_instance_uid,
            status=0,
        )
        return PDataTF([PDV(context_id, True, True, encode_command(rsp))]).encode()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._serve, HOST, 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            await asyncio.wait_for(server.wait_closed(), 5)


def requestor(**options: object) -> AE:
    ae = AE("SCU", acse_timeout=2.0, dimse_timeout=5.0, network_timeout=None, **options)  # type: ignore[arg-type]
    ae.add_requested_context(Verification)
    ae.add_requested_context(CT_IMAGE_STORAGE, [EXPLICIT_LE])
    return ae


@pytest.fixture(scope="module")
def big_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1.2 MB CT: above the size from which the SCU streams a file from disk."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = bytes(range(256)) * 4800
    ds.Rows, ds.Columns = 768, 800
    path = tmp_path_factory.mktemp("big") / "big.dcm"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("max_length", [1024, 1031])
async def test_scu_cuts_every_message_to_the_peers_maximum_length(max_length: int, big_ct: Path) -> None:
    """PS3.8 D.1: the maximum length received bounds the P-DATA-TF variable field. A
    C-ECHO, a small file, a data set in memory and a file streamed from disk all go in
    PDUs no longer than the acceptor's 1024 / 1031 bytes, and arrive whole."""
    ct = get_testdata_file("CT_small.dcm")
    acceptor = RawAcceptor(max_length)
    async with acceptor.running() as port, requestor().associate(HOST, port, "SCP") as assoc:
        assert (await assoc.c_echo()).is_success
        assert (await assoc.c_store(ct)).is_success
        assert (await assoc.c_store(pydicom.dcmread(ct))).is_success
        assert (await assoc.c_store(big_ct)).is_success
    assert max(acceptor.pdata_lengths) == max_length
    assert len(acceptor.data_set_bytes) == 3 and acceptor.data_set_bytes[2] > big_ct.stat().st_size - 1024


@pytest.mark.parametrize(
    ("on_release", "outcome"),
    [
        ("collide", None),  # Sta7 -> Sta9 -> Sta11 -> Sta1 (PS3.8 §7.2.2)
        ("p-data-then-rp", None),  # Sta7: P-DATA-TF is still delivered (DT-2), then AR-3
        ("abort", AssociationAborted),
        ("silent", AssociationTimeout),
    ],
)
async def test_scu_release_against_an_odd_acceptor(on_release: str, outcome: type[Exception] | None) -> None:
    acceptor = RawAcceptor(on_release=on_release)
    async with acceptor.running() as port:
        assoc = await requestor().associate(HOST, port, "SCP")
        assert (await assoc.c_echo()).is_success
        if outcome is None:
            await asyncio.wait_for(assoc.release(), 5)
            assert assoc.end_reason is None
        else:
            with pytest.raises(outcome):
                await asyncio.wait_for(assoc.release(timeout=0.5), 5)
        await asyncio.wait_for(assoc.wait_closed(), 5)
        await asyncio.sleep(0.05)  # the acceptor has read what we sent last
    expected = {"collide": [0x04, 0x05, 0x06], "silent": [0x04, 0x05, 0x07]}.get(on_release, [0x04, 0x05])
    assert acceptor.received == expected


@pytest.mark.parametrize(
    ("pdu", "reason"),
    [
        pytest.param(echo_rq_pdata(), UNEXPECTED_PDU, id="p-data"),
        pytest.param(ReleaseRQ().encode(), UNEXPECTED_PDU, id="release-rq"),
        pytest.param(ReleaseRP().encode(), UNEXPECTED_PDU, id="release-rp"),
        pytest.param(b"\x0a\x00\x00\x00\x00\x04\x00\x00\x00\x00", UNRECOGNIZED_PDU, id="pdu-type-0x0a"),
    ],
)
async def test_scu_aborts_an_answer_that_is_neither_ac_nor_rj(pdu: bytes, reason: int) -> None:
    """Sta5 (awaiting A-ASSOCIATE-AC or RJ): any other PDU is AA-8 (or AA-1 when not a
    PDU at all): an A-ABORT with service-provider source, and ``associate()`` fails."""
    acceptor = RawAcceptor(answer_rq=lambda rq: pdu)
    async with acceptor.running() as port:
        with pytest.raises(AssociationAborted, match="provider abort"):
            await asyncio.wait_for(requestor().associate(HOST, port, "SCP"), 5)
        await asyncio.sleep(0.05)
    assert acceptor.aborts == [a_abort(PROVIDER, reason)]
