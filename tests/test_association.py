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
from dimse_async.dimse import Command, CommandField
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


async def test_hooks_registered_while_serving_fire_for_the_next_associations():
    """An association with no hook registered for an event skips the call; a hook
    registered while the server runs (the settings were made at its start) fires for
    the associations that follow, on both sides."""
    events = []
    ae = echo_scp()
    scu = echo_scu()
    async with await ae.start_server("127.0.0.1", 0) as server:
        async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
            assert (await assoc.c_echo()).is_success
        for _ in range(200):  # the server's side of it has ended too
            if not server.associations:
                break
            await asyncio.sleep(0.01)
        for side, who in (("scp", ae), ("scu", scu)):
            for name in ("requested", "accepted", "released"):
                who.on_association(name)(lambda assoc, name=name, side=side: events.append((side, name)))
        async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
            assert (await assoc.c_echo()).is_success
        for _ in range(200):
            if len(events) == 5:
                break
            await asyncio.sleep(0.01)
    assert sorted(events) == sorted(
        [("scp", "requested"), ("scp", "accepted"), ("scp", "released"), ("scu", "accepted"), ("scu", "released")]
    )


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


async def test_release_waiting_for_the_send_lock_survives_a_peer_abort():
    """release() judges the state only once it holds the send lock: an A-ABORT arriving
    while it waits ends the association instead of raising InvalidPrimitive."""
    # With its reading paused the server never sees the peer close after its A-ABORT:
    # its ARTIM (PS3.8 §9.1.5, state Sta13) ends the connection, shortened here.
    ae = echo_scp(abort_artim_timeout=0.5)
    async with await ae.start_server("127.0.0.1", 0) as server:
        assoc = await echo_scu().associate("127.0.0.1", server.port, "SCP")
        (server_assoc,) = server.associations
        # A message being sent holds the send lock: 64 MiB to a peer that stopped reading.
        server_assoc.pause_reading("test")
        context = assoc.context_for(Verification)
        sending = asyncio.ensure_future(
            assoc.send(
                context.id,
                Command(CommandField.C_ECHO_RQ, message_id=9, affected_sop_class_uid=Verification),
                bytes(64 << 20),
            )
        )
        for _ in range(500):
            if assoc.transport.get_write_buffer_size() > 0 and not sending.done():
                break
            await asyncio.sleep(0.01)
        assert not sending.done(), "the message went out at once: the send lock was never held"
        releasing = asyncio.ensure_future(assoc.release())
        for _ in range(10):
            await asyncio.sleep(0)
        assert not releasing.done()  # waiting for the send lock
        server_assoc.abort("test: abort while the peer waits to release")
        await asyncio.wait_for(assoc.wait_closed(), 5)
        await asyncio.wait_for(releasing, 5)  # returns; no InvalidPrimitive
        with pytest.raises(AssociationAborted):
            await sending
        assert assoc.is_closed and "aborted by peer" in (assoc.end_reason or "")


async def test_held_back_requests_are_answered_before_the_release_response():
    """A peer exceeding the window then asking to release gets every response first."""
    from rawpeer import RawPeer, echo_rq, rq_bytes

    from dimse_async.dimse import decode_command
    from dimse_async.pdu import ReleaseRQ

    ae = AE("ARCHIVE", max_ops_performed=1)
    ae.add_supported_context(Verification)

    @ae.on_c_echo
    async def slow(request):
        await asyncio.sleep(0.1)

    async with await ae.start_server("127.0.0.1", 0) as server:
        peer = await RawPeer.connect(server.port)
        try:
            await peer.associate(rq_bytes(called="ARCHIVE"))  # proposes no window: one at a time
            await peer.send(echo_rq(1) + echo_rq(2) + echo_rq(3) + ReleaseRQ().encode())
            answered, pdu_types = [], []
            while True:
                pdu = await peer.read_pdu(10)
                assert pdu is not None, f"closed after {pdu_types}"
                pdu_types.append(pdu[0])
                if pdu[0] == 0x04:
                    body = pdu[6:]
                    answered.append(decode_command(body[6:]).message_id_being_responded_to)
                if pdu[0] == 0x06:
                    break
            assert answered == [1, 2, 3] and pdu_types == [0x04, 0x04, 0x04, 0x06]
        finally:
            await peer.close()


async def test_max_associations_holds_while_an_authenticator_awaits():
    """The place is taken when the request is judged, so a slow user-identity check
    cannot let a second association in past ``max_associations``."""
    from dimse_async.pdu import UserIdentityRQ

    ae = echo_scp(max_associations=1)
    entered, gate = asyncio.Event(), asyncio.Event()

    @ae.on_user_identity
    async def check(identity, assoc):
        entered.set()
        await gate.wait()
        return True, None

    identity = UserIdentityRQ(1, b"user")
    async with await ae.start_server("127.0.0.1", 0) as server:
        first = asyncio.ensure_future(echo_scu().associate("127.0.0.1", server.port, "SCP", identity=identity))
        await asyncio.wait_for(entered.wait(), 5)
        second = asyncio.ensure_future(echo_scu().associate("127.0.0.1", server.port, "SCP", identity=identity))
        done, _ = await asyncio.wait([second], timeout=2)
        gate.set()
        assoc = await asyncio.wait_for(first, 5)
        try:
            assert done, "the second association was not judged while the first was being authenticated"
            with pytest.raises(AssociationRejected) as rejected:
                second.result()
            assert (rejected.value.result, rejected.value.source, rejected.value.reason) == (2, 3, 2)
        finally:
            await assoc.release()
            if not second.done():
                second.cancel()


async def test_repeated_requests_are_answered_from_the_negotiation_cache_and_each_gets_its_own():
    """The same RQ again is answered from the server's cache; another calling AE, other
    contexts, and a context added to the AE meanwhile each get their own answer."""
    CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
    ae = echo_scp()
    async with await ae.start_server("127.0.0.1", 0) as server:

        async def accepted(calling: str, *contexts: str) -> tuple[str, list[tuple[str, str]]]:
            scu = AE(calling)
            for uid in contexts:
                scu.add_requested_context(uid)
            async with scu.associate("127.0.0.1", server.port, "SCP") as assoc:
                assert assoc.negotiated is not None
                result = [(c.abstract_syntax, c.transfer_syntax) for c in assoc.negotiated.accepted]
                if assoc.negotiated.accepted and Verification in contexts:
                    assert (await assoc.c_echo()).is_success
                return assoc.peer_ae, result

        first = await accepted("SCU", Verification)
        assert await accepted("SCU", Verification) == first
        assert server.negotiations.hits == 1
        assert (await accepted("OTHER", Verification))[1] == first[1]
        assert [p for p, _ in [await accepted("SCU", Verification, CT_IMAGE)][0][1]] == [Verification]
        ae.add_supported_context(CT_IMAGE)  # settings changed while serving
        _, both = await accepted("SCU", Verification, CT_IMAGE)
        assert [p for p, _ in both] == [Verification, CT_IMAGE]
        assert server.negotiations.misses == 4 and server.negotiations.hits == 1


def _nodelay(assoc) -> int:
    sock = assoc.transport.get_extra_info("socket")
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


async def _nodelay_everywhere() -> list[tuple[str, int, int]]:
    from dimse_async import proxy

    seen: list[tuple[str, int, int]] = []
    for proxied in (False, True):
        ae = echo_scp()
        accepted = []
        ae.on_association("accepted")(accepted.append)
        async with await ae.start_server("127.0.0.1", 0, proxy_protocol=proxied) as server:
            header = proxy.encode_v2(("192.0.2.7", 4242), ("127.0.0.1", server.port)) if proxied else None
            async with echo_scu().associate("127.0.0.1", server.port, "SCP", proxy_header=header) as assoc:
                assert (await assoc.c_echo()).is_success
                seen.append(("proxied" if proxied else "plain", _nodelay(assoc), _nodelay(accepted[0])))
    return seen


def test_tcp_nodelay_on_both_sides_with_asyncio_and_uvloop():
    """Small PDUs are never held back by Nagle's algorithm: the event loop sets TCP_NODELAY
    on the transports it makes, we set it on the sockets we make (acceptor, PROXY header)."""
    for run in (asyncio.run, uvloop.run):
        assert run(_nodelay_everywhere()) == [("plain", 1, 1), ("proxied", 1, 1)], run
