"""Deflated Explicit VR Little Endian data sets whose DEFLATE stream is cut before its
end, or followed by other bytes than its pad (PS3.5 A.5: the whole data set deflated as
one raw DEFLATE stream, RFC 1951, padded with a NUL byte to an even length).

A stream cut before its final block is a data set that cannot be parsed, the same answer
on every path: a C-STORE is refused 0xC000 (Cannot understand, PS3.4 B.2.3) and nothing
is stored, a C-FIND identifier 0xA900 (Identifier does not match SOP Class, PS3.4
C.4.1.1.4), a file is skipped by the re-index; before, a cut stream was read as far as it
went and stored as Success. Bytes after a whole stream are no data: they are ignored, as
DCMTK and pydicom read them (pydicom's own image_dfl.dcm ends with eight).
"""

from __future__ import annotations

import asyncio
import io
import zlib
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from rawpeer import DEFLATED_LE, RawPeer, ct_dataset, find_identifier, pdata, response_status

import dimse_async as da
from dimse_async.codec import encode_dataset
from dimse_async.dimse import Command, CommandField, encode_command
from dimse_async.inflate import check_deflated, inflate

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def deflated(ds: Dataset) -> bytes:
    """``ds`` deflated, without the pad (the stream as RFC 1951 ends it)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return packer.compress(encode_dataset(ds, EXPLICIT_LE)) + packer.flush()


def framings(stream: bytes) -> dict[str, bytes]:
    """The stream framed well (as is, and with its pad) and badly."""
    return {
        "as-is": stream,
        "padded": stream + b"\x00",
        "junk-after": stream + b"JUNK",
        "two-nuls-after": stream + b"\x00\x00",
        "one-byte-after": stream + b"\x01",
        "cut": stream[:-2],
    }


GOOD = {"as-is", "padded", "junk-after", "two-nuls-after", "one-byte-after"}
CASES = list(framings(b"xx"))


@pytest.mark.parametrize("case", CASES)
def test_inflate_and_the_file_check_agree_on_framing(case: str) -> None:
    stream = deflated(find_identifier("STUDY"))
    data = framings(stream)[case]
    if case in GOOD:
        assert inflate(data) == encode_dataset(find_identifier("STUDY"), EXPLICIT_LE)
        assert check_deflated(io.BytesIO(data), 0) == len(encode_dataset(find_identifier("STUDY"), EXPLICIT_LE))
    else:
        with pytest.raises(ValueError, match="ends before its deflate stream does"):
            inflate(data)
        with pytest.raises(ValueError, match="ends before its deflate stream does"):
            check_deflated(io.BytesIO(data), 0)


@pytest.mark.parametrize("size", [65536 - 2, 65536 + 2, 3 * 65536 + 10])
def test_a_padded_stream_whose_data_fills_whole_output_pieces_is_well_framed(size: int) -> None:
    """Inflated in pieces of 64 KiB: a stream that ends past a piece's output limit
    leaves its pad both as unconsumed input and as unused data; it is one pad byte,
    not two (pydicom's padded files of this kind were refused)."""
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    stream = packer.compress(data) + packer.flush() + b"\x00"
    assert inflate(stream) == data
    assert check_deflated(io.BytesIO(stream), 0) == size


@pytest.fixture(scope="module")
def scp_port(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One SCP for the module: deflated C-STORE into a checking DirectoryStore, deflated C-FIND."""
    root = tmp_path_factory.mktemp("stored")
    finds: list[Any] = []
    loop = asyncio.new_event_loop()
    ae = da.AE("SCP")
    ae.add_supported_context(CT, [DEFLATED_LE, EXPLICIT_LE])
    ae.add_supported_context(STUDY_FIND, [DEFLATED_LE])
    ae.on_c_store(da.DirectoryStore(root, check=True))

    @ae.on_c_find
    async def find(request: Any) -> Any:
        finds.append(request)
        return
        yield

    server = loop.run_until_complete(ae.start_server(HOST, 0))
    try:
        yield loop, server.port, root, finds
    finally:
        server.close()
        loop.run_until_complete(asyncio.wait_for(server.wait_closed(grace=2), 10))
        loop.close()


def rq(port_contexts: list[tuple[str, str]]) -> bytes:
    from dimse_async.acse import ContextSpec, build_request

    return build_request("SCP", "RAW", [ContextSpec(a, [ts]) for a, ts in port_contexts], max_pdu=65536).encode()


async def one_request(port: int, command: Command, dataset: bytes) -> int | None:
    """Associate (CT storage on context 1, Study FIND on 3), send one request, its status."""
    peer = await RawPeer.connect(port)
    try:
        await peer.associate(rq([(CT, DEFLATED_LE), (STUDY_FIND, DEFLATED_LE)]))
        ctx = 1 if command.command_field == CommandField.C_STORE_RQ else 3
        await peer.send(pdata(ctx, encode_command(command), command=True) + pdata(ctx, dataset, command=False))
        pdu = await peer.read_pdu()
        assert pdu is not None and pdu[0] == 0x04, pdu
        _, status = response_status(pdu)
        await peer.release()
        return status
    finally:
        await peer.close()


@pytest.mark.parametrize("case", CASES)
def test_c_store_of_a_badly_framed_deflated_data_set_is_refused(scp_port: Any, case: str) -> None:
    loop, port, root, _finds = scp_port
    ds = ct_dataset()
    data = framings(deflated(ds))[case]
    cmd = Command(
        CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid=CT,
        affected_sop_instance_uid=ds.SOPInstanceUID, priority=0, data_set_type=0,
    )  # fmt: skip
    status = loop.run_until_complete(one_request(port, cmd, data))
    stored = (Path(root) / f"{ds.SOPInstanceUID}.dcm").exists()
    if case in GOOD:
        assert (status, stored) == (0x0000, True)
    else:
        assert (status, stored) == (0xC000, False)


@pytest.mark.parametrize("case", CASES)
def test_c_find_with_a_badly_framed_deflated_identifier_is_refused(scp_port: Any, case: str) -> None:
    loop, port, _root, finds = scp_port
    before = len(finds)
    data = framings(deflated(find_identifier("STUDY")))[case]
    cmd = Command(CommandField.C_FIND_RQ, message_id=1, affected_sop_class_uid=STUDY_FIND, priority=0, data_set_type=0)
    status = loop.run_until_complete(one_request(port, cmd, data))
    if case in GOOD:
        assert (status, len(finds)) == (0x0000, before + 1)
    else:
        assert (status, len(finds)) == (0xA900, before)


def test_c_store_into_a_checking_directory_store_is_checked_on_the_inline_path(scp_port: Any) -> None:
    """``DirectoryStore(check=True)``: a data set whose last value runs past its end
    (Explicit VR LE, not deflated) is refused 0xC000 and not stored; before, the
    usual C-STORE (run as callbacks, without a task) skipped the check and answered
    Success for it."""
    loop, port, root, _finds = scp_port

    async def store() -> int | None:
        ds = ct_dataset()
        data = encode_dataset(ds, EXPLICIT_LE) + b"\x10\x00\x10\x00PN\x40\x00ab"  # (0010,0010), 64 bytes claimed
        cmd = Command(
            CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid=CT,
            affected_sop_instance_uid=ds.SOPInstanceUID, priority=0, data_set_type=0,
        )  # fmt: skip
        peer = await RawPeer.connect(port)
        try:
            await peer.associate(rq([(CT, EXPLICIT_LE)]))
            await peer.send(pdata(1, encode_command(cmd), command=True) + pdata(1, data, command=False))
            pdu = await peer.read_pdu()
            assert pdu is not None and pdu[0] == 0x04, pdu
            await peer.release()
            assert not (Path(root) / f"{ds.SOPInstanceUID}.dcm").exists()
            return response_status(pdu)[1]
        finally:
            await peer.close()

    assert loop.run_until_complete(store()) == 0xC000
