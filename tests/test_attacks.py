"""Hostile clients against ``dimse-async serve`` / ``store-scp`` / ``echo-scp`` in a
subprocess: every attack runs from 127.0.0.1 while a legitimate client on 127.0.0.2
must be served, and the server's memory (RSS, measured with psutil) stays bounded.

Malformed fields get a DIMSE failure status (PS3.7 Annex C), never an abort for an
"internal error", a traceback or a silent close.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawpeer import (
    VERIFICATION,
    RawPeer,
    ServerProcess,
    command_bytes,
    ct_dataset,
    find_identifier,
    find_rq,
    legit_echo,
    pdata,
    response_status,
    server_process,
    store_rq,
)

from dimse_async.dimse import Command, CommandField


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with server_process(tmp_path_factory.mktemp("archive"), "serve") as server:
        yield server


async def exchange(port: int, *parts: bytes) -> list[tuple[int, int | None]]:
    """Associate, send ``parts``, read responses until a final one; release."""
    peer = await RawPeer.connect(port)
    try:
        await peer.associate()
        for part in parts:
            await peer.send(part)
        out = []
        while True:
            pdu = await peer.read_pdu()
            assert pdu is not None, "silent close"
            assert pdu[0] == 0x04, f"expected a response, got {pdu[:10].hex()}"
            if not pdu[11] & 0x01:
                continue  # a data set fragment
            field, status = response_status(pdu)
            out.append((field, status))
            if status not in (0xFF00, 0xFF01):
                break
        await peer.release()
        return out
    finally:
        await peer.close()


def _patch(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


async def test_store_with_0xff_in_sop_instance_uid_is_a_failure_status(archive: ServerProcess) -> None:
    ds = ct_dataset()
    cmd, data = store_rq(ds)
    uid = str(ds.SOPInstanceUID).encode()
    bad = uid[:5] + b"\xff" + uid[6:]
    cmd = _patch(cmd, uid, bad)
    assert await exchange(archive.port, pdata(3, cmd, command=True), pdata(3, data, command=False)) == [
        (0x8001, 0xC000)
    ]
    await legit_echo(archive.port)


async def test_store_with_0xff_in_sop_class_uid_is_refused(archive: ServerProcess) -> None:
    cmd, data = store_rq(ct_dataset())
    cmd = _patch(cmd, b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.5.1.4.1.1.\xff")
    assert await exchange(archive.port, pdata(3, cmd, command=True), pdata(3, data, command=False)) == [
        (0x8001, 0x0122)
    ]


async def test_store_announcing_no_data_set_is_a_failure_status(archive: ServerProcess) -> None:
    cmd, _ = store_rq(ct_dataset())
    cmd = _patch(cmd, struct.pack("<HHIH", 0, 0x0800, 2, 0), struct.pack("<HHIH", 0, 0x0800, 2, 0x0101))
    assert await exchange(archive.port, pdata(3, cmd, command=True)) == [(0x8001, 0xC000)]


async def test_echo_for_a_garbled_sop_class_is_refused(archive: ServerProcess) -> None:
    cmd = command_bytes(Command(CommandField.C_ECHO_RQ, message_id=5, affected_sop_class_uid=VERIFICATION))
    cmd = _patch(cmd, b"1.2.840.10008.1.1", b"1.2.840.10008.1.\xff")
    assert await exchange(archive.port, pdata(1, cmd, command=True)) == [(0x8030, 0x0122)]


async def test_find_level_with_0xff_is_a_failure_status(archive: ServerProcess) -> None:
    cmd, data = find_rq(find_identifier("STUDY"))
    data = _patch(data, b"STUDY", b"STUD\xff")
    assert await exchange(archive.port, pdata(7, cmd, command=True), pdata(7, data, command=False)) == [
        (0x8020, 0xA900)
    ]
    await legit_echo(archive.port)


def test_no_traceback_or_internal_error_in_the_server_log(archive: ServerProcess) -> None:
    archive.check_log()


@pytest.mark.parametrize("command", ["serve", "store-scp", "echo-scp"])
def test_servers_listen_on_loopback_unless_told(command: str, tmp_path: Path) -> None:
    with server_process(tmp_path, command, host=None) as server:
        assert server.listening() == {"127.0.0.1"}
        assert "listening on all interfaces" not in server.log_text()


@pytest.mark.parametrize("command", ["serve", "echo-scp"])
def test_listening_on_all_interfaces_without_an_ae_policy_is_logged(command: str, tmp_path: Path) -> None:
    with server_process(tmp_path, command, host="0.0.0.0") as server:
        pass
    warnings = [e for e in server.log_events() if "listening on all interfaces" in str(e.get("event"))]
    assert warnings and warnings[0]["level"] == "warning", server.log_text()
