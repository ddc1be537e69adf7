"""A C-MOVE or C-GET still running when a drain's grace period ends gets its final
response before its association is aborted (PS3.4 C.4.2.3.1, C.4.3.3.1): every
sub-operation not completed is counted failed and listed in the Failed SOP Instance
UID List, 0xA702 when none completed (as DCMTK's dcmqrscp fails every remaining
sub-operation when it cannot go on). Before, the association was aborted without one:
the requestor could not tell what had been moved.

Peers: DCMTK ``movescu`` asking the archive to move a study to a pynetdicom Storage
SCP that accepts the association and never answers its C-STORE; a raw-socket C-GET
requestor that never answers the C-STORE sub-operations on its own association."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path

import pydicom
import pytest
from conftest import dcmtk, free_port
from normalized_helpers import HOST, make_instances, running_serve, store
from pydicom.dataset import Dataset
from pynetdicom import AE as PynetdicomAE
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage
from rawpeer import RawPeer

from dimse_async.acse import ContextSpec, build_request
from dimse_async.codec import decode_identifier, encode_dataset
from dimse_async.dimse import Command, CommandField, decode_command, encode_command
from dimse_async.pdu import PDV, PDataTF, PDUReader
from dimse_async.services.qr import MODELS

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
STUDY_GET = MODELS["study"]["get"]


def hanging_store_scp(port: int, arrived: threading.Event, release: threading.Event) -> object:
    """A pynetdicom Storage SCP whose C-STORE handler waits (never answers in time)."""

    def on_store(event: evt.Event) -> int:
        arrived.set()
        release.wait(30)
        return 0x0000

    ae = PynetdicomAE(ae_title="HANG")
    ae.add_supported_context(CTImageStorage, [EXPLICIT, "1.2.840.10008.1.2"])
    return ae.start_server((HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])


async def test_a_move_to_a_hanging_destination_gets_its_final_response_at_drain(tmp_path: Path) -> None:
    files = make_instances(tmp_path / "in", 3)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    dest_port = free_port()
    arrived, release = threading.Event(), threading.Event()
    destination = hanging_store_scp(dest_port, arrived, release)
    try:
        async with running_serve(tmp_path / "archive", known_aes={"HANG": (HOST, dest_port)}) as serve:
            await store(serve.port, [p for p, _c, _i in files])
            mover = await asyncio.create_subprocess_exec(
                dcmtk("movescu"), "-d", "-to", "30", "-ta", "30", "-td", "30", "-aec", "ARCHIVE", "-aem", "HANG",
                "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", HOST, str(serve.port),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            )  # fmt: skip
            assert await asyncio.to_thread(arrived.wait, 20), "no C-STORE reached the destination"
            started = asyncio.get_running_loop().time()
            await serve.server.drain(grace=0.2)
            took = asyncio.get_running_loop().time() - started
            out = (await asyncio.wait_for(mover.communicate(), 20))[0].decode(errors="replace")
    finally:
        release.set()
        destination.shutdown()  # type: ignore[attr-defined]
    assert took < 5, took  # the grace period, the final response: not the DIMSE timeout
    final = out[out.rindex("DIMSE Status") - 400 :]  # the last response's fields (-d)
    assert "0xa702: Refused: Out of resources - Unable to perform sub-operations" in final, out
    assert re.search(r"Completed Suboperations +: 0\n", final) and re.search(r"Failed Suboperations +: 3\n", final), out
    (listed,) = re.findall(r"\(0008,0058\) UI \[([^]]*)\]", out)
    assert sorted(listed.split("\\")) == sorted(i for _p, _c, i in files), out
    assert "Server shutting down" in out, out


async def test_a_move_whose_destination_never_answers_the_association_request(tmp_path: Path) -> None:
    """The destination (a raw socket) accepts the TCP connection and never answers the
    A-ASSOCIATE-RQ: at the end of the grace period the C-MOVE still waiting for it is
    answered 0xA702 with every instance failed, as for a destination that cannot be
    reached, instead of an association aborted without a response."""
    files = make_instances(tmp_path / "in", 2)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    connected = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        connected.set()

    destination = await asyncio.start_server(silent, HOST, 0)
    dest_port = destination.sockets[0].getsockname()[1]
    try:
        async with running_serve(tmp_path / "archive", known_aes={"MUTE": (HOST, dest_port)}) as serve:
            await store(serve.port, [p for p, _c, _i in files])
            mover = await asyncio.create_subprocess_exec(
                dcmtk("movescu"), "-d", "-to", "30", "-ta", "30", "-td", "30", "-aec", "ARCHIVE", "-aem", "MUTE",
                "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", HOST, str(serve.port),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
            )  # fmt: skip
            await asyncio.wait_for(connected.wait(), 20)
            await serve.server.drain(grace=0.2)
            out = (await asyncio.wait_for(mover.communicate(), 20))[0].decode(errors="replace")
    finally:
        for writer in held:
            writer.close()
        destination.close()
    final = out[out.rindex("DIMSE Status") - 400 :]
    assert "0xa702: Refused: Out of resources - Unable to perform sub-operations" in final, out
    assert re.search(r"Failed Suboperations +: 2\n", final), out
    (listed,) = re.findall(r"\(0008,0058\) UI \[([^]]*)\]", out)
    assert sorted(listed.split("\\")) == sorted(i for _p, _c, i in files), out
    assert "server shutting down" in out, out


def _get_rq(study: str) -> tuple[bytes, bytes]:
    cmd = Command(
        CommandField.C_GET_RQ, message_id=1, affected_sop_class_uid=STUDY_GET, priority=0, data_set_type=0
    )
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study
    return encode_command(cmd), encode_dataset(q, EXPLICIT)


async def test_a_get_whose_requestor_never_answers_gets_its_final_response_at_drain(tmp_path: Path) -> None:
    """The raw requestor reads the C-STORE sub-operation and answers nothing; at the end
    of the grace period it receives the final C-GET-RSP (0xA702, Failed 3, the three
    UIDs listed), then the A-ABORT."""
    files = make_instances(tmp_path / "in", 3)
    study = str(pydicom.dcmread(files[0][0]).StudyInstanceUID)
    async with running_serve(tmp_path / "archive") as serve:
        await store(serve.port, [p for p, _c, _i in files])
        rq = build_request(
            "ARCHIVE", "RAWGET", [ContextSpec(STUDY_GET, [EXPLICIT]), ContextSpec(CT, [EXPLICIT], scu_role=False, scp_role=True)],
            max_pdu=1 << 20,
        )  # fmt: skip
        peer = await RawPeer.connect(serve.port)
        try:
            await peer.associate(rq.encode())
            command, identifier = _get_rq(study)
            await peer.send(PDataTF([PDV(1, True, True, command)]).encode())
            await peer.send(PDataTF([PDV(1, False, True, identifier)]).encode())
            reader = PDUReader(0)
            commands: list[Command] = []
            final: Dataset | None = None
            aborted = False
            drained: asyncio.Task[None] | None = None
            pending_command: Command | None = None
            data = bytearray()
            while True:
                pdu = await peer.read_pdu(10)
                assert pdu is not None, "closed without an A-ABORT"
                if pdu[0] == 0x07:
                    aborted = True
                    break
                assert pdu[0] == 0x04, pdu[:1]
                reader.feed(pdu)
                tf = reader.next_pdu()
                for pdv in tf.pdvs:  # type: ignore[union-attr]
                    if pdv.is_command:
                        cmd = decode_command(bytes(pdv.data))
                        commands.append(cmd)
                        pending_command = cmd
                        if cmd.command_field == CommandField.C_STORE_RQ and drained is None:
                            drained = asyncio.ensure_future(serve.server.drain(grace=0.2))
                    else:
                        data += pdv.data
                        if pdv.is_last and pending_command is not None:
                            if pending_command.command_field == CommandField.C_GET_RSP:
                                final = decode_identifier(bytes(data), EXPLICIT)
                            data.clear()
            assert drained is not None
            await asyncio.wait_for(drained, 10)
        finally:
            await peer.close()
    responses = [c for c in commands if c.command_field == CommandField.C_GET_RSP]
    assert responses, [c.name for c in commands]
    last = responses[-1]
    assert last.status == 0xA702, hex(last.status or 0)
    assert (last.completed, last.failed) == (0, 3)
    assert final is not None and sorted(final.FailedSOPInstanceUIDList) == sorted(i for _p, _c, i in files)
    assert aborted
