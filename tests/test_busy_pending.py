"""Under pressure (half of ``max_pending`` or more taken by connections without an
A-ASSOCIATE-RQ), a connection that has waited ``busy_pending_timeout`` for its request
(TLS handshake and PROXY header included) is dropped to make room, oldest first; a
client sends its request within a few round trips, so many silent clients no longer
hold the server's pending places for their whole ARTIM / handshake / header timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from rawpeer import RawPeer, rq_bytes
from test_tls import closed_at_once, make_certs
from test_warning_limits import lines

import dimse_async as da
from dimse_async import proxy, tls
from dimse_async.archive.config import load_config
from dimse_async.archive.serve import apply_args, archive_ae
from dimse_async.cli import _parser, storage_ae

pytestmark = pytest.mark.timeout(60)


def _scp(**kwargs: object) -> da.AE:
    ae = da.AE("ARCHIVE", **kwargs)  # type: ignore[arg-type]
    ae.add_supported_context(da.Verification)
    return ae


def _scu() -> da.AE:
    scu = da.AE("CLIENT")
    scu.add_requested_context(da.Verification)
    return scu


class Silent:
    """Connections that send ``first`` (or nothing) and then nothing; closed on exit."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []

    async def open(self, first: bytes = b"") -> asyncio.StreamReader:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(w)
        if first:
            w.write(first)
            await w.drain()
        return r

    async def __aenter__(self) -> Silent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()
        await asyncio.sleep(0.05)


async def _wait_pending(server: da.Server, n: int) -> None:
    for _ in range(200):
        if len(server._unadmitted) + len(server._early) == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(server._unadmitted) + len(server._early)} pending, expected {n}")


async def test_silent_connections_are_dropped_oldest_first_when_the_server_is_busy() -> None:
    """Eight silent connections fill ``max_pending`` (8): a ninth, at once, is closed
    (the silent ones are still young). After ``busy_pending_timeout`` a client gets
    in: the five oldest silent ones are dropped (down to under half), the three newest
    are left to their usual ARTIM; the drops are logged with the reason."""
    from dimse_async.metrics import Metrics

    ae = _scp(max_pending=8, busy_pending_timeout=0.3)
    ae.observer = metrics = Metrics()
    with lines() as log:
        async with await ae.start_server("127.0.0.1", 0) as server:
            async with Silent(server.port) as conns:
                silent = []
                for _ in range(8):
                    silent.append(await conns.open())
                    await asyncio.sleep(0.01)  # (an order among them)
                await _wait_pending(server, 8)
                assert await closed_at_once(await conns.open(), 1.0)  # full, and nobody old enough
                await asyncio.sleep(0.35)
                async with _scu().associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                    assert (await assoc.c_echo()).is_success
                closed = await asyncio.gather(*(closed_at_once(r, 0.3) for r in silent))
                assert closed == [True] * 5 + [False] * 3
    reasons = [str(line["reason"]) for line in log.events("connection refused")]
    why = "no A-ASSOCIATE-RQ within 0.3 s while half of max_pending (8) or more is taken"
    assert reasons == [why] * 5, log.lines
    refused = metrics.registry.get_sample_value
    assert refused("dicom_connections_refused_total", {"reason": "busy"}) == 5
    assert refused("dicom_connections_refused_total", {"reason": "pending"}) == 1  # the ninth, closed at once


async def test_below_half_full_nobody_is_dropped() -> None:
    ae = _scp(max_pending=8, busy_pending_timeout=0.2)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with Silent(server.port) as conns:
            silent = [await conns.open() for _ in range(3)]
            await _wait_pending(server, 3)
            await asyncio.sleep(0.3)
            async with _scu().associate("127.0.0.1", server.port, "ARCHIVE") as assoc:
                assert (await assoc.c_echo()).is_success
            assert not any(await asyncio.gather(*(closed_at_once(r, 0.2) for r in silent)))


async def test_without_busy_pending_timeout_silent_connections_keep_the_server_full() -> None:
    """The behaviour this replaces (and still the one with ``None``): the places stay
    taken until the ARTIM timer, and a new client is closed at once."""
    ae = _scp(max_pending=4, busy_pending_timeout=None)
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with Silent(server.port) as conns:
            silent = [await conns.open() for _ in range(4)]
            await _wait_pending(server, 4)
            await asyncio.sleep(0.3)
            with pytest.raises((da.AssociationAborted, da.ConnectionFailed)):
                await _scu().associate("127.0.0.1", server.port, "ARCHIVE", timeout=2)
            assert not any(await asyncio.gather(*(closed_at_once(r, 0.1) for r in silent)))


async def test_silent_tls_and_proxy_clients_are_dropped_when_the_server_is_busy(tmp_path: Path) -> None:
    """Behind the PROXY protocol with TLS: two connections that never send their header
    and two that send it and then no ClientHello fill ``max_pending`` (4). After the
    busy timeout a client with header, TLS and request gets in; the three oldest are
    dropped (down to under half)."""
    certs = make_certs(tmp_path)
    ae = _scp(max_pending=4, busy_pending_timeout=0.3)
    server_ctx = tls.server_context(str(certs.server_cert), str(certs.server_key))
    client_ctx = tls.client_context(str(certs.ca))
    async with await ae.start_server(
        "127.0.0.1", 0, ssl=server_ctx, proxy_protocol=True, proxy_header_timeout=20, ssl_handshake_timeout=20
    ) as server:

        def header(client: str) -> bytes:
            return proxy.encode_v2((client, 1), ("127.0.0.1", server.port))

        async with Silent(server.port) as conns:
            silent = []
            for first in (b"", b"", header("192.0.2.1"), header("192.0.2.2")):
                silent.append(await conns.open(first))
                await asyncio.sleep(0.02)
            await _wait_pending(server, 4)
            assert server.preambles == 4
            await asyncio.sleep(0.35)
            async with _scu().associate(
                "127.0.0.1", server.port, "ARCHIVE", ssl=client_ctx, proxy_header=header("192.0.2.3")
            ) as assoc:
                assert (await assoc.c_echo()).is_success
            closed = await asyncio.gather(*(closed_at_once(r, 0.5) for r in silent))
            assert closed == [True, True, True, False]
            await _wait_pending(server, 1)
            assert server._pending_by_address == {"192.0.2.2": 1}


async def test_a_request_already_in_is_never_dropped() -> None:
    """On a paused server (re-indexing) a request that arrived waits for the opening:
    it is not pending any more, whatever its age; the silent connection beside it is."""
    ae = _scp(max_pending=2, busy_pending_timeout=0.2)
    async with await ae.start_server("127.0.0.1", 0, paused=True, paused_wait=10) as server:
        waiting = await RawPeer.connect(server.port)
        try:
            async with Silent(server.port) as conns:
                await waiting.send(rq_bytes())
                silent = await conns.open()
                await asyncio.sleep(0.3)
                newcomer = await conns.open()
                assert await closed_at_once(silent, 1.0)
                assert not await closed_at_once(newcomer, 0.1)
                server.open()
                reply = await waiting.read_pdu()
                assert reply is not None and reply[0] == 0x02  # A-ASSOCIATE-AC
        finally:
            await waiting.close()


def test_busy_pending_timeout_settings(tmp_path: Path) -> None:
    assert da.AE("X").busy_pending_timeout == 5.0
    for bad in (0, -1):
        with pytest.raises(ValueError, match="busy_pending_timeout"):
            da.AE("X", busy_pending_timeout=bad)
    args = _parser("store-scp").parse_args(["store-scp", "--out", str(tmp_path), "--busy-pending-timeout", "1.5"])
    assert storage_ae(args).busy_pending_timeout == 1.5
    args = _parser("serve").parse_args(["serve", "--busy-pending-timeout", "2"])
    config = load_config(None)
    apply_args(config, args)
    assert archive_ae(config).busy_pending_timeout == 2
    with pytest.raises(SystemExit):
        _parser("echo-scp").parse_args(["echo-scp", "--busy-pending-timeout", "0"])
    path = tmp_path / "serve.toml"
    path.write_text("busy_pending_timeout = 3\n")
    assert archive_ae(load_config(path)).busy_pending_timeout == 3
    path.write_text("busy_pending_timeout = 0\n")
    with pytest.raises(ValueError, match="busy_pending_timeout"):
        load_config(path)
