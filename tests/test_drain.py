"""Graceful drain of ``dimse-async serve`` on SIGTERM: readiness turns false first, new
associations are refused, running ones finish (DCMTK storescu mid-batch), leftovers are
aborted with a log line when the grace period ends."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import dcmtk
from test_interop_tls import make_instances
from test_metrics import CLI, ENV, HOST, distinct_ports, listening

import dimse_async as da

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def scu() -> da.AE:
    ae = da.AE("HOLDER", connect_timeout=5, acse_timeout=5, dimse_timeout=5)
    ae.add_requested_context(da.Verification)
    return ae


async def healthz(http: aiohttp.ClientSession, port: int) -> int:
    async with http.get(f"http://{HOST}:{port}/healthz") as rsp:
        return rsp.status


async def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not within {timeout} s")
        await asyncio.sleep(0.02)


async def test_sigterm_mid_batch_lets_the_running_association_finish(tmp_path: Path):
    count = 300
    files = make_instances(tmp_path / "send", count)
    archive = tmp_path / "archive"
    dicom_port, http_port = distinct_ports(2)
    argv = [
        *CLI, "serve", "--host", HOST, "--port", str(dicom_port), "--aet", "ARCHIVE", "--storage-dir", str(archive),
        "--http-port", str(http_port), "--drain-grace", "60", "--log-level", "INFO",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with listening(argv, [dicom_port, http_port], log) as proc:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:  # serve listens first, then re-indexes, then is ready
                return await healthz(http, http_port) == 200

            await wait_for(ready, 30, "/healthz answering 200")
            # An idle association held open keeps the drain waiting while we look around.
            holder = await scu().associate(HOST, dicom_port, "ARCHIVE")
            sender = await asyncio.create_subprocess_exec(
                dcmtk("storescu"), "-aec", "ARCHIVE", HOST, str(dicom_port), *map(str, files),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=ENV,
            )  # fmt: skip

            async def some_stored() -> bool:
                return sum(1 for _ in archive.rglob("*.dcm")) >= 5

            await wait_for(some_stored, 30, "the first instances stored")
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()

            async def unready() -> bool:
                return await healthz(http, http_port) == 503

            await wait_for(unready, 5, "/healthz answering 503")
            assert sender.returncode is None, "the batch ended before the drain began; use more files"
            # New associations are refused while the running ones finish.
            with pytest.raises(da.ConnectionFailed):
                await scu().associate(HOST, dicom_port, "ARCHIVE")
            out, _ = await asyncio.wait_for(sender.communicate(), 60)
            assert sender.returncode == 0, out.decode(errors="replace")
            assert sum(1 for _ in archive.rglob("*.dcm")) == count
            assert proc.poll() is None  # still waiting for the idle association
            assert (await holder.c_echo()).is_success  # a running association keeps working
            await holder.release()
            await asyncio.to_thread(proc.wait, 20)
    assert proc.returncode == 0
    assert time.monotonic() - signalled < 60
    text = log.read_text()
    assert "draining" in text and "aborting association" not in text


async def test_grace_period_ends_with_aborts_and_delay_rejects_transient(tmp_path: Path):
    dicom_port, http_port = distinct_ports(2)
    argv = [
        *CLI, "serve", "--host", HOST, "--port", str(dicom_port), "--aet", "ARCHIVE",
        "--storage-dir", str(tmp_path / "archive"), "--http-port", str(http_port),
        "--drain-grace", "2", "--drain-delay", "3", "--log-level", "INFO",
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    with listening(argv, [dicom_port, http_port], log) as proc:
        holders = [await scu().associate(HOST, dicom_port, "ARCHIVE") for _ in range(2)]
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        async with aiohttp.ClientSession() as http:

            async def unready() -> bool:
                return await healthz(http, http_port) == 503

            await wait_for(unready, 5, "/healthz answering 503")
        # During the drain delay the port still answers, with rejected-transient (the 3 s
        # delay leaves a loaded machine time to see the 503 and connect within it).
        with pytest.raises(da.AssociationRejected) as rejected:
            await scu().associate(HOST, dicom_port, "ARCHIVE")
        assert rejected.value.result == 2
        await asyncio.to_thread(proc.wait, 20)
        elapsed = time.monotonic() - signalled
    assert proc.returncode == 0
    assert 5.0 <= elapsed < 15.0, elapsed  # delay 3 + grace 2, then out
    for holder in holders:
        await asyncio.wait_for(holder.wait_closed(), 5)
        assert holder.end_reason and "abort" in holder.end_reason
    text = log.read_text()
    assert text.count("aborting association still open after the grace period") == 2
