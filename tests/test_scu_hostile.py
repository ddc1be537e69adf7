"""Our SCU against a hostile, broken or confused SCP: a raw acceptor speaking the upper
layer protocol (PS3.8) that answers with what a real peer cannot be made to send.

Each test scripts the acceptor after its A-ASSOCIATE-AC; the requestor is the library's
``async with ae.associate(...)`` API. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dimse_async import AE
from dimse_async.dimse import Command, CommandField, decode_command, encode_command
from dimse_async.exceptions import AssociationAborted, AssociationTimeout, DIMSEFailure
from dimse_async.pdu import (
    PDV,
    AssociateAC,
    AssociateRQ,
    PDataTF,
    PresentationContextAC,
    ReleaseRP,
    ReleaseRQ,
    decode_pdu,
)
from dimse_async.pdu_items import UserInformation

HOST = "127.0.0.1"
VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


class Peer:
    """The acceptor's side of one connection: whole PDUs and DIMSE messages."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.rq: AssociateRQ | None = None

    async def read_pdu(self, timeout: float = 5.0) -> bytes | None:
        try:
            header = await asyncio.wait_for(self.reader.readexactly(6), timeout)
            (length,) = struct.unpack(">I", header[2:])
            return header + await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), 5)

    def context_id(self, abstract: str) -> int:
        assert self.rq is not None
        return next(pc.id for pc in self.rq.presentation_contexts if pc.abstract_syntax == abstract)

    async def read_message(self, timeout: float = 5.0) -> tuple[int, Command, bytes]:
        """One whole DIMSE message: (context id, command, data set bytes)."""
        cmd_bytes, data, cmd = b"", b"", None
        while True:
            pdu = await self.read_pdu(timeout)
            assert pdu is not None and pdu[0] == 0x04, f"expected P-DATA-TF, got {pdu!r}"
            pdata = decode_pdu(4, pdu[6:])
            assert isinstance(pdata, PDataTF)
            for pdv in pdata.pdvs:
                if pdv.is_command:
                    cmd_bytes += bytes(pdv.data)
                    if pdv.is_last:
                        cmd = decode_command(cmd_bytes)
                        if not cmd.has_dataset:
                            return pdv.context_id, cmd, b""
                else:
                    data += bytes(pdv.data)
                    if pdv.is_last:
                        assert cmd is not None
                        return pdv.context_id, cmd, data

    async def reply(self, ctx: int, cmd: Command, dataset: bytes | None = None) -> None:
        if dataset is not None:
            cmd.data_set_type = 0
        out = PDataTF([PDV(ctx, True, True, encode_command(cmd))]).encode()
        if dataset is not None:  # in PDUs within our 256 KiB limit
            step = 1 << 16
            for at in range(0, max(len(dataset), 1), step):
                out += PDataTF([PDV(ctx, False, at + step >= len(dataset), dataset[at : at + step])]).encode()
        await self.send(out)

    async def drain_until_closed(self, timeout: float = 5.0) -> list[bytes]:
        """Every PDU until the requestor closes; an A-RELEASE-RQ is answered."""
        pdus = []
        while (pdu := await self.read_pdu(timeout)) is not None:
            pdus.append(pdu)
            if pdu[0] == 0x05:
                await self.send(ReleaseRP().encode())
        return pdus


Script = Callable[[Peer], Awaitable[None]]


def accept_all(rq: AssociateRQ, max_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-AC accepting every proposed context with its first transfer syntax,
    and every role proposed (PS3.7 D.3.3.4)."""
    contexts = [PresentationContextAC(pc.id, 0, pc.transfer_syntaxes[0]) for pc in rq.presentation_contexts]
    ui = UserInformation(max_length=max_length, implementation_class_uid="1.2.3.4", roles=list(rq.user_info.roles))
    return AssociateAC(rq.called_ae, rq.calling_ae, contexts, ui).encode()


@contextlib.asynccontextmanager
async def hostile_scp(
    script: Script, answer: Callable[[AssociateRQ], bytes] = accept_all
) -> AsyncIterator[tuple[int, list[BaseException]]]:
    """A raw acceptor on a free port: answers the A-ASSOCIATE-RQ with ``answer(rq)``,
    then runs ``script``; yields (port, errors the script raised)."""
    errors: list[BaseException] = []
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        peer = Peer(reader, writer)
        try:
            pdu = await peer.read_pdu()
            assert pdu is not None and pdu[0] == 0x01
            rq = decode_pdu(1, pdu[6:])
            assert isinstance(rq, AssociateRQ)
            peer.rq = rq
            await peer.send(answer(rq))
            await script(peer)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # reported by the test
            errors.append(exc)
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1], errors
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.wait_for(server.wait_closed(), 5)


def scu(*abstracts: str, **options: object) -> AE:
    for name in ("connect_timeout", "acse_timeout", "dimse_timeout"):
        options.setdefault(name, 5.0)
    options.setdefault("network_timeout", None)
    ae = AE("SCU", **options)  # type: ignore[arg-type]
    for abstract in abstracts or (VERIFICATION,):
        ae.add_requested_context(abstract, [EXPLICIT_LE, IMPLICIT_LE])
    return ae


def ct_instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "P1"
    ds.Modality = "CT"
    return ds


def rsp(cmd: Command, status: int = 0, **fields: object) -> Command:
    out = Command(
        cmd.command_field | 0x8000,
        message_id_being_responded_to=cmd.message_id,
        affected_sop_class_uid=cmd.affected_sop_class_uid,
        affected_sop_instance_uid=cmd.affected_sop_instance_uid,
        status=status,
    )
    for name, value in fields.items():
        setattr(out, name, value)
    return out


# ---------------------------------------------------------------------------------
# Responses that do not answer what we asked
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("affected_sop_instance_uid", "1.2.3.999"), ("affected_sop_class_uid", "1.2.840.10008.5.1.4.1.1.4")],
)
async def test_c_store_rsp_naming_another_instance_or_class_is_not_reported_stored(field: str, value: str) -> None:
    """PS3.7 §9.3.1.2: the C-STORE-RSP's Affected SOP Instance / Class UID, when present,
    equals the request's. A peer answering Success for another one has not stored ours."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0, **{field: value}))
        await peer.drain_until_closed()

    async with hostile_scp(script) as (port, errors):
        async with scu(CT).associate(HOST, port, called_ae="SCP") as assoc:
            with pytest.raises(DIMSEFailure, match=re.escape(value)):
                await asyncio.wait_for(assoc.c_store(ct_instance()), 5)
    assert not errors, errors


@pytest.mark.parametrize("field", [CommandField.C_ECHO_RSP, CommandField.C_FIND_RSP, 0x8999])
async def test_response_of_another_kind_does_not_answer_a_c_store(field: int) -> None:
    """PS3.7 §9.3.1.2, E.1: a C-STORE-RQ is answered by a C-STORE-RSP (8001H). Another
    command field with our message id is a protocol violation: A-ABORT, never 'stored'."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        answer = rsp(cmd, 0)
        answer.command_field = field
        await peer.reply(ctx, answer)
        await peer.drain_until_closed()

    async with hostile_scp(script) as (port, errors):
        assoc = await asyncio.wait_for(scu(CT).associate(HOST, port, called_ae="SCP"), 5)
        try:
            with pytest.raises(AssociationAborted, match="C-STORE"):
                await asyncio.wait_for(assoc.c_store(ct_instance()), 5)
        finally:
            assoc.abort()
    assert not errors, errors



async def test_response_on_another_presentation_context_is_a_violation() -> None:
    """A C-STORE-RSP on the Verification context for a C-STORE-RQ sent on the CT
    context: the context names the request's abstract syntax and the encoding of what
    answers it (PS3.8 §7.1.1.13, PS3.7 §6.3.1), so it does not answer ours: A-ABORT."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        assert ctx == peer.context_id(CT)
        await peer.reply(peer.context_id(VERIFICATION), rsp(cmd, 0))
        await peer.drain_until_closed()

    async with hostile_scp(script) as (port, errors):
        assoc = await asyncio.wait_for(scu(VERIFICATION, CT).associate(HOST, port, called_ae="SCP"), 5)
        try:
            with pytest.raises(AssociationAborted, match=r"presentation context 1, .* sent on 3"):
                await asyncio.wait_for(assoc.c_store(ct_instance()), 5)
        finally:
            assoc.abort()
    assert not errors, errors


async def test_peer_releasing_with_our_request_outstanding_fails_it_at_once() -> None:
    """The SCP sends A-RELEASE-RQ instead of the C-STORE-RSP: after it the peer can send
    no P-DATA (PS3.8 Table 9-10, Sta8: AA-8), so the request fails at once, saying so,
    and the release is answered; before, it waited for the DIMSE timeout."""
    replies: list[bytes] = []

    async def script(peer: Peer) -> None:
        await peer.read_message()
        await peer.send(ReleaseRQ().encode())
        pdu = await peer.read_pdu()
        assert pdu is not None
        replies.append(pdu)
        await peer.drain_until_closed()  # a lax peer: the transport stays open

    loop = asyncio.get_running_loop()
    async with hostile_scp(script) as (port, errors):
        assoc = await asyncio.wait_for(
            scu(CT, dimse_timeout=3).associate(HOST, port, called_ae="SCP"), 5
        )
        try:
            start = loop.time()
            with pytest.raises(AssociationAborted, match="released the association with C-STORE-RQ unanswered"):
                await asyncio.wait_for(assoc.c_store(ct_instance()), 5)
            assert loop.time() - start < 2
            for _ in range(100):  # the peer reads our answer to its release (bounded)
                if replies or errors:
                    break
                await asyncio.sleep(0.02)
        finally:
            assoc.abort()
    assert not errors, errors
    assert replies == [ReleaseRP().encode()]

# ---------------------------------------------------------------------------------
# Peers that stall
# ---------------------------------------------------------------------------------


async def _read_silently(peer: Peer) -> None:
    """A peer that reads everything (A-RELEASE-RQ included) and answers nothing."""
    while await peer.read_pdu(30) is not None:
        pass


async def test_release_to_a_peer_that_never_answers_is_bounded_without_timeouts() -> None:
    """``acse_timeout=None`` and ``dimse_timeout=None``: the wait for A-RELEASE-RP is
    still bounded, by the ARTIM timeout (PS3.8 §9.1.5), then the association is aborted;
    before, ``release()`` (and leaving ``async with``) waited forever."""
    loop = asyncio.get_running_loop()
    async with hostile_scp(_read_silently) as (port, errors):
        ae = scu(acse_timeout=None, dimse_timeout=None, artim_timeout=1.0)
        assoc = await asyncio.wait_for(ae.associate(HOST, port, called_ae="SCP"), 5)
        start = loop.time()
        try:
            with pytest.raises(AssociationTimeout, match="A-RELEASE"):
                await asyncio.wait_for(assoc.release(), 10)
        finally:
            assoc.abort()
        assert loop.time() - start < 5
        await asyncio.wait_for(assoc.wait_closed(), 5)
    assert not errors, errors


async def test_release_behind_a_request_awaited_without_dimse_timeout_is_bounded() -> None:
    """``dimse_timeout=None``, a C-ECHO still awaited by another task, never answered:
    the release waits for it only as long as for an A-RELEASE-RP (``acse_timeout``),
    then aborts naming it (the C-ECHO fails with the abort); before, it waited forever."""
    loop = asyncio.get_running_loop()
    request_read = asyncio.Event()

    async def read_silently(peer: Peer) -> None:
        while (pdu := await peer.read_pdu(30)) is not None:
            if pdu[0] == 0x04:
                request_read.set()

    async with hostile_scp(read_silently) as (port, errors):
        ae = scu(acse_timeout=1.0, dimse_timeout=None)
        assoc = await asyncio.wait_for(ae.associate(HOST, port, called_ae="SCP"), 5)
        echo = asyncio.create_task(assoc.c_echo())
        try:
            await asyncio.wait_for(request_read.wait(), 10)  # the C-ECHO-RQ is out
            start = loop.time()
            with pytest.raises(AssociationTimeout, match="C-ECHO-RQ unanswered"):
                await asyncio.wait_for(assoc.release(), 10)
            assert loop.time() - start < 5
            with pytest.raises(AssociationAborted):
                await asyncio.wait_for(echo, 5)
        finally:
            echo.cancel()
            assoc.abort()
    assert not errors, errors


async def test_c_store_to_a_peer_that_stops_reading_times_out() -> None:
    """A peer that takes the command and then stops reading the data set: the send is
    bounded by the DIMSE timeout (as a response would be), not left to the network
    idle timeout (5 minutes by default) or forever."""
    stop = asyncio.Event()

    async def script(peer: Peer) -> None:
        peer.writer.transport.pause_reading()  # type: ignore[attr-defined]
        await asyncio.wait_for(stop.wait(), 10)

    ds = ct_instance()
    ds.BitsAllocated = 8
    ds.PixelData = bytes(32 << 20)  # more than both sides' socket buffers hold
    loop = asyncio.get_running_loop()
    async with hostile_scp(script) as (port, errors):
        assoc = await asyncio.wait_for(
            scu(CT, dimse_timeout=0.5, network_timeout=300, abort_artim_timeout=0.5).associate(HOST, port, called_ae="SCP"), 5
        )
        try:
            start = loop.time()
            with pytest.raises(AssociationTimeout, match=r"0\.5 s"):
                await asyncio.wait_for(assoc.c_store(ds), 10)
            assert loop.time() - start < 3
            await asyncio.wait_for(assoc.wait_closed(), 5)
        finally:
            stop.set()
            assoc.abort()
    assert not errors, errors


def identifier(i: int, size: int = 1000) -> bytes:
    """A C-FIND match in explicit VR little endian: Patient ID and a padded comment."""
    from dimse_async.codec import encode_dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = f"P{i}"
    ds.StudyDescription = "x" * 60
    ds.TextValue = "y" * size  # UT: no length limit
    return encode_dataset(ds, EXPLICIT_LE)


async def test_endless_pending_c_find_responses_wait_for_the_application() -> None:
    """A peer pouring out pending C-FIND responses faster than the application takes
    them: we stop reading once a bounded number of them wait (the peer's writes block,
    TCP flow control), read on as the application consumes them, and lose none."""
    total = 1000  # 20 MiB of matches: more than the socket buffers on both sides hold
    sent = 0

    async def script(peer: Peer) -> None:
        nonlocal sent
        ctx, cmd, _ = await peer.read_message()
        batch = []
        for i in range(total):
            pending = rsp(cmd, 0xFF00)
            pending.data_set_type = 0
            batch.append(
                PDataTF([PDV(ctx, True, True, encode_command(pending))]).encode()
                + PDataTF([PDV(ctx, False, True, identifier(i, 20000))]).encode()
            )
            if len(batch) == 10:
                peer.writer.write(b"".join(batch))
                batch = []
                await asyncio.wait_for(peer.writer.drain(), 30)
                sent = i + 1
        await peer.reply(ctx, rsp(cmd, 0))
        sent = total + 1
        await peer.drain_until_closed(10)

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = ""
    async with hostile_scp(script) as (port, errors):
        async with scu(STUDY_FIND).associate(HOST, port, called_ae="SCP") as assoc:
            async with assoc.c_find(query) as responses:
                got = [await asyncio.wait_for(anext(responses), 5)]
                # The application is busy: the peer must be held (until it has written
                # nothing more for 0.3 s; at most 3 s).
                for _ in range(10):
                    held_at = sent
                    await asyncio.sleep(0.3)
                    if sent == held_at:
                        break
                assert held_at < total // 2, f"the peer wrote {held_at} of {total} responses unread"
                async for match in responses:
                    got.append(match)
            assert responses.status == 0
    assert [str(m.PatientID) for m in got] == [f"P{i}" for i in range(total)]
    assert not errors, errors



async def test_c_find_peer_ignoring_c_cancel_does_not_hold_the_application() -> None:
    """Leaving a C-FIND early sends C-CANCEL and waits for the final response (PS3.7
    §9.3.2.3). A peer that ignores it and keeps sending pending responses, each well
    within the DIMSE timeout, is given that timeout in all, then aborted; before, the
    application's ``async with`` never ended."""
    stop = asyncio.Event()

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        pending = rsp(cmd, 0xFF00)
        for i in range(3):
            await peer.reply(ctx, pending, identifier(i, 10))
        while not stop.is_set():  # C-CANCEL or not: more matches, every 20 ms (at most 10 s)
            await peer.reply(ctx, pending, identifier(0, 10))
            await asyncio.sleep(0.02)

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    loop = asyncio.get_running_loop()
    async with hostile_scp(script) as (port, errors):
        assoc = await asyncio.wait_for(
            scu(STUDY_FIND, dimse_timeout=0.5, abort_artim_timeout=0.5).associate(HOST, port, called_ae="SCP"), 5
        )
        try:
            start = loop.time()

            async def leave_early() -> None:
                async with assoc.c_find(query) as responses:
                    async for _ in responses:
                        break

            await asyncio.wait_for(leave_early(), 10)
            assert loop.time() - start < 3
            assert not assoc.is_established  # aborted: the final response never came
        finally:
            stop.set()
            assoc.abort()
    assert not errors, errors

# ---------------------------------------------------------------------------------
# The command line tools against such peers
# ---------------------------------------------------------------------------------

STUDY_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_GET = "1.2.840.10008.5.1.4.1.2.2.3"


async def cli(*args: str, timeout: float = 20.0) -> tuple[int, str]:
    """``python -m dimse_async ARGS`` from this tree: (exit code, stderr)."""
    import os
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dimse_async", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


@pytest.mark.parametrize("operation", ["move", "get"])
async def test_retrieve_final_success_with_failed_sub_operations_is_not_exit_0(operation: str) -> None:
    """A C-MOVE / C-GET SCP answering Success (0000) while its counters say sub-operations
    failed: Success means every one completed without failure or warning (PS3.4
    C.4.2.1.5, C.4.3.1.4), so the tool must not exit 0 ('all succeeded')."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0xFF00, remaining=2, completed=0, failed=0, warning=0))
        await peer.reply(ctx, rsp(cmd, 0, completed=0, failed=2, warning=0))
        await peer.drain_until_closed()

    async with hostile_scp(script) as (port, errors):
        extra = ["--dest", "ELSEWHERE"] if operation == "move" else ["--sop-class", CT, "--out", "/tmp"]
        code, err = await cli(
            operation, HOST, str(port), "--timeout", "5", "-k", "StudyInstanceUID=1.2.3", *extra
        )
    assert not errors, errors
    assert code == 1, (code, err)
    assert "2 failed" in err and "contradicts" in err, err
    assert len(err.strip().splitlines()) == 1, err


async def test_get_refuses_sub_operations_whose_data_set_is_broken_or_another_instance(tmp_path: object) -> None:
    """A C-GET SCP sending C-STORE sub-operations with a truncated data set, an empty
    one, or one whose SOP Instance UID is not the command's: each is refused (0xC000 /
    0xA900, as the archive refuses them, PS3.4 B.2.3) and no file is written under the
    command's UID; a sound one is stored. Before, every one was answered Success and
    written as OUT/<command's UID>.dcm."""
    from pathlib import Path

    from dimse_async.codec import encode_dataset

    out = Path(str(tmp_path)) / "out"
    statuses: dict[str, int] = {}
    good, other = ct_instance(), ct_instance()
    cases = [
        ("truncated", "1.2.3.1", encode_dataset(good, EXPLICIT_LE)[:-7]),
        ("empty", "1.2.3.2", b""),
        ("another instance", "1.2.3.3", encode_dataset(other, EXPLICIT_LE)),
        ("sound", str(good.SOPInstanceUID), encode_dataset(good, EXPLICIT_LE)),
    ]

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        ct_ctx = peer.context_id(CT)
        for i, (name, uid, data) in enumerate(cases):
            store = Command(
                CommandField.C_STORE_RQ, message_id=100 + i, affected_sop_class_uid=CT,
                affected_sop_instance_uid=uid, priority=0,
            )  # fmt: skip
            await peer.reply(ct_ctx, store, data)
            _, answer, _ = await peer.read_message()
            assert answer.status is not None
            statuses[name] = answer.status
        await peer.reply(ctx, rsp(cmd, 0xB000, completed=1, failed=3, warning=0))
        await peer.drain_until_closed()

    async with hostile_scp(script) as (port, errors):
        code, err = await cli(
            "get", HOST, str(port), "--timeout", "5", "-k", "StudyInstanceUID=1.2.3",
            "--sop-class", CT, "--out", str(out),
        )  # fmt: skip
    assert not errors, errors
    assert statuses == {"truncated": 0xC000, "empty": 0xC000, "another instance": 0xA900, "sound": 0}, statuses
    assert sorted(p.name for p in out.glob("*.dcm")) == [f"{good.SOPInstanceUID}.dcm"]
    assert code == 1, (code, err)


async def test_tls_peer_closing_mid_handshake_is_a_clear_connection_failure() -> None:
    """A peer that reads our ClientHello and closes: ConnectionFailed saying the TLS
    handshake failed because the peer closed (the error had no text: 'cannot connect to
    HOST:PORT: ' was all the CLI printed)."""
    import ssl

    async def close_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(10)
        writer.close()

    from dimse_async.exceptions import ConnectionFailed

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    server = await asyncio.start_server(close_early, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ConnectionFailed, match=r"TLS handshake with .* failed: connection closed by the peer"):
            await asyncio.wait_for(scu().associate(HOST, port, called_ae="SCP", ssl=context), 5)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def test_tls_to_a_plain_dicom_port_says_the_handshake_failed(tmp_path: Path) -> None:
    """Our SCU over TLS to DCMTK storescp without TLS: storescp takes the ClientHello
    for a PDU of type 16H and drops the connection; ConnectionFailed says the TLS
    handshake failed and asks whether the peer speaks TLS (before: 'cannot connect to
    HOST:PORT: Connection reset by peer', as if nothing listened)."""
    import ssl

    from conftest import dcmtk, free_port, stop_process, wait_tcp

    from dimse_async.exceptions import ConnectionFailed

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    port = free_port()
    log = tmp_path / "storescp.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([dcmtk("storescp"), "-od", str(tmp_path), str(port)], stdout=out, stderr=out)
    try:
        wait_tcp(proc, port, log)
        with pytest.raises(ConnectionFailed, match=r"TLS handshake with .* failed: .*does the peer speak TLS\?"):
            await asyncio.wait_for(scu().associate(HOST, port, called_ae="STORESCP", ssl=context), 10)
    finally:
        stop_process(proc)


async def test_tls_peer_silent_in_the_handshake_times_out_naming_the_handshake() -> None:
    """A peer that accepts the TCP connection and never answers the ClientHello: the
    AssociationTimeout names the TLS handshake, not only the TCP connect."""
    import ssl

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until we close
        writer.close()

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    server = await asyncio.start_server(silent, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(AssociationTimeout, match=r"TCP connect and TLS handshake with .* timed out after 0.3 s"):
            await asyncio.wait_for(scu().associate(HOST, port, called_ae="SCP", ssl=context, timeout=0.3), 5)
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


MPPS = "1.2.840.10008.3.1.2.3.3"


@pytest.mark.parametrize("field", ["affected_sop_instance_uid", "affected_sop_class_uid"])
async def test_n_set_rsp_naming_another_instance_is_not_a_success_for_ours(field: str) -> None:
    """PS3.7 §10.1.3.1, §10.3.3: the N-SET-RSP's Affected SOP Class / Instance UID, when
    present, are the request's Requested ones; a Success naming another instance says
    nothing about ours: DIMSEFailure naming both."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        answer = Command(
            CommandField.N_SET_RSP, message_id_being_responded_to=cmd.message_id, status=0,
            affected_sop_class_uid=cmd.requested_sop_class_uid,
            affected_sop_instance_uid=cmd.requested_sop_instance_uid,
        )  # fmt: skip
        setattr(answer, field, "1.2.3.999")
        await peer.reply(ctx, answer)
        await peer.drain_until_closed()

    modification = Dataset()
    modification.PerformedProcedureStepStatus = "COMPLETED"
    async with hostile_scp(script) as (port, errors):
        async with scu(MPPS).associate(HOST, port, called_ae="SCP") as assoc:
            with pytest.raises(DIMSEFailure, match=r"N-SET-RSP .*'1\.2\.3\.999'"):
                await asyncio.wait_for(assoc.n_set(MPPS, "1.2.3.4", modification), 5)
    assert not errors, errors


# ---------------------------------------------------------------------------------
# C-GET / C-MOVE response identifiers
# ---------------------------------------------------------------------------------


def _implicit(tag: int, value: bytes, length: int | None = None) -> bytes:
    """One implicit VR little endian element (PS3.5 §7.1.3): 32-bit lengths."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value) if length is None else length) + value


def _failed_list(*uids: str) -> bytes:
    value = "\\".join(uids).encode()
    return _implicit(0x00080058, value + b"\0" * (len(value) % 2))


def _many_items(count: int) -> bytes:
    """A Referenced SOP Sequence of ``count`` empty items, undefined lengths (PS3.5 §7.5.2)."""
    item = _implicit(0xFFFEE000, b"", 0xFFFFFFFF) + _implicit(0xFFFEE00D, b"")
    return _implicit(0x00081199, b"", 0xFFFFFFFF) + item * count + _implicit(0xFFFEE0DD, b"")


@pytest.mark.parametrize("operation", ["move", "get"])
async def test_retrieve_response_identifiers_are_walked_and_bounded(
    operation: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A C-GET / C-MOVE SCP's response identifiers (the Failed SOP Instance UID List,
    PS3.4 C.4.2.3.1, C.4.3.3.1) get the walk and the limits C-FIND matches get: one
    whose value runs past its end, one past MAX_IDENTIFIER_ITEMS sequence items, one
    listing more than MAX_FAILED_UIDS UIDs: each list is dropped (pydicom read them
    leniently and handed them on), the counters and statuses kept, one warning line."""
    import logging

    from dimse_async.services import qr

    malformed = _implicit(0x00080058, b"1.2.3.4\0", 0x4000)  # runs past the end
    identifiers = [
        malformed,
        _failed_list("1.2.3.5") + _many_items(10_001),
        _failed_list(*(["1.2.3.6"] * (qr.MAX_FAILED_UIDS + 1))),
        _failed_list("1.2.3.7", "1.2.3.8"),
    ]
    sop_class = STUDY_MOVE if operation == "move" else STUDY_GET

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        for i, ident in enumerate(identifiers[:-1]):
            await peer.reply(ctx, rsp(cmd, 0xFF00, remaining=3 - i, completed=0, failed=i + 1, warning=0), ident)
        await peer.reply(ctx, rsp(cmd, 0xA702, completed=0, failed=4, warning=0), identifiers[-1])
        await peer.drain_until_closed()

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    logging.getLogger("dimse_async").addHandler(caplog.handler)  # (it does not propagate to root)
    try:
        async with hostile_scp(script) as (port, errors):
            ae = scu()
            ae.requested_contexts.clear()
            ae.add_requested_context(sop_class, [IMPLICIT_LE])  # 32-bit lengths: a list past 64 KiB
            async with ae.associate(HOST, port, called_ae="SCP") as assoc:
                responses = assoc.c_move(query, "ELSEWHERE") if operation == "move" else assoc.c_get(query)
                got = [p async for p in responses]
    finally:
        logging.getLogger("dimse_async").removeHandler(caplog.handler)
    assert not errors, errors
    assert [p.failed_instances for p in got] == [[], [], [], ["1.2.3.7", "1.2.3.8"]]
    assert [(p.remaining, p.failed) for p in got] == [(3, 1), (2, 2), (1, 3), (None, 4)]
    assert [int(p.status) for p in got] == [0xFF00, 0xFF00, 0xFF00, 0xA702]
    assert responses.status == 0xA702 and responses.result is not None and responses.result.failed == 4
    logged = [r.getMessage() for r in caplog.records if "Failed SOP Instance UID List is dropped" in r.getMessage()]
    assert len(logged) == 1 and "(0008,0058)" in logged[0], logged


PATIENT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


async def test_c_find_response_naming_another_sop_class_is_not_a_match() -> None:
    """PS3.7 §9.3.2.2: a C-FIND-RSP's Affected SOP Class UID, when present, is the
    request's. A match under another information model's class answers another query:
    DIMSEFailure naming both, the match not handed on (it was)."""

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0xFF00, affected_sop_class_uid=PATIENT_FIND), identifier(1, 10))
        _, cancel, _ = await peer.read_message()
        assert cancel.command_field == CommandField.C_CANCEL_RQ
        await peer.reply(ctx, rsp(cmd, 0xFE00))
        await peer.drain_until_closed()

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    got: list[Dataset] = []
    async with hostile_scp(script) as (port, errors):
        async with scu(STUDY_FIND).associate(HOST, port, called_ae="SCP") as assoc:
            with pytest.raises(DIMSEFailure, match=re.escape(PATIENT_FIND)):
                async with assoc.c_find(query) as responses:
                    async for match in responses:
                        got.append(match)
    assert not errors, errors
    assert got == []


@pytest.mark.parametrize("operation", ["move", "get"])
async def test_retrieve_final_response_naming_another_sop_class_is_not_its_outcome(operation: str) -> None:
    """A C-MOVE / C-GET final Success naming another Affected SOP Class UID (PS3.7
    §9.3.3.2, §9.3.4.2 "U(=)") says nothing of ours: DIMSEFailure, the status a failure."""
    sop_class = STUDY_MOVE if operation == "move" else STUDY_GET

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0, affected_sop_class_uid=PATIENT_FIND, completed=1, failed=0, warning=0))
        await peer.drain_until_closed()

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    async with hostile_scp(script) as (port, errors):
        async with scu(sop_class).associate(HOST, port, called_ae="SCP") as assoc:
            responses = assoc.c_move(query, "ELSEWHERE") if operation == "move" else assoc.c_get(query)
            with pytest.raises(DIMSEFailure, match=re.escape(PATIENT_FIND)):
                async for _ in responses:
                    pass
    assert not errors, errors
    assert responses.status is not None and responses.status.is_failure and responses.result is None


async def test_c_store_success_before_the_data_set_was_all_sent_is_not_stored() -> None:
    """A C-STORE SCP answering Success after the first PDU of a 32 MiB data set, then
    reading the rest: its Success was decided before it had the instance whole (PS3.7
    §9.1.1.1), so it is not reported stored (it was): DIMSEFailure, status disregarded."""
    read_all = asyncio.Event()

    async def script(peer: Peer) -> None:
        pdu = await peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x04
        cmd = None
        while True:  # the command set, then the first data set PDU
            pdata = decode_pdu(4, pdu[6:])
            assert isinstance(pdata, PDataTF)
            if any(pdv.is_command and pdv.is_last for pdv in pdata.pdvs):
                cmd = decode_command(bytes(next(p.data for p in pdata.pdvs if p.is_command)))
            if any(not pdv.is_command for pdv in pdata.pdvs):
                break
            pdu = await peer.read_pdu()
            assert pdu is not None
        assert cmd is not None
        await peer.reply(peer.context_id(CT), rsp(cmd, 0))
        while (pdu := await peer.read_pdu()) is not None:  # the rest, to its last fragment
            pdata = decode_pdu(4, pdu[6:])
            assert isinstance(pdata, PDataTF)
            if any(pdv.is_last and not pdv.is_command for pdv in pdata.pdvs):
                break
        read_all.set()
        ctx, cmd, _ = await peer.read_message()  # the next C-STORE, answered in order
        await peer.reply(ctx, rsp(cmd, 0))
        await peer.drain_until_closed()

    ds = ct_instance()
    ds.BitsAllocated = 8
    ds.PixelData = bytes(32 << 20)  # more than the transport holds: we wait for the peer to read
    async with hostile_scp(script) as (port, errors):
        async with scu(CT).associate(HOST, port, called_ae="SCP") as assoc:
            with pytest.raises(DIMSEFailure, match="before our C-STORE-RQ data set was all sent"):
                await asyncio.wait_for(assoc.c_store(ds), 10)
            await asyncio.wait_for(read_all.wait(), 5)  # the peer has it all by now
            assert (await asyncio.wait_for(assoc.c_store(ct_instance()), 5)).is_success  # the association goes on
    assert not errors, errors


def store_sub_operation(instance: Dataset, message_id: int) -> Command:
    """A C-GET SCP's C-STORE sub-operation request for ``instance`` (PS3.4 C.4.3.3)."""
    return Command(
        CommandField.C_STORE_RQ, message_id=message_id, affected_sop_class_uid=CT,
        affected_sop_instance_uid=str(instance.SOPInstanceUID), priority=0,
    )  # fmt: skip


def get_scu(**options: object) -> tuple[AE, Callable[[object], Awaitable[int]], list[str]]:
    """An SCU for Study Root C-GET that takes CT sub-operations as storage SCP (role
    selection, PS3.7 D.3.3.4): the AE, a store handler answering Success, and the SOP
    Instance UIDs that handler was given."""
    from dimse_async.acse import ContextSpec

    ae = scu(STUDY_GET, **options)
    ae.requested_contexts.append(ContextSpec(CT, [EXPLICIT_LE], scu_role=False, scp_role=True))
    handed: list[str] = []

    async def handler(request: object) -> int:
        handed.append(str(request.sop_instance_uid))  # type: ignore[attr-defined]
        return 0

    return ae, handler, handed


async def test_c_get_sub_operations_off_their_context_or_after_the_final_response_are_refused() -> None:
    """A C-GET SCP sending a C-STORE sub-operation on the C-GET context (where we are
    not storage SCP, PS3.7 D.3.3.4) and another after its final response (PS3.4
    C.4.3.3: sub-operations precede it): both answered 0x0122, neither reaches the
    C-GET's store handler nor is reported stored."""
    statuses: list[int] = []
    instance = ct_instance()

    async def script(peer: Peer) -> None:
        from dimse_async.codec import encode_dataset

        ctx, cmd, _ = await peer.read_message()
        store = store_sub_operation(instance, 100)
        data = encode_dataset(instance, EXPLICIT_LE)
        await peer.reply(ctx, store, data)
        _, answer, _ = await peer.read_message()
        statuses.append(answer.status or 0)
        await peer.reply(ctx, rsp(cmd, 0xA702, completed=0, failed=1, warning=0))
        store.message_id = 101
        await peer.reply(peer.context_id(CT), store, data)
        _, answer, _ = await peer.read_message()
        statuses.append(answer.status or 0)
        await peer.drain_until_closed()

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    ae, handler, handed = get_scu()
    async with hostile_scp(script) as (port, errors):
        async with ae.associate(HOST, port, called_ae="SCP") as assoc:
            got = [p async for p in assoc.c_get(query, store=handler)]
            for _ in range(100):  # the late sub-operation answered (bounded)
                if len(statuses) == 2 or errors:
                    break
                await asyncio.sleep(0.02)
    assert not errors, errors
    assert statuses == [0x0122, 0x0122]
    assert handed == [] and [p.failed for p in got] == [1]


async def test_c_get_left_early_takes_a_large_final_identifier_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving a C-GET early (C-CANCEL): its final response's identifier, a Failed SOP
    Instance UID List past 64 KiB, is walked in a worker thread as any large response's
    is while iterating (it was walked on the event loop), and its UIDs are in ``result``."""
    import threading

    from dimse_async import dataset_check

    uids = [f"1.2.3.{i}" for i in range(12_000)]
    walks: list[bool] = []  # on the event loop's thread
    real = dataset_check.check_dataset_bytes
    loop_thread = threading.get_ident()

    def check(data, *args, **kwargs):  # type: ignore[no-untyped-def]
        if len(data) > 64 << 10:
            walks.append(threading.get_ident() == loop_thread)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(dataset_check, "check_dataset_bytes", check)

    async def script(peer: Peer) -> None:
        ctx, cmd, _ = await peer.read_message()
        await peer.reply(ctx, rsp(cmd, 0xFF00, remaining=1, completed=0, failed=0, warning=0))
        _, cancel, _ = await peer.read_message()
        assert cancel.command_field == CommandField.C_CANCEL_RQ
        await peer.reply(ctx, rsp(cmd, 0xFE00, completed=0, failed=len(uids), warning=0), _failed_list(*uids))
        await peer.drain_until_closed()

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    async with hostile_scp(script) as (port, errors):
        ae = scu()
        ae.requested_contexts.clear()
        ae.add_requested_context(STUDY_GET, [IMPLICIT_LE])  # 32-bit lengths: a list past 64 KiB
        async with ae.associate(HOST, port, called_ae="SCP") as assoc:
            async with assoc.c_get(query) as responses:
                async for _ in responses:
                    break
    assert not errors, errors
    assert responses.status == 0xFE00 and responses.result is not None
    assert responses.result.failed_instances == uids
    assert walks == [False]


async def test_c_get_without_pending_responses_is_timed_by_its_sub_operations() -> None:
    """A C-GET SCP may send no pending response at all (PS3.4 C.4.3.2: optional), only
    its C-STORE sub-operations, then the final response: the DIMSE timeout bounds the
    silence between them (as pynetdicom's and DCMTK's SCUs count any message), not the
    whole retrieval. Before, the C-GET was aborted once the DIMSE timeout had passed
    since the request, sub-operations arriving or not."""
    instances = [ct_instance() for _ in range(5)]
    statuses: list[int] = []
    dimse = 0.8  # 5 sub-operations 0.2 s apart: the retrieval takes longer

    async def script(peer: Peer) -> None:
        from dimse_async.codec import encode_dataset

        ctx, cmd, _ = await peer.read_message()
        for i, ds in enumerate(instances):
            await asyncio.sleep(0.2)
            store = store_sub_operation(ds, 100 + i)
            await peer.reply(peer.context_id(CT), store, encode_dataset(ds, EXPLICIT_LE))
            _, answer, _ = await peer.read_message()
            statuses.append(answer.status or 0)
        await peer.reply(ctx, rsp(cmd, 0, completed=len(instances), failed=0, warning=0))
        await peer.drain_until_closed()

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    ae, handler, stored = get_scu(dimse_timeout=dimse)
    async with hostile_scp(script) as (port, errors):
        async with ae.associate(HOST, port, called_ae="SCP") as assoc:
            responses = assoc.c_get(query, store=handler)
            got = [p async for p in responses]
    assert not errors, errors
    assert responses.status == 0 and [p.completed for p in got] == [5]
    assert statuses == [0] * 5 and stored == [str(ds.SOPInstanceUID) for ds in instances]


COMMITMENT = "1.2.840.10008.1.20.1"


async def test_a_flood_of_unknown_commitment_reports_is_answered_without_a_flood_of_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An SCP sending our SCU 60 storage commitment N-EVENT-REPORTs for transactions
    never requested: each is answered 0x0110 (PS3.4 J.3.3), the warning is logged 5
    times per peer and minute, the rest counted (it was one warning per report)."""
    import logging

    from dimse_async.codec import encode_dataset
    from dimse_async.services.commitment import tracker_of

    count = 60
    statuses: list[int] = []

    async def script(peer: Peer) -> None:
        ctx = peer.context_id(COMMITMENT)
        for i in range(count):
            info = Dataset()
            info.TransactionUID = f"1.2.3.{i}"
            report = Command(
                CommandField.N_EVENT_REPORT_RQ, message_id=i + 1, affected_sop_class_uid=COMMITMENT,
                affected_sop_instance_uid="1.2.840.10008.1.20.1.1", event_type_id=1,
            )  # fmt: skip
            await peer.reply(ctx, report, encode_dataset(info, EXPLICIT_LE))
        for _ in range(count):
            _, answer, _ = await peer.read_message()
            statuses.append(answer.status or 0)
        await peer.drain_until_closed()

    ae = scu(COMMITMENT)
    tracker_of(ae)
    logging.getLogger("dimse_async").addHandler(caplog.handler)  # (it does not propagate to root)
    try:
        async with hostile_scp(script) as (port, errors):
            async with ae.associate(HOST, port, called_ae="SCP"):
                for _ in range(250):  # every report answered (bounded)
                    if len(statuses) == count or errors:
                        break
                    await asyncio.sleep(0.02)
    finally:
        logging.getLogger("dimse_async").removeHandler(caplog.handler)
    assert not errors, errors
    assert statuses == [0x0110] * count
    logged = [r.getMessage() for r in caplog.records if "unknown transaction" in r.getMessage()]
    assert len(logged) == 5, logged
