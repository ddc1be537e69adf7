"""TLS (PS3.15 B.9, BCP 195): our SCU and SCP with certificates from ``trustme``, and a
silent TLS client that must not delay anyone else."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

import dimse_async as da
from dimse_async import tls

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"


@dataclass
class Certs:
    """PEM files: a CA, a server certificate for localhost/127.0.0.1, a client certificate
    (CN=CT1, OU=CT, O=Radiology), and a second, unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def make_certs(root: Path) -> Certs:
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert(
        "ct1.example.org", common_name="CT1", organization_name="Radiology", organization_unit_name="CT"
    )
    stranger = other.issue_cert("intruder.example.org", common_name="INTRUDER")
    files = Certs(
        *(
            root / n
            for n in (
                "ca.pem",
                "server.pem",
                "server.key",
                "client.pem",
                "client.key",
                "other-ca.pem",
                "other.pem",
                "other.key",
            )
        )
    )
    ca.cert_pem.write_to_path(files.ca)
    server.cert_chain_pems[0].write_to_path(files.server_cert)
    server.private_key_pem.write_to_path(files.server_key)
    client.cert_chain_pems[0].write_to_path(files.client_cert)
    client.private_key_pem.write_to_path(files.client_key)
    other.cert_pem.write_to_path(files.other_ca)
    stranger.cert_chain_pems[0].write_to_path(files.other_client_cert)
    stranger.private_key_pem.write_to_path(files.other_client_key)
    return files


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def echo_scp(seen: list[da.Association]) -> da.AE:
    ae = da.AE("TLS_SCP", network_timeout=10)
    ae.add_supported_context(da.Verification)

    @ae.on_c_echo
    async def echo(request: da.Request) -> int:
        seen.append(request.assoc)
        return 0

    return ae


def scu() -> da.AE:
    ae = da.AE("TLS_SCU", connect_timeout=5, acse_timeout=5, dimse_timeout=5)
    ae.add_requested_context(da.Verification)
    return ae


async def test_mutual_tls_echo_exposes_client_subject(certs: Certs):
    seen: list[da.Association] = []
    server_ctx = tls.server_context(
        str(certs.server_cert), str(certs.server_key), cafile=str(certs.ca), require_client_cert=True
    )
    client_ctx = tls.client_context(str(certs.ca), certfile=str(certs.client_cert), keyfile=str(certs.client_key))
    async with await echo_scp(seen).start_server(HOST, 0, ssl=server_ctx) as server:
        async with scu().associate(HOST, server.port, "TLS_SCP", ssl=client_ctx) as assoc:
            assert (await assoc.c_echo()).is_success
            assert assoc.tls is not None and assoc.tls.version in ("TLSv1.2", "TLSv1.3")
            assert assoc.tls.peer_certificate is not None  # the server's, verified
    (theirs,) = seen
    assert theirs.tls is not None
    assert theirs.tls.peer_subject == "CN=CT1,OU=CT,O=Radiology"
    assert theirs.tls.cipher in {c["name"] for c in server_ctx.get_ciphers()} | {
        "TLS_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
    }


async def test_server_without_client_ca_serves_anonymous_clients(certs: Certs):
    seen: list[da.Association] = []
    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    async with await echo_scp(seen).start_server(HOST, 0, ssl=server_ctx) as server:
        async with scu().associate(HOST, server.port, "TLS_SCP", ssl=tls.client_context(str(certs.ca))) as assoc:
            assert (await assoc.c_echo()).is_success
    assert seen[0].tls is not None and seen[0].tls.peer_subject is None


async def test_client_certificate_from_another_ca_is_refused(certs: Certs):
    seen: list[da.Association] = []
    server_ctx = tls.server_context(
        str(certs.server_cert), str(certs.server_key), cafile=str(certs.ca), require_client_cert=True
    )
    stranger = tls.client_context(
        str(certs.ca), certfile=str(certs.other_client_cert), keyfile=str(certs.other_client_key)
    )
    no_cert = tls.client_context(str(certs.ca))
    async with await echo_scp(seen).start_server(HOST, 0, ssl=server_ctx) as server:
        for ctx in (stranger, no_cert):
            # TLS 1.3 clients learn of the refusal after their half of the handshake.
            with pytest.raises((da.ConnectionFailed, da.AssociationAborted)):
                async with scu().associate(HOST, server.port, "TLS_SCP", ssl=ctx) as assoc:
                    await assoc.c_echo()
        assert not server.associations
    assert seen == []


async def test_client_refuses_server_it_cannot_verify(certs: Certs):
    seen: list[da.Association] = []
    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    async with await echo_scp(seen).start_server(HOST, 0, ssl=server_ctx) as server:
        with pytest.raises(da.ConnectionFailed, match="certificate verify failed"):
            await scu().associate(HOST, server.port, "TLS_SCP", ssl=tls.client_context(str(certs.other_ca)))
        with pytest.raises(da.ConnectionFailed, match=r"certificate verify failed|Hostname mismatch"):
            await scu().associate(
                HOST, server.port, "TLS_SCP", ssl=tls.client_context(str(certs.ca)), server_hostname="pacs.example.org"
            )
    assert seen == []


async def test_bcp195_profile_refuses_weak_protocols_and_ciphers(certs: Certs):
    ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all("GCM" in name or "CHACHA20" in name for name in tls12)
    assert all(name.startswith(("ECDHE", "DHE")) for name in tls12)
    # A TLS 1.2 client offering only CBC suites finds no common cipher.
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak.load_verify_locations(str(certs.ca))
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    seen: list[da.Association] = []
    async with await echo_scp(seen).start_server(HOST, 0, ssl=ctx) as server:
        with pytest.raises(da.ConnectionFailed):
            await scu().associate(HOST, server.port, "TLS_SCP", ssl=weak)
        # The same client with an AEAD suite gets through.
        weak.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        async with scu().associate(HOST, server.port, "TLS_SCP", ssl=weak) as assoc:
            assert assoc.tls is not None and assoc.tls.version == "TLSv1.2"
            assert (await assoc.c_echo()).is_success


async def test_silent_tls_client_does_not_delay_other_clients(certs: Certs):
    """One client connects and never sends its ClientHello; another connects and
    associates at once. The silent one is dropped when its handshake time is up."""
    seen: list[da.Association] = []
    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    client_ctx = tls.client_context(str(certs.ca))
    async with await echo_scp(seen).start_server(HOST, 0, ssl=server_ctx, ssl_handshake_timeout=3.0) as server:
        silent = [socket.create_connection((HOST, server.port)) for _ in range(5)]
        half = socket.create_connection((HOST, server.port))
        half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        try:
            await asyncio.sleep(0.2)  # the server has accepted them all
            t0 = time.monotonic()
            async with scu().associate(HOST, server.port, "TLS_SCP", ssl=client_ctx) as assoc:
                assert (await assoc.c_echo()).is_success
            elapsed = time.monotonic() - t0
            # queued behind a silent one it would wait for its 3 s handshake timeout
            assert elapsed < 2.0, f"second client took {elapsed:.2f} s behind a silent one"
            # The silent clients are disconnected after the handshake timeout, not before.
            for s in [*silent, half]:
                s.settimeout(8.0)
                assert await asyncio.to_thread(s.recv, 100) == b""
                assert time.monotonic() - t0 >= 2.5
            assert time.monotonic() - t0 < 8.0
            assert not server.preambles
        finally:
            for s in [*silent, half]:
                s.close()
    assert len(seen) == 1


async def until(condition, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Until ``condition()`` holds (the server acts on a close in its own time); fails
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} after {timeout} s"
        await asyncio.sleep(0.01)


async def closed_at_once(reader: asyncio.StreamReader, within: float) -> bool:
    """Whether the server closed this connection (without a byte) within ``within`` s."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_connections_stuck_in_the_tls_handshake_count_as_not_yet_associated(certs: Certs):
    """Clients that connect to a TLS port and never finish the handshake are capped like
    any connection without an A-ASSOCIATE-RQ (``max_pending_per_address``,
    ``max_pending``): those over the cap are closed at once instead of each holding a
    socket for the handshake timeout; other addresses still get through."""
    seen: list[da.Association] = []
    ae = echo_scp(seen)
    ae.max_pending, ae.max_pending_per_address = 6, 3
    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    client_ctx = tls.client_context(str(certs.ca))
    async with await ae.start_server(HOST, 0, ssl=server_ctx, ssl_handshake_timeout=20) as server:
        stalled = []
        for source in ("127.0.0.3", "127.0.0.4"):
            for _ in range(6):
                stalled.append(await asyncio.open_connection(HOST, server.port, local_addr=(source, 0)))
        try:
            closed = await asyncio.gather(*(closed_at_once(r, 1.5) for r, _ in stalled))
            assert closed == [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3
            assert server.preambles == 6
            # The total is full: one more handshake from anywhere waits its turn (closed).
            r, w = await asyncio.open_connection(HOST, server.port, local_addr=("127.0.0.5", 0))
            assert await closed_at_once(r, 1.5)
            w.close()
            # One stalled client gives up: its place is free for a real one.
            early = len(server._early)
            stalled[0][1].close()
            await until(lambda: len(server._early) < early, "the closed connection's place freed")
            async with scu().associate(
                HOST, server.port, "TLS_SCP", ssl=client_ctx, local_address=("127.0.0.2", 0)
            ) as assoc:
                assert (await assoc.c_echo()).is_success
        finally:
            for _, w in stalled:
                w.close()
        await until(lambda: not server._early and not server._pending_by_address, "every place freed")
    assert len(seen) == 1


async def test_broken_tls_record_after_the_handshake_ends_the_association_saying_why(certs: Certs):
    """A client that completes its handshake and then sends a record that fails to
    decrypt (a tampered or forged record; a TLS 1.2 renegotiation is refused the same
    way) is closed, and the association's end reason names the TLS error."""
    seen: list[da.Association] = []
    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    client_ctx = tls.client_context(str(certs.ca))
    async with await echo_scp(seen).start_server(HOST, 0, ssl=server_ctx) as server:

        def connect() -> ssl.SSLSocket:
            return client_ctx.wrap_socket(socket.create_connection((HOST, server.port)), server_hostname=HOST)

        tls_sock = await asyncio.to_thread(connect)
        try:
            for _ in range(100):
                if server.associations:
                    break
                await asyncio.sleep(0.02)
            (assoc,) = server.associations
            raw = socket.socket(fileno=os.dup(tls_sock.fileno()))
            raw.sendall(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)  # application data no key made
            raw.close()
            await asyncio.wait_for(assoc.wait_closed(), 5)
        finally:
            tls_sock.close()
    assert "TLS: " in (assoc.end_reason or ""), assoc.end_reason
    assert seen == []


def test_large_data_sets_over_tls_arrive_intact_on_uvloop_and_asyncio(certs: Certs, tmp_path: Path) -> None:
    """Data sets over 64 KiB are handed to the transport as a list of PDU headers and
    value slices (``writelines``): through TLS, on uvloop (what the command line runs)
    and on asyncio's loop, a 2 MB data set in memory and a 6 MB file streamed from disk
    arrive byte for byte."""
    import io
    import random

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from dimse_async.part10 import read_file_meta

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    sources = []
    for name, size in (("whole", 2 << 20), ("streamed", 6 << 20)):
        side = int((size // 2) ** 0.5)
        ct.Rows = ct.Columns = side
        ct.PixelData = random.Random(size).randbytes(side * side * 2)
        ct["PixelData"].VR = "OW"
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ct.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = tmp_path / f"{name}.dcm"
        ct.save_as(path, enforce_file_format=True)
        sources.append(path)

    async def transfer(out: Path) -> list[bool]:
        ae = da.AE("TLS_SCP", network_timeout=10)
        ae.add_supported_context(ct.SOPClassUID, [ExplicitVRLittleEndian])
        ae.on_c_store(da.DirectoryStore(out))
        server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
        client = da.AE("TLS_SCU", connect_timeout=5, acse_timeout=5, dimse_timeout=10)
        client.add_requested_context(ct.SOPClassUID, [ExplicitVRLittleEndian])
        async with await ae.start_server(HOST, 0, ssl=server_ctx) as server:
            async with client.associate(HOST, server.port, "TLS_SCP", ssl=tls.client_context(str(certs.ca))) as assoc:
                return [(await assoc.c_store(p)).is_success for p in sources]

    for loop_name, run in (("uvloop", da.run), ("asyncio", asyncio.run)):
        out = tmp_path / loop_name
        assert run(transfer(out)) == [True, True], loop_name
        for path in sources:
            sent = path.read_bytes()
            meta = read_file_meta(io.BytesIO(sent))
            assert meta is not None
            received = (out / f"{meta.sop_instance_uid}.dcm").read_bytes()
            assert received.endswith(sent[meta.dataset_offset :]), (loop_name, path.name)


def test_tcp_probes_on_a_tls_port_are_logged_at_info_and_a_broken_handshake_still_warns(certs: Certs) -> None:
    """A load balancer's TCP health check connects and closes without a byte (a FIN, or a
    reset as HAProxy's checks close): one INFO line saying it closed before its TLS
    handshake began, as a plain port logs a connect-and-close, not a failed handshake.
    A client that sends half a ClientHello and closes is still a warning; a real client
    right after is served. On uvloop (what the command line runs) and asyncio's loop."""
    import logging
    import struct

    records: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    client_ctx = tls.client_context(str(certs.ca))

    async def scenario() -> list[tuple[int, str]]:
        seen: list[da.Association] = []
        records.clear()
        async with await echo_scp(seen).start_server(HOST, 0, ssl=server_ctx) as server:
            for reset in (False, True):
                probe = socket.create_connection((HOST, server.port))
                if reset:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                probe.close()
            half = socket.create_connection((HOST, server.port))
            half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's first bytes
            half.close()
            await until(lambda: len(connection_lines()) >= 3 and not server.preambles, "the three connections logged")
            async with scu().associate(HOST, server.port, "TLS_SCP", ssl=client_ctx) as assoc:
                assert (await assoc.c_echo()).is_success
        assert len(seen) == 1
        return connection_lines()

    def connection_lines() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in records if r.getMessage().startswith("connection ")]

    logger = logging.getLogger("dimse_async")
    handler, level = Capture(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for loop_name, run in (("uvloop", da.run), ("asyncio", asyncio.run)):
            lines = run(scenario())
            probes = [text for level_no, text in lines if level_no == logging.INFO]
            warnings = [text for level_no, text in lines if level_no >= logging.WARNING]
            assert len(probes) == 2, (loop_name, lines)
            assert all("closed before its TLS handshake began (a TCP probe?)" in p for p in probes), (loop_name, lines)
            assert len(warnings) == 1 and "TLS handshake failed" in warnings[0], (loop_name, lines)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
