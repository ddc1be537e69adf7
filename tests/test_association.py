"""The asyncio layer: lifecycle, hooks, timeouts, release collision, uvloop, server limits."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop
from conftest import free_port

from dimse_async import (
    AE,
    AssociationAborted,
    AssociationRejected,
    AssociationTimeout,
    ConnectionFailed,
    NoAcceptedContext,
    Verification,
)
from dimse_async.fsm import State


def echo_scp(**kw) -> AE:
    ae = AE("SCP", **kw)
    ae.add_supported_context(Verification)
    return ae


def echo_scu(**kw) -> AE:
    ae = AE("SCU", **kw)
    ae.add_requested_context(Verification)
    return ae


async def test_hooks_fire_in_order():
    events = []
    ae = echo_scp()
    for name in ("requested", "accepted", "rejected", "released", "aborted"):
        ae.on_association(name)(lambda assoc, name=name: events.append((name, assoc.peer_ae)))

    async with await ae.start_server("127.0.0.1", 0) as server:
        async with echo_scu().associate("127.0.0.1", server.port, "SCP") as assoc:
            assert (await assoc.c_echo()).is_success
        with pytest.raises(AssociationRejected):
            await echo_scu().associate("127.0.0.1", server.port, "NOT_ME")
        assoc = await echo_scu().associate("127.0.0.1", server.port, "SCP")
        assoc.abort()
        for _ in range(100):
            if len(events) == 8:
                break
            await asyncio.sleep(0.01)
    assert [e[0] for e in events] == [
        "requested",
        "accepted",
        "released",
        "requested",
        "rejected",
        "requested",
        "accepted",
        "aborted",
    ]
    assert {peer for _, peer in events} == {"SCU"}


async def test_unknown_hook_event_is_an_error():
    with pytest.raises(ValueError, match="unknown association event"):
        AE("X").on_association("opened")


async def test_connect_refused_and_timeout():
    with pytest.raises(ConnectionFailed, match="cannot connect"):
        await echo_scu().associate("127.0.0.1", free_port(), "SCP")


async def test_acse_timeout_when_peer_never_answers():
    """A TCP listener that never sends an A-ASSOCIATE-AC: we abort and say why."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(AssociationTimeout, match="A-ASSOCIATE"):
            await echo_scu(acse_timeout=0.3).associate("127.0.0.1", port, "SCP")
    finally:
        listener.close()


async def test_dimse_timeout_aborts_only_that_association():
    ae = echo_scp()
    hang = asyncio.Event()

    @ae.on_c_echo
    async def slow(request):
        await hang.wait()

    async with await ae.start_server("127.0.0.1", 0) as server:
        other = await echo_scu().associate("127.0.0.1", server.port, "SCP")
        assoc = await echo_scu(dimse_timeout=0.3).associate("127.0.0.1", server.port, "SCP")
        with pytest.raises(AssociationTimeout, match="C-ECHO-RQ"):
            await assoc.c_echo()
        await asyncio.wait_for(assoc.wait_closed(), 5)
        assert "C-ECHO-RQ" in assoc.end_reason
        hang.set()
        assert (await other.c_echo()).is_success
        await other.release()


async def test_no_accepted_context_is_a_clear_error():
    ae = echo_scp()
    async with await ae.start_server("127.0.0.1", 0) as server:
        scu = AE("SCU")
        scu.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
            assert assoc.accepted_contexts == []
            assert assoc.rejected_contexts[0].result == 3
            with pytest.raises(NoAcceptedContext, match="Verification"):
                await assoc.c_echo()


async def test_release_collision_both_sides():
    """Both sides request release at once (PS3.8 §9.2, Sta9..Sta12): both end cleanly."""
    ae = echo_scp()
    server_side = []
    ae.on_association("accepted")(server_side.append)
    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await echo_scu().associate("127.0.0.1", server.port, "SCP")
        for _ in range(100):
            if server_side:
                break
            await asyncio.sleep(0.01)
        (acceptor,) = server_side
        await asyncio.wait_for(asyncio.gather(assoc.release(), acceptor.release()), 5)
        await asyncio.wait_for(asyncio.gather(assoc.wait_closed(), acceptor.wait_closed()), 5)
        states = [s for (s, _e, _a) in assoc.fsm.history] + [s for (s, _e, _a) in acceptor.fsm.history]
    assert assoc.fsm.state is State.Sta1 and acceptor.fsm.state is State.Sta1
    assert assoc.end_reason is None and acceptor.end_reason is None
    assert State.Sta9 in states or State.Sta10 in states  # the collision really happened


async def test_peer_abort_fails_pending_requests():
    ae = echo_scp()

    @ae.on_c_echo
    async def abort_instead(request):
        request.assoc.abort("no thanks")

    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await echo_scu().associate("127.0.0.1", server.port, "SCP")
        with pytest.raises(AssociationAborted, match="A-ABORT"):
            await assoc.c_echo()
        assert not assoc.is_established


async def test_max_associations_rejects_transient():
    ae = echo_scp(max_associations=1)
    async with await ae.start_server("127.0.0.1", 0) as server:
        first = await echo_scu().associate("127.0.0.1", server.port, "SCP")
        with pytest.raises(AssociationRejected) as err:
            await echo_scu().associate("127.0.0.1", server.port, "SCP")
        assert (err.value.result, err.value.source, err.value.reason) == (2, 3, 2)
        await first.release()
        async with echo_scu().associate("127.0.0.1", server.port, "SCP") as again:
            assert (await again.c_echo()).is_success


async def test_server_close_aborts_after_grace():
    ae = echo_scp()
    server = await ae.start_server("127.0.0.1", 0)
    assoc = await echo_scu().associate("127.0.0.1", server.port, "SCP")
    server.close()
    await asyncio.wait_for(server.wait_closed(grace=0.2), 5)
    await asyncio.wait_for(assoc.wait_closed(), 5)
    assert "server shutting down" in (assoc.end_reason or "") or "A-ABORT" in (assoc.end_reason or "")


def test_works_on_uvloop():
    async def main():
        loop = asyncio.get_running_loop()
        assert isinstance(loop, uvloop.Loop)
        async with await echo_scp().start_server("127.0.0.1", 0) as server:
            async with echo_scu().associate("127.0.0.1", server.port, "SCP") as assoc:
                return [await assoc.c_echo() for _ in range(3)]

    assert all(s.is_success for s in uvloop.run(main()))


async def test_many_concurrent_associations():
    """200 associations at once on one loop, each echoing."""
    ae = echo_scp()
    async with await ae.start_server("127.0.0.1", 0) as server:
        scu = echo_scu()

        async def one():
            async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
                return await assoc.c_echo()

        results = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(200))), 60)
    assert len(results) == 200 and all(s.is_success for s in results)
