"""Timers as inputs of the sans-I/O upper layer: ARTIM (PS3.8 §9.1.5, Table 9-10
AA-2 on expiry), the shorter ARTIM after our own A-ABORT, the PDU progress timeout
and the read budget after an A-ABORT. Time is driven explicitly (``now=``): no
sleeps, no event loop."""

from __future__ import annotations

import struct

from test_fsm import PDATA_BYTES, RQ_BYTES, make_ac

from dimse_async.fsm import (
    CloseTransport,
    ProviderAbort,
    Send,
    State,
    StopReading,
    TimerExpired,
    UpperLayer,
)

ABORT_PDU_TYPE = 0x07


def acceptor(now: float = 100.0, **kw: float | int | None) -> UpperLayer:
    """An acceptor in Sta6 at ``now``."""
    m = UpperLayer(requestor=False, max_pdu_receive=16384, artim_timeout=30.0, **kw)  # type: ignore[arg-type]
    m.connection_made(now=now)
    m.receive_data(RQ_BYTES, now=now)
    m.accept(make_ac(), now=now)
    assert m.state is State.Sta6
    return m


def test_artim_runs_from_the_connection_until_the_associate_rq() -> None:
    m = UpperLayer(requestor=False, max_pdu_receive=16384, artim_timeout=30.0)
    assert m.get_timer() is None
    m.connection_made(now=100.0)  # AE-5: start ARTIM
    assert m.state is State.Sta2 and m.get_timer() == 130.0
    assert m.handle_timer(129.9) == []  # early: nothing
    m.receive_data(RQ_BYTES, now=110.0)  # AE-6: stop ARTIM
    assert m.state is State.Sta3 and m.get_timer() is None
    assert m.handle_timer(1000.0) == []  # stale: nothing


def test_artim_expiry_in_sta2_closes_the_transport() -> None:
    m = UpperLayer(requestor=False, max_pdu_receive=16384, artim_timeout=30.0)
    m.connection_made(now=100.0)
    out = m.handle_timer(130.0)
    assert out == [TimerExpired("ARTIM", "ARTIM timer expired in Sta2"), CloseTransport(discard=True)]  # AA-2
    assert m.state is State.Sta1 and m.get_timer() is None
    assert m.handle_timer(200.0) == []


def test_after_a_release_response_artim_uses_the_full_value() -> None:
    m = acceptor()
    m.receive_data(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00", now=200.0)  # A-RELEASE-RQ: AR-2
    m.release_response(now=201.0)  # AR-4: A-RELEASE-RP, start ARTIM
    assert m.state is State.Sta13 and m.get_timer() == 231.0


def test_after_our_abort_artim_is_short_and_expiry_closes() -> None:
    m = acceptor(abort_artim_timeout=5.0)
    out = m.abort("local reason", now=200.0)  # AA-1
    assert isinstance(out[0], Send) and out[0].data[0] == ABORT_PDU_TYPE
    assert m.state is State.Sta13 and m.get_timer() == 205.0
    assert m.handle_timer(204.0) == []
    out = m.handle_timer(205.0)
    assert out[0] == TimerExpired("ARTIM", "ARTIM timer expired in Sta13")
    assert out[-1] == CloseTransport(discard=True) and m.state is State.Sta1


def test_abort_artim_never_exceeds_artim() -> None:
    m = acceptor(abort_artim_timeout=60.0)
    m.abort(now=200.0)
    assert m.get_timer() == 230.0


def test_pdu_progress_timeout_aborts_a_dripping_pdu() -> None:
    m = acceptor(pdu_timeout=10.0)
    assert m.get_timer() is None
    m.receive_data(PDATA_BYTES[:3], now=200.0)  # a PDU starts
    assert m.get_timer() == 210.0
    m.receive_data(PDATA_BYTES[3:5], now=209.0)  # one more byte: no new time
    assert m.get_timer() == 210.0
    out = m.handle_timer(210.0)
    assert out[0] == TimerExpired("PDU progress", "PDU not completed within 10 s (5 bytes received)")
    assert isinstance(out[1], Send) and out[1].data[0] == ABORT_PDU_TYPE  # AA-8
    assert any(isinstance(o, ProviderAbort) for o in out)
    assert m.state is State.Sta13 and m.get_timer() == 215.0  # the short ARTIM closes


def test_a_completed_pdu_restarts_the_progress_timer() -> None:
    m = acceptor(pdu_timeout=10.0)
    m.receive_data(PDATA_BYTES[:3], now=200.0)
    out = m.receive_data(PDATA_BYTES[3:] + PDATA_BYTES[:3], now=208.0)  # one whole, the next begun
    assert len(out) == 1 and m.get_timer() == 218.0
    m.receive_data(PDATA_BYTES[3:], now=209.0)  # complete: nothing pending
    assert m.get_timer() is None and m.state is State.Sta6


def test_no_progress_timeout_while_we_do_not_read() -> None:
    m = acceptor(pdu_timeout=10.0)
    m.receive_data(PDATA_BYTES[:3], now=200.0)
    m.reading_paused = True  # backpressure: the adapter stopped reading
    assert m.handle_timer(210.0) == []
    assert m.state is State.Sta6 and m.get_timer() == 220.0
    m.reading_paused = False
    assert m.handle_timer(220.0)[0].timer == "PDU progress"  # type: ignore[union-attr]


def test_progress_timeout_in_sta2_ends_as_artim_would() -> None:
    m = UpperLayer(requestor=False, max_pdu_receive=16384, artim_timeout=30.0, pdu_timeout=5.0)
    m.connection_made(now=100.0)
    m.receive_data(RQ_BYTES[:10], now=101.0)
    assert m.get_timer() == 106.0
    out = m.handle_timer(106.0)
    assert out[0].timer == "PDU progress"  # type: ignore[union-attr]
    assert out[-1] == CloseTransport(discard=True) and m.state is State.Sta1


def test_after_our_abort_reading_stops_once_past_the_budget() -> None:
    m = acceptor(after_abort_read=1000)
    header = struct.pack(">BBI", 0x04, 0, 64 << 20)  # a P-DATA claiming 64 MiB: over our limit
    out = m.receive_data(header, now=200.0)
    assert any(isinstance(o, Send) and o.data[0] == ABORT_PDU_TYPE for o in out)
    assert m.state is State.Sta13
    assert m.receive_data(bytes(600), now=200.1) == []
    assert m.receive_data(bytes(600), now=200.2) == [StopReading()]  # past 1000 bytes, once
    assert m.receive_data(bytes(600), now=200.3) == []
    assert m.get_timer() == 205.0  # then ARTIM closes
