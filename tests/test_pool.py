"""The SCU association pool against real peers: DCMTK ``storescp`` (one association
at a time, so reuse is visible in its log) and our own SCP (to abort from the far side
and to count concurrent associations)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from conftest import DCMTK, free_port, stop_process, wait_tcp
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dimse_async as da
from dimse_async.pool import AssociationPool, PoolClosed

HOST = "127.0.0.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


def instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "POOL^TEST"
    ds.PatientID = "P1"
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def scu(title: str = "POOLSCU") -> da.AE:
    ae = da.AE(title, acse_timeout=10, dimse_timeout=10, connect_timeout=10)
    ae.add_requested_context(da.Verification)
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    return ae


def start_storescp(port: int, out: Path, log: Path) -> subprocess.Popen[bytes]:
    out.mkdir(exist_ok=True)
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [f"{DCMTK}/storescp", "-v", "-od", str(out), str(port)], stdout=sink, stderr=subprocess.STDOUT
        )
    wait_tcp(proc, port, log)
    return proc


async def until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_reuses_one_association_with_storescp_and_rebuilds_after_it_restarts(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "storescp.log"
    proc = start_storescp(port, tmp_path / "in", log)
    try:
        pool = AssociationPool(scu(), max_size=1, idle_timeout=30)
        for _ in range(3):
            async with pool.acquire(HOST, port, "STORESCP") as assoc:
                assert (await assoc.c_store(instance())).is_success
        stats = pool.stats()
        assert (stats.opened, stats.reused) == (1, 2)
        assert log.read_text().count("Association Acknowledged") == 1
        # storescp goes away with our association idle in the pool, then comes back
        stop_process(proc)
        proc = start_storescp(port, tmp_path / "in", log)
        async with pool.acquire(HOST, port, "STORESCP") as assoc:
            assert (await assoc.c_store(instance())).is_success
        stats = pool.stats()
        assert stats.opened == 2 and stats.discarded == 1
        await pool.close()
        with pytest.raises(PoolClosed):
            async with pool.acquire(HOST, port, "STORESCP"):
                pass
    finally:
        stop_process(proc)
    assert len(list((tmp_path / "in").glob("*"))) == 4
    assert log.read_text().count("Association Acknowledged") == 2


async def our_scp(events: list[str], in_store: asyncio.Event | None = None) -> tuple[da.AE, da.Server]:
    """Our SCP whose C-STORE handler takes 0.05 s; with ``in_store``, it sets the event
    and then holds the store (up to 10 s) so a test can act while it is under way."""
    ae = da.AE("POOLSCP", max_associations=50)
    ae.add_supported_context(da.Verification)
    ae.add_supported_context(CT)

    @ae.on_c_store
    async def store(request):  # type: ignore[no-untyped-def]
        if in_store is not None:
            in_store.set()
            await asyncio.sleep(10)
        await asyncio.sleep(0.05)
        return 0

    for event in ("accepted", "released", "aborted"):
        ae.on_association(event)(lambda assoc, event=event: events.append(event))
    return ae, await ae.start_server(HOST, 0)


async def test_peer_abort_while_idle_is_noticed_and_replaced() -> None:
    events: list[str] = []
    _ae, server = await our_scp(events)
    async with server, AssociationPool(scu(), health_check="echo") as pool:
        async with pool.acquire(HOST, server.port, "POOLSCP") as first:
            assert (await first.c_echo()).is_success
        for assoc in list(server.associations):
            assoc.abort("test: far side aborts")
        await until(lambda: first.is_closed)
        async with pool.acquire(HOST, server.port, "POOLSCP") as second:
            assert second is not first
            assert (await second.c_echo()).is_success
        assert pool.stats().opened == 2


async def test_max_size_bounds_concurrent_associations_per_peer() -> None:
    events: list[str] = []
    _ae, server = await our_scp(events)
    peak = 0
    async with server:
        pool = AssociationPool(scu(), max_size=2)

        async def job() -> None:
            nonlocal peak
            async with pool.acquire(HOST, server.port, "POOLSCP") as assoc:
                peak = max(peak, sum(1 for a in server.associations if not a.is_closed))
                assert (await assoc.c_store(instance())).is_success

        await asyncio.wait_for(asyncio.gather(*(job() for _ in range(10))), 30)
        stats = pool.stats()
        assert stats.opened == 2 and stats.reused == 8, stats
        assert peak <= 2
        # a different calling AE title is a different peer key
        async with pool.acquire(HOST, server.port, "POOLSCP", ae=scu("OTHERSCU")) as assoc:
            assert assoc.local_ae == "OTHERSCU"
        assert pool.stats().opened == 3
        await pool.close()
        await until(lambda: events.count("released") == 3)
    assert "aborted" not in events


async def test_idle_associations_expire_with_a_release() -> None:
    events: list[str] = []
    _ae, server = await our_scp(events)
    async with server:
        pool = AssociationPool(scu(), idle_timeout=0.2)
        async with pool.acquire(HOST, server.port, "POOLSCP") as assoc:
            await assoc.c_echo()
        assert pool.stats().idle == {(HOST, server.port, "POOLSCP", "POOLSCU"): 1}
        await until(lambda: events.count("released") == 1)
        assert pool.stats().expired == 1
        assert sum(pool.stats().idle.values()) == 0
        await pool.close()


async def test_an_association_left_with_an_error_is_not_reused() -> None:
    events: list[str] = []
    in_store = asyncio.Event()
    _ae, server = await our_scp(events, in_store)
    async with server, AssociationPool(scu()) as pool:
        task = None

        async def slow_store() -> None:
            async with pool.acquire(HOST, server.port, "POOLSCP") as assoc:
                await assoc.c_store(instance())

        task = asyncio.ensure_future(slow_store())
        await asyncio.wait_for(in_store.wait(), 10)  # the C-STORE is under way at the SCP
        task.cancel()  # mid C-STORE: the association's state is unknown
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: "aborted" in events)
        async with pool.acquire(HOST, server.port, "POOLSCP") as assoc:
            assert (await assoc.c_echo()).is_success
        assert pool.stats().opened == 2
