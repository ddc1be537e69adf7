"""Prometheus metrics and /healthz of ``store-scp`` scraped over HTTP after a known
workload from DCMTK: counts equal what was sent; bytes equal what crossed the wire
(measured by a counting TCP relay in front of the SCP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from conftest import communicate, dcmtk, free_port, stop_process, wait_tcp
from prometheus_client.parser import text_string_to_metric_families
from test_interop_tls import make_instances

import dimse_async as da
from dimse_async.health import HealthServer
from dimse_async.metrics import Metrics

pytestmark = [pytest.mark.interop, pytest.mark.timeout(90)]

HOST = "127.0.0.1"
_SCRIPT = Path(sys.executable).with_name("dimse-async")
CLI: list[str] = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "dimse_async"]
ENV = {**os.environ, "TCP_NODELAY": "1"}
CT = "1.2.840.10008.5.1.4.1.1.2"


def distinct_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


@contextlib.contextmanager
def listening(argv: list[str], ports: list[int], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        for port in ports:
            wait_tcp(proc, port, log)
        # The port listens first; the "listening on" line once associations are admitted
        # (serve re-indexes in between: a request meanwhile waits, or is rejected-transient).
        deadline = time.monotonic() + 60
        while f"listening on {HOST}:{ports[0]}" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{argv[:3]} never announced it was ready:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)
        yield proc
    finally:
        stop_process(proc)


class Relay:
    """A TCP relay counting the bytes each way."""

    def __init__(self, target: int):
        self.target = target
        self.to_server = 0
        self.to_client = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if upstream:
                    self.to_server += len(data)
                else:
                    self.to_client += len(data)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target)
        await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._handle, HOST, 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: aiohttp.ClientSession, port: int) -> dict:
    async with http.get(f"http://{HOST}:{port}/metrics") as rsp:
        assert rsp.status == 200 and rsp.content_type == "text/plain"
        return samples(await rsp.text())


async def test_store_scp_metrics_after_known_workload(tmp_path: Path):
    files = make_instances(tmp_path / "send", 7)
    dicom_port, http_port = distinct_ports(2)
    argv = [
        *CLI, "store-scp", "--host", HOST, "--port", str(dicom_port), "--out", str(tmp_path / "in"),
        "--aet", "STORE", "--require-called-ae", "--http-port", str(http_port),
    ]  # fmt: skip
    relay = Relay(dicom_port)
    with listening(argv, [dicom_port, http_port], tmp_path / "scp.log"):
        async with relay.running() as port, aiohttp.ClientSession() as http:
            async with http.get(f"http://{HOST}:{http_port}/healthz") as rsp:
                assert rsp.status == 200 and await rsp.text() == "ok\n"
            send = (dcmtk("storescu"), "-aec", "STORE", HOST, str(port), *map(str, files))
            code, out, _ = await communicate(send, env=ENV, merge_stderr=True)
            assert code == 0, out
            code, out, _ = await communicate(
                (dcmtk("echoscu"), "-aec", "STORE", "--repeat", "3", HOST, str(port)), env=ENV, merge_stderr=True
            )
            assert code == 0, out
            code, out, _ = await communicate(
                (dcmtk("echoscu"), "-aec", "WRONG", HOST, str(port)), env=ENV, merge_stderr=True
            )
            assert code != 0, out
            # The SCP has closed every association once its counters stop moving.
            for _ in range(100):
                m = await scrape(http, http_port)
                if value(m, "dicom_associations_open", role="scp") == 0 and value(
                    m,
                    "dicom_associations_total",
                    role="scp",
                    outcome="rejected",
                    reason="called-AE-title-not-recognized",
                ):
                    break
                await asyncio.sleep(0.05)
            async with http.get(f"http://{HOST}:{http_port}/nothing") as rsp:
                assert rsp.status == 404
    assert value(m, "dicom_operations_total", role="scp", service="C-STORE", status="success") == 7
    assert value(m, "dicom_operations_total", role="scp", service="C-ECHO", status="success") == 3
    assert value(m, "dicom_operation_seconds_count", role="scp", service="C-STORE") == 7
    assert value(m, "dicom_operation_seconds_count", role="scp", service="C-ECHO") == 3
    assert value(m, "dicom_associations_total", role="scp", outcome="released", reason="") == 2
    assert (
        value(m, "dicom_associations_total", role="scp", outcome="rejected", reason="called-AE-title-not-recognized")
        == 1
    )
    assert value(m, "dicom_associations_open", role="scp") == 0
    assert value(m, "dicom_bytes_received_total", role="scp") == relay.to_server
    assert value(m, "dicom_bytes_sent_total", role="scp") == relay.to_client
    assert relay.to_server > sum(f.stat().st_size for f in files) - 7 * 132  # at least the data sets
    assert value(m, "dicom_errors_total", kind="spool") == 0


async def test_metrics_library_hook_counts_scu_and_scp(tmp_path: Path):
    """An application registers :class:`Metrics` on its AEs and serves them itself."""
    metrics = Metrics()
    scp, scu = da.AE("SCP"), da.AE("SCU")
    metrics.install(scp)
    metrics.install(scu)
    scp.add_supported_context(da.Verification)
    scu.add_requested_context(da.Verification)
    server = await scp.start_server(HOST, 0)
    health = await HealthServer(lambda: server.ready, metrics).start(HOST, 0)
    try:
        for _ in range(2):
            async with scu.associate(HOST, server.port, "SCP") as assoc:
                for _ in range(4):
                    assert (await assoc.c_echo()).is_success
        async with aiohttp.ClientSession() as http:
            m = await scrape(http, health.port)
            assert value(m, "dicom_operations_total", role="scu", service="C-ECHO", status="success") == 8
            assert value(m, "dicom_operations_total", role="scp", service="C-ECHO", status="success") == 8
            assert value(m, "dicom_associations_total", role="scu", outcome="released", reason="") == 2
            assert value(m, "dicom_bytes_sent_total", role="scu") == value(m, "dicom_bytes_received_total", role="scp")
            server.draining = True  # what drain() sets first
            async with http.get(f"http://{HOST}:{health.port}/healthz") as rsp:
                assert rsp.status == 503 and await rsp.text() == "draining\n"
    finally:
        health.close()
        server.close()
        await server.wait_closed()


async def test_storage_and_spool_errors_are_counted(tmp_path: Path):
    """A C-STORE handler that cannot save (OSError) and a spool that cannot be written
    are both answered 0xA700 and counted in ``dicom_errors_total``."""
    files = make_instances(tmp_path / "send", 2)
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"")
    metrics = Metrics()
    full_disk = da.AE("FULL")
    bad_spool = da.AE("SPOOL", spool_threshold=0, spool_dir=str(not_a_directory))
    scu = da.AE("SCU")
    scu.add_requested_context(CT)
    for ae in (full_disk, bad_spool):
        metrics.install(ae)
        ae.add_supported_context(CT)

        @ae.on_c_store
        async def store(request: da.Request) -> int:
            raise OSError(28, "No space left on device")

    for ae in (full_disk, bad_spool):
        async with await ae.start_server(HOST, 0) as server:
            async with scu.associate(HOST, server.port, ae.ae_title) as assoc:
                for path in files:
                    assert await assoc.c_store(path) == 0xA700
    m = samples(metrics.exposition().decode())
    assert value(m, "dicom_operations_total", role="scp", service="C-STORE", status="failure") == 4
    assert value(m, "dicom_errors_total", kind="storage") == 2
    assert value(m, "dicom_errors_total", kind="spool") == 2


async def test_tcp_probes_of_serves_tls_port_are_counted_as_on_a_plain_port(tmp_path: Path):
    """A load balancer's TCP probe (connect, close before any byte) of ``serve``'s TLS port
    is in ``/metrics`` as a probe of a plain port is: ``dicom_associations_total``
    ``{role="scp",outcome="failed",reason=""}`` (before: in no metric at all)."""
    from test_tls import make_certs

    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    dicom_port, http_port = distinct_ports(2)
    argv = [
        *CLI, "serve", "--host", HOST, "--port", str(dicom_port), "--aet", "ARCHIVE", "--storage-dir",
        str(tmp_path / "archive"), "--http-port", str(http_port), "--tls-cert", str(certs.server_cert), "--tls-key",
        str(certs.server_key),
    ]  # fmt: skip
    labels = {"role": "scp", "outcome": "failed", "reason": ""}
    with listening(argv, [dicom_port, http_port], tmp_path / "serve.log"):
        async with aiohttp.ClientSession() as http:
            before = value(await scrape(http, http_port), "dicom_associations_total", **labels)
            for _ in range(3):
                _reader, writer = await asyncio.open_connection(HOST, dicom_port)
                writer.close()
                await writer.wait_closed()
            deadline = time.monotonic() + 10
            while (now := value(await scrape(http, http_port), "dicom_associations_total", **labels)) < before + 3:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
    assert now == before + 3, (before, now)


async def test_a_flood_of_silent_health_clients_holds_a_bounded_number_of_connections():
    """200 connections to the health port that send nothing: the first 64 are served
    (each until its 5 s read timeout), the rest are closed as they come, so the flood
    holds a bounded number of the process's descriptors (the DICOM port shares them);
    a probe sent once the flood is over is answered. Before, every one was held."""
    health = await HealthServer(lambda: True).start(HOST, 0)
    opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(200):
            opened.append(await asyncio.open_connection(HOST, health.port))

        async def closed_by_server(reader: asyncio.StreamReader) -> bool:
            try:
                return await asyncio.wait_for(reader.read(1), 2) == b""
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False

        closed = await asyncio.gather(*(closed_by_server(r) for r, _ in opened))
        held = sum(not c for c in closed)
        assert held == 64, held
        for _, w in opened:
            w.close()
        opened.clear()
        for _ in range(100):  # the served ones see their clients go
            r, w = await asyncio.open_connection(HOST, health.port)
            w.write(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                reply = await asyncio.wait_for(r.read(), 5)
            except ConnectionResetError:
                reply = b""
            w.close()
            if reply:
                break
            await asyncio.sleep(0.05)
        assert reply.startswith(b"HTTP/1.1 200"), reply
    finally:
        for _, w in opened:
            w.close()
        health.close()
        await health.wait_closed()
