"""The DICOM Upper Layer state machine against PS3.8 §9.2 (Tables 9-6 … 9-10).

Three layers of checks:

* ``TRANSITIONS`` is compared, cell by cell, with an independent transcription of
  Table 9-10 written out below as the standard prints it (13 states x 19 events).
* Every non-blank cell is *driven*: an :class:`UpperLayer` is walked into the state
  through its public API (real encoded PDU bytes through ``receive_data``), the
  event is applied, and the action taken, the next state, the ARTIM timer and the
  exact outputs are checked against a model of Tables 9-6 … 9-9 written here.
* Every blank cell is shown to be refused: local primitives raise
  :class:`InvalidPrimitive`, peer/transport events that cannot occur are ignored.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from dimse_async.fsm import (
    TRANSITIONS,
    Action,
    AssociateAccepted,
    AssociateIndication,
    AssociateRejected,
    CloseTransport,
    ConnectTransport,
    Event,
    InvalidPrimitive,
    PDataIndication,
    PeerAbort,
    ProviderAbort,
    Refused,
    ReleaseConfirm,
    ReleaseIndication,
    Send,
    StartARTIM,
    State,
    StopARTIM,
    UpperLayer,
)
from dimse_async.pdu import (
    MAX_CONTROL_PDU,
    PDV,
    Abort,
    AbortReason,
    AssociateAC,
    AssociateRJ,
    AssociateRQ,
    PDataTF,
    PresentationContextAC,
    PresentationContextRQ,
    ReleaseRP,
    ReleaseRQ,
    UserInformation,
)

S, E = State, Event

# ---------------------------------------------------------------------------
# PS3.8 Table 9-10, transcribed independently of dimse_async.fsm. "." = blank.
# ---------------------------------------------------------------------------

TABLE_9_10 = """
        Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10 Sta11 Sta12 Sta13
Evt1    AE-1  .     .     .     .     .     .     .     .     .     .     .     .
Evt2    .     .     .     AE-2  .     .     .     .     .     .     .     .     .
Evt3    .     AA-1  AA-8  .     AE-3  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt4    .     AA-1  AA-8  .     AE-4  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt5    AE-5  .     .     .     .     .     .     .     .     .     .     .     .
Evt6    .     AE-6  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
Evt7    .     .     AE-7  .     .     .     .     .     .     .     .     .     .
Evt8    .     .     AE-8  .     .     .     .     .     .     .     .     .     .
Evt9    .     .     .     .     .     DT-1  .     AR-7  .     .     .     .     .
Evt10   .     AA-1  AA-8  .     AA-8  DT-2  AR-6  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt11   .     .     .     .     .     AR-1  .     .     .     .     .     .     .
Evt12   .     AA-1  AA-8  .     AA-8  AR-2  AR-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt13   .     AA-1  AA-8  .     AA-8  AA-8  AR-3  AA-8  AA-8  AR-10 AR-3  AA-8  AA-6
Evt14   .     .     .     .     .     .     .     AR-4  AR-9  .     .     AR-4  .
Evt15   .     .     AA-1  AA-2  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  .
Evt16   .     AA-2  AA-3  .     AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-2
Evt17   .     AA-5  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AR-5
Evt18   .     AA-2  .     .     .     .     .     .     .     .     .     .     AA-2
Evt19   .     AA-1  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
"""

#: Tables 9-6 … 9-9, in the standard's order.
STANDARD_ACTIONS = (
    [f"AE-{n}" for n in range(1, 9)]
    + [f"DT-{n}" for n in range(1, 3)]
    + [f"AR-{n}" for n in range(1, 11)]
    + [f"AA-{n}" for n in range(1, 9)]
)


def _parse_table(text: str) -> dict[tuple[str, str], str]:
    lines = [line.split() for line in text.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header == [f"Sta{n}" for n in range(1, 14)]
    assert [row[0] for row in rows] == [f"Evt{n}" for n in range(1, 20)]
    cells = {}
    for event, *actions in rows:
        assert len(actions) == 13, event
        for state, action in zip(header, actions):
            if action != ".":
                assert action in STANDARD_ACTIONS, action
                cells[(state, event)] = action
    return cells


STANDARD = _parse_table(TABLE_9_10)
ALL_CELLS = [(s, e) for e in Event for s in State]
VALID_CELLS = [(s, e) for s, e in ALL_CELLS if (s.name, e.name) in STANDARD]
BLANK_CELLS = [(s, e) for s, e in ALL_CELLS if (s.name, e.name) not in STANDARD]


def std(state: State, event: Event) -> str | None:
    return STANDARD.get((state.name, event.name))


def action_name(action: Action) -> str:
    """``Action.AR_10`` -> ``"AR-10"``; an Enum alias reports its canonical name."""
    return action.name.replace("_", "-")


def last(m: UpperLayer) -> tuple[State, Event, str]:
    state, event, action = m.history[-1]
    return state, event, action_name(action)


# ---------------------------------------------------------------------------
# PDUs, encoded with the PDU classes; A-ABORT / -RJ / -RELEASE bytes spelled out
# by hand (PS3.8 Tables 9-21, 9-24, 9-25, 9-26) so the outputs are checked
# against the wire format rather than against the same encoder.
# ---------------------------------------------------------------------------

MAX_PDU = 16384
TS_IMPLICIT = "1.2.840.10008.1.2"
VERIFICATION = "1.2.840.10008.1.1"
IMPL_UID = "1.2.826.0.1.3680043.9.3811.1"


def make_rq(protocol_version: int = 1) -> AssociateRQ:
    return AssociateRQ(
        "ANY-SCP",
        "ECHOSCU",
        [PresentationContextRQ(1, VERIFICATION, [TS_IMPLICIT])],
        UserInformation(max_length=MAX_PDU, implementation_class_uid=IMPL_UID),
        protocol_version=protocol_version,
    )


def make_ac() -> AssociateAC:
    return AssociateAC(
        "ANY-SCP",
        "ECHOSCU",
        [PresentationContextAC(1, 0, TS_IMPLICIT)],
        UserInformation(max_length=MAX_PDU, implementation_class_uid=IMPL_UID),
    )


def raw_pdu(pdu_type: int, body: bytes) -> bytes:
    return bytes((pdu_type, 0)) + struct.pack(">I", len(body)) + body


def abort_pdu(source: int, reason: int) -> bytes:
    return raw_pdu(0x07, bytes((0, 0, source, reason)))


RJ = AssociateRJ(1, 1, 1)  # rejected-permanent, service-user, no-reason-given
PDATA = PDataTF([PDV(1, True, True, b"\x00\x00\x02\x00command")])
PDATA_OUT = PDataTF([PDV(1, False, True, b"outgoing dataset")]).encode()

RQ_BYTES = make_rq().encode()
AC_BYTES = make_ac().encode()
RJ_BYTES = RJ.encode()
PDATA_BYTES = PDATA.encode()
RELEASE_RQ_BYTES = ReleaseRQ().encode()
RELEASE_RP_BYTES = ReleaseRP().encode()
ABORT_BYTES = Abort(0, 0).encode()
UNRECOGNIZED_BYTES = raw_pdu(0x09, bytes(4))  # there is no PDU type 09H


def test_encoders_match_the_wire_format() -> None:
    """The hand-written bytes above and the PDU classes agree."""
    assert ABORT_BYTES == b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert Abort(2, 2).encode() == abort_pdu(2, 2)
    assert raw_pdu(0x05, bytes(4)) == ReleaseRQ().encode()
    assert raw_pdu(0x06, bytes(4)) == ReleaseRP().encode()
    assert raw_pdu(0x03, bytes((0, 1, 1, 1))) == AssociateRJ(1, 1, 1).encode()
    assert RQ_BYTES[0] == 0x01 and AC_BYTES[0] == 0x02 and PDATA_BYTES[0] == 0x04


# ---------------------------------------------------------------------------
# Driving a machine into a state
# ---------------------------------------------------------------------------

Step = Callable[[UpperLayer], list]


def recv(data: bytes) -> Step:
    return lambda m: m.receive_data(data)


def connect(m: UpperLayer) -> list:
    return m.connection_made()


def associate(m: UpperLayer) -> list:
    return m.associate(make_rq())


def accept(m: UpperLayer) -> list:
    return m.accept(make_ac())


def release(m: UpperLayer) -> list:
    return m.release()


def release_response(m: UpperLayer) -> list:
    return m.release_response()


#: state -> (previous state, action taken to get here, step)
ROUTES: dict[str, dict[State, tuple[State, str, Step]]] = {
    "acceptor": {
        S.Sta2: (S.Sta1, "AE-5", connect),
        S.Sta3: (S.Sta2, "AE-6", recv(RQ_BYTES)),
        S.Sta6: (S.Sta3, "AE-7", accept),
        S.Sta7: (S.Sta6, "AR-1", release),
        S.Sta8: (S.Sta6, "AR-2", recv(RELEASE_RQ_BYTES)),
        S.Sta10: (S.Sta7, "AR-8", recv(RELEASE_RQ_BYTES)),
        S.Sta12: (S.Sta10, "AR-10", recv(RELEASE_RP_BYTES)),
        S.Sta13: (S.Sta8, "AR-4", release_response),
    },
    "requestor": {
        S.Sta4: (S.Sta1, "AE-1", associate),
        S.Sta5: (S.Sta4, "AE-2", connect),
        S.Sta6: (S.Sta5, "AE-3", recv(AC_BYTES)),
        S.Sta7: (S.Sta6, "AR-1", release),
        S.Sta8: (S.Sta6, "AR-2", recv(RELEASE_RQ_BYTES)),
        S.Sta9: (S.Sta7, "AR-8", recv(RELEASE_RQ_BYTES)),
        S.Sta11: (S.Sta9, "AR-9", release_response),
        S.Sta13: (S.Sta8, "AR-4", release_response),
    },
}

#: Which roles can be in each state; the first is the one used by default.
ROLES: dict[State, tuple[str, ...]] = {
    S.Sta1: ("acceptor", "requestor"),
    S.Sta2: ("acceptor",),
    S.Sta3: ("acceptor",),
    S.Sta4: ("requestor",),
    S.Sta5: ("requestor",),
    S.Sta6: ("acceptor", "requestor"),
    S.Sta7: ("requestor", "acceptor"),
    S.Sta8: ("acceptor", "requestor"),
    S.Sta9: ("requestor",),
    S.Sta10: ("acceptor",),
    S.Sta11: ("requestor",),
    S.Sta12: ("acceptor",),
    S.Sta13: ("acceptor", "requestor"),
}

#: On the routes above the ARTIM timer runs exactly in these states.
ARTIM_STATES = {S.Sta2, S.Sta13}


def route(state: State, role: str) -> list[tuple[State, str, Step]]:
    steps = []
    while state is not S.Sta1:
        prev, action, step = ROUTES[role][state]
        steps.append((state, action, step))
        state = prev
    return steps[::-1]


def new_machine(role: str) -> UpperLayer:
    return UpperLayer(requestor=role == "requestor", max_pdu_receive=MAX_PDU)


def reach(state: State, role: str | None = None) -> UpperLayer:
    role = role or ROLES[state][0]
    m = new_machine(role)
    for target, action, step in route(state, role):
        before = m.state
        step(m)
        assert last(m)[0] is before and last(m)[2] == action
        assert m.state is target
    assert m.artim_running == (state in ARTIM_STATES)
    return m


def role_for(state: State, event: Event) -> str:
    roles = ROLES[state]
    if event in (E.Evt1, E.Evt2) and "requestor" in roles:
        return "requestor"  # only the requestor asks for a transport connection
    if event is E.Evt5 and "acceptor" in roles:
        return "acceptor"
    return roles[0]


@pytest.mark.parametrize(
    ("role", "state"),
    [pytest.param(role, state, id=f"{role}-{state.name}") for role in ROUTES for state in ROUTES[role]],
)
def test_reach(role: str, state: State) -> None:
    m = reach(state, role)
    assert m.state is state
    assert [action_name(a) for _, _, a in m.history] == [a for _, a, _ in route(state, role)]


#: How each event is produced through the public API.
FIRE: dict[Event, Step] = {
    E.Evt1: associate,
    E.Evt2: connect,
    E.Evt3: recv(AC_BYTES),
    E.Evt4: recv(RJ_BYTES),
    E.Evt5: connect,
    E.Evt6: recv(RQ_BYTES),
    E.Evt7: accept,
    E.Evt8: lambda m: m.reject(RJ),
    E.Evt9: lambda m: m.send_pdata(PDATA_OUT),
    E.Evt10: recv(PDATA_BYTES),
    E.Evt11: release,
    E.Evt12: recv(RELEASE_RQ_BYTES),
    E.Evt13: recv(RELEASE_RP_BYTES),
    E.Evt14: release_response,
    E.Evt15: lambda m: m.abort(),
    E.Evt16: recv(ABORT_BYTES),
    E.Evt17: lambda m: m.connection_lost(),
    E.Evt18: lambda m: m.artim_expired(),
    E.Evt19: recv(UNRECOGNIZED_BYTES),
}

PDU_EVENTS = {E.Evt3, E.Evt4, E.Evt6, E.Evt10, E.Evt12, E.Evt13, E.Evt16, E.Evt19}
LOCAL_PRIMITIVES = {E.Evt1, E.Evt7, E.Evt8, E.Evt9, E.Evt11, E.Evt14, E.Evt15}


# ---------------------------------------------------------------------------
# A model of the actions (Tables 9-6 … 9-9) for the stimuli in FIRE
# ---------------------------------------------------------------------------


def check_outputs(got: list, want: list) -> None:
    """``want`` holds output instances (compared with ==) or classes (type only)."""
    assert len(got) == len(want), f"{got!r} != {want!r}"
    for g, w in zip(got, want):
        if isinstance(w, type):
            assert type(g) is w, f"{g!r} is not a {w.__name__}"
            if w is ProviderAbort:
                assert g.reason
        else:
            assert g == w


def model(state: State, event: Event, action: str, role: str) -> tuple[State, list, bool]:
    """(next state, outputs, ARTIM running afterwards) for ``action`` in ``state``."""
    artim = state in ARTIM_STATES
    stop = [StopARTIM()] if artim else []
    # Provider-source A-ABORT reason: 1 unrecognized-PDU for our Evt19 bytes,
    # 2 unexpected-PDU for a well-formed PDU arriving in the wrong state.
    reason = 1 if event is E.Evt19 else 2
    cases: dict[str, tuple[State, list, bool]] = {
        "AE-1": (S.Sta4, [ConnectTransport()], artim),
        "AE-2": (S.Sta5, [Send(RQ_BYTES)], artim),
        "AE-3": (S.Sta6, [AssociateAccepted(make_ac())], artim),
        "AE-4": (S.Sta1, [AssociateRejected(RJ), CloseTransport()], artim),
        "AE-5": (S.Sta2, [StartARTIM()], True),
        "AE-6": (S.Sta3, [StopARTIM(), AssociateIndication(make_rq())], False),
        "AE-7": (S.Sta6, [Send(AC_BYTES)], artim),
        "AE-8": (S.Sta13, [Send(RJ_BYTES), StartARTIM()], True),
        "DT-1": (S.Sta6, [Send(PDATA_OUT)], artim),
        "DT-2": (S.Sta6, [PDataIndication(PDATA)], artim),
        "AR-1": (S.Sta7, [Send(raw_pdu(0x05, bytes(4)))], artim),
        "AR-2": (S.Sta8, [ReleaseIndication(collision=False)], artim),
        "AR-3": (S.Sta1, [ReleaseConfirm(), CloseTransport()], artim),
        "AR-4": (S.Sta13, [Send(raw_pdu(0x06, bytes(4))), StartARTIM()], True),
        "AR-5": (S.Sta1, [StopARTIM()], False),
        "AR-6": (S.Sta7, [PDataIndication(PDATA)], artim),
        "AR-7": (S.Sta8, [Send(PDATA_OUT)], artim),
        "AR-8": (S.Sta9 if role == "requestor" else S.Sta10, [ReleaseIndication(collision=True)], artim),
        "AR-9": (S.Sta11, [Send(raw_pdu(0x06, bytes(4)))], artim),
        "AR-10": (S.Sta12, [ReleaseConfirm()], artim),
        # AA-1 for the local user's A-ABORT (Evt15) has service-user source; in Sta2
        # there is no user yet and the provider answers the stray PDU itself.
        "AA-1": (
            S.Sta13,
            [
                Send(abort_pdu(0, 0) if event is E.Evt15 else abort_pdu(2, reason)),
                *stop,
                StartARTIM(),
                *([Refused] if state is S.Sta2 else []),  # no user to tell: for the log
            ],
            True,
        ),
        "AA-2": (S.Sta1, [*(stop if event is not E.Evt18 else []), CloseTransport(discard=True)], False),
        "AA-3": (S.Sta1, [PeerAbort(0, 0), CloseTransport(discard=True)], artim),
        "AA-4": (S.Sta1, [ProviderAbort], artim),
        "AA-5": (S.Sta1, [StopARTIM()], False),
        "AA-6": (S.Sta13, [], artim),
        "AA-7": (S.Sta13, [Send(abort_pdu(2, reason))], artim),
        "AA-8": (S.Sta13, [Send(abort_pdu(2, reason)), ProviderAbort, *stop, StartARTIM()], True),
    }
    assert set(cases) == set(STANDARD_ACTIONS)
    return cases[action]


# ---------------------------------------------------------------------------
# 1. The table itself
# ---------------------------------------------------------------------------


def test_states_events_and_actions_are_the_standards() -> None:
    assert [s.name for s in State] == [f"Sta{n}" for n in range(1, 14)]
    assert [e.name for e in Event] == [f"Evt{n}" for n in range(1, 20)]
    # Iterating an Enum skips aliases: every action must be its own member.
    assert [action_name(a) for a in Action] == STANDARD_ACTIONS
    for name in STANDARD_ACTIONS:
        assert action_name(Action[name.replace("-", "_")]) == name


@pytest.mark.parametrize(
    ("state", "event"),
    [pytest.param(s, e, id=f"{s.name}-{e.name}-{std(s, e) or 'blank'}") for s, e in ALL_CELLS],
)
def test_table_cell_matches_standard(state: State, event: Event) -> None:
    got = TRANSITIONS.get((state, event))
    assert (action_name(got) if got is not None else None) == std(state, event)


def test_table_has_nothing_else() -> None:
    assert set(TRANSITIONS) == set(VALID_CELLS)
    assert len(TRANSITIONS) == len(STANDARD) == 123


# ---------------------------------------------------------------------------
# 2. Every valid cell, driven through the public API
# ---------------------------------------------------------------------------


def _cell_params() -> list:
    params = []
    for s, e in VALID_CELLS:
        role = role_for(s, e)
        params.append(pytest.param(s, e, role, id=f"{s.name}-{e.name}-{std(s, e)}"))
        for other in ROLES[s]:
            if other != role and s is not S.Sta1:
                params.append(pytest.param(s, e, other, id=f"{s.name}-{e.name}-{std(s, e)}-{other}"))
    return params


@pytest.mark.parametrize(("state", "event", "role"), _cell_params())
def test_cell(state: State, event: Event, role: str) -> None:
    action = std(state, event)
    assert action is not None
    m = reach(state, role)
    n = len(m.history)

    out = FIRE[event](m)

    assert len(m.history) == n + 1
    assert last(m) == (state, event, action)
    next_state, want, artim = model(state, event, action, role)
    assert m.state is next_state
    check_outputs(out, want)
    assert m.artim_running is artim


# ---------------------------------------------------------------------------
# 3. Blank cells
# ---------------------------------------------------------------------------


def _snapshot(m: UpperLayer) -> tuple:
    return m.state, list(m.history), m.artim_running


@pytest.mark.parametrize(
    ("state", "event"),
    [pytest.param(s, e, id=f"{s.name}-{e.name}") for s, e in BLANK_CELLS if e in LOCAL_PRIMITIVES],
)
def test_invalid_local_primitive(state: State, event: Event) -> None:
    m = reach(state, role_for(state, event))
    before = _snapshot(m)
    with pytest.raises(InvalidPrimitive, match=rf"{event.name} .* not valid in {state.name} "):
        FIRE[event](m)
    assert _snapshot(m) == before


@pytest.mark.parametrize(
    ("state", "event"),
    [pytest.param(s, e, id=f"{s.name}-{e.name}") for s, e in BLANK_CELLS if e in (E.Evt2, E.Evt5)],
)
def test_invalid_transport_indication(state: State, event: Event) -> None:
    """A connect confirmation / indication where the table has none is refused."""
    role = role_for(state, event)
    m = reach(state, role)
    before = _snapshot(m)
    if (event is E.Evt2) == (role == "requestor"):
        with pytest.raises(InvalidPrimitive):
            m.connection_made()
    else:
        # This role never produces this event (an acceptor issues no TRANSPORT
        # CONNECT, a requestor gets no connection indication); ask the table directly.
        assert (state, event) not in TRANSITIONS
    assert _snapshot(m) == before


@pytest.mark.parametrize(
    ("state", "event"),
    [
        pytest.param(s, e, id=f"{s.name}-{e.name}")
        for s, e in BLANK_CELLS
        if e not in LOCAL_PRIMITIVES and e not in (E.Evt2, E.Evt5)
    ],
)
def test_blank_peer_or_transport_event_is_ignored(state: State, event: Event) -> None:
    """PDUs with no association (Sta1/Sta4), a close once idle and a stale ARTIM expiry
    cause no transition; the table itself refuses the cell."""
    assert event in PDU_EVENTS | {E.Evt17, E.Evt18}
    m = reach(state, role_for(state, event))
    before = _snapshot(m)
    assert FIRE[event](m) == []
    assert _snapshot(m) == before
    assert (state, event) not in TRANSITIONS


def test_every_cell_is_covered() -> None:
    assert len(VALID_CELLS) + len(BLANK_CELLS) == 13 * 19
    blank_kinds = (
        {c for c in BLANK_CELLS if c[1] in LOCAL_PRIMITIVES}
        | {c for c in BLANK_CELLS if c[1] in (E.Evt2, E.Evt5)}
        | {c for c in BLANK_CELLS if c[1] in PDU_EVENTS | {E.Evt17, E.Evt18}}
    )
    assert blank_kinds == set(BLANK_CELLS)


# ---------------------------------------------------------------------------
# 4. Specific behaviour
# ---------------------------------------------------------------------------


def test_artim_expiry_in_sta2_closes_transport() -> None:
    m = reach(S.Sta2)
    out = m.artim_expired()
    assert last(m) == (S.Sta2, E.Evt18, "AA-2")
    assert out == [CloseTransport(discard=True)]
    assert m.state is S.Sta1 and not m.artim_running
    assert m.failure is not None and "ARTIM" in m.failure
    # The close we asked for comes back as a transport-closed indication: ignored.
    assert m.connection_lost() == []


def _sta13_via_release() -> UpperLayer:
    return reach(S.Sta13)


def _sta13_via_reject() -> UpperLayer:
    m = reach(S.Sta3)
    m.reject(RJ)
    return m


def _sta13_via_bad_protocol_version() -> UpperLayer:
    m = reach(S.Sta2)
    m.receive_data(make_rq(protocol_version=2).encode())
    return m


def _sta13_via_local_abort() -> UpperLayer:
    m = reach(S.Sta6)
    m.abort()
    return m


def _sta13_via_unexpected_pdu() -> UpperLayer:
    m = reach(S.Sta6)
    m.receive_data(RQ_BYTES)
    return m


def _sta13_via_stray_pdu_in_sta2() -> UpperLayer:
    m = reach(S.Sta2)
    m.receive_data(PDATA_BYTES)
    return m


@pytest.mark.parametrize(
    ("make", "action"),
    [
        pytest.param(_sta13_via_release, "AR-4", id="AR-4"),
        pytest.param(_sta13_via_reject, "AE-8", id="AE-8"),
        pytest.param(_sta13_via_bad_protocol_version, "AE-6", id="AE-6-reject"),
        pytest.param(_sta13_via_local_abort, "AA-1", id="AA-1"),
        pytest.param(_sta13_via_unexpected_pdu, "AA-8", id="AA-8"),
        pytest.param(_sta13_via_stray_pdu_in_sta2, "AA-1", id="AA-1-Sta2"),
    ],
)
def test_artim_expiry_in_sta13_closes_transport(make: Callable[[], UpperLayer], action: str) -> None:
    m = make()
    assert m.state is S.Sta13 and last(m)[2] == action
    assert m.artim_running
    out = m.artim_expired()
    assert last(m) == (S.Sta13, E.Evt18, "AA-2")
    assert out == [CloseTransport(discard=True)]
    assert m.state is S.Sta1 and not m.artim_running
    assert m.artim_expired() == []  # a second expiry finds no timer


@pytest.mark.parametrize(
    ("state", "role"),
    [pytest.param(s, r, id=f"{s.name}-{r}") for s in State if s not in ARTIM_STATES for r in ROLES[s]],
)
def test_stale_artim_expiry_is_ignored(state: State, role: str) -> None:
    m = reach(state, role)
    before = _snapshot(m)
    assert m.artim_expired() == []
    assert _snapshot(m) == before


def test_artim_expiry_after_association_request_is_ignored() -> None:
    """The adapter may deliver an expiry that raced AE-6 stopping the timer."""
    m = reach(S.Sta2)
    out = m.receive_data(RQ_BYTES)
    assert out[0] == StopARTIM()
    assert m.artim_expired() == []
    assert m.state is S.Sta3
    assert m.accept(make_ac()) == [Send(AC_BYTES)]
    assert m.state is S.Sta6


def test_artim_restarted_by_aa1_in_sta2() -> None:
    m = reach(S.Sta2)
    out = m.receive_data(PDATA_BYTES)
    assert last(m) == (S.Sta2, E.Evt10, "AA-1")
    check_outputs(out, [Send(abort_pdu(2, 2)), StopARTIM(), StartARTIM(), Refused])
    assert "unexpected PDataTF PDU in Sta2" in out[3].reason
    assert m.state is S.Sta13 and m.artim_running


def test_release_collision_requestor() -> None:
    m = reach(S.Sta7, "requestor")
    assert m.receive_data(RELEASE_RQ_BYTES) == [ReleaseIndication(collision=True)]
    assert last(m) == (S.Sta7, E.Evt12, "AR-8") and m.state is S.Sta9
    assert m.release_response() == [Send(raw_pdu(0x06, bytes(4)))]
    assert last(m) == (S.Sta9, E.Evt14, "AR-9") and m.state is S.Sta11
    assert m.receive_data(RELEASE_RP_BYTES) == [ReleaseConfirm(), CloseTransport()]
    assert last(m) == (S.Sta11, E.Evt13, "AR-3") and m.state is S.Sta1
    assert not m.artim_running
    assert m.connection_lost() == []


def test_release_collision_acceptor() -> None:
    m = reach(S.Sta7, "acceptor")
    assert m.receive_data(RELEASE_RQ_BYTES) == [ReleaseIndication(collision=True)]
    assert last(m) == (S.Sta7, E.Evt12, "AR-8") and m.state is S.Sta10
    assert m.receive_data(RELEASE_RP_BYTES) == [ReleaseConfirm()]
    assert last(m) == (S.Sta10, E.Evt13, "AR-10") and m.state is S.Sta12
    assert m.release_response() == [Send(raw_pdu(0x06, bytes(4))), StartARTIM()]
    assert last(m) == (S.Sta12, E.Evt14, "AR-4") and m.state is S.Sta13
    assert m.connection_lost() == [StopARTIM()]
    assert last(m) == (S.Sta13, E.Evt17, "AR-5") and m.state is S.Sta1


def test_release_collision_requestor_must_answer_before_acceptor() -> None:
    """In Sta9 the requestor has not confirmed yet: its A-RELEASE-RP comes first."""
    m = reach(S.Sta9)
    assert [action_name(a) for _, _, a in m.history][-2:] == ["AR-1", "AR-8"]
    with pytest.raises(InvalidPrimitive):
        m.release()
    # The acceptor's RP arriving before ours is out of order: AA-8.
    out = m.receive_data(RELEASE_RP_BYTES)
    assert last(m) == (S.Sta9, E.Evt13, "AA-8")
    check_outputs(out, [Send(abort_pdu(2, 2)), ProviderAbort, StartARTIM()])


def test_normal_release_both_sides() -> None:
    req, acc = reach(S.Sta6, "requestor"), reach(S.Sta6, "acceptor")
    (rq,) = req.release()
    assert req.state is S.Sta7
    assert acc.receive_data(rq.data) == [ReleaseIndication()]
    (rp, start) = acc.release_response()
    assert start == StartARTIM() and acc.state is S.Sta13
    assert req.receive_data(rp.data) == [ReleaseConfirm(), CloseTransport()]
    assert req.state is S.Sta1
    assert acc.connection_lost() == [StopARTIM()]
    assert acc.state is S.Sta1


CONNECTED_STATES = [s for s in State if s not in (S.Sta1, S.Sta4)]


@pytest.mark.parametrize(
    ("state", "source", "reason"),
    [
        pytest.param(s, source, reason, id=f"{s.name}-{name}")
        for s in CONNECTED_STATES
        for source, reason, name in ((0, 0, "user"), (2, 1, "provider"))
    ],
)
def test_abort_pdu_received(state: State, source: int, reason: int) -> None:
    m = reach(state)
    out = m.receive_data(abort_pdu(source, reason))
    assert m.state is S.Sta1 and not m.artim_running
    if state in (S.Sta2, S.Sta13):
        assert last(m) == (state, E.Evt16, "AA-2")
        assert out == [StopARTIM(), CloseTransport(discard=True)]
    else:
        assert last(m) == (state, E.Evt16, "AA-3")
        if source == 0:
            assert out == [PeerAbort(0, 0), CloseTransport(discard=True)]
        else:
            check_outputs(out, [ProviderAbort, CloseTransport])
            assert "reason 1" in out[0].reason
        assert m.failure is not None and f"source {source}" in m.failure


@pytest.mark.parametrize(
    ("state", "role"),
    [pytest.param(s, r, id=f"{s.name}-{r}") for s in State for r in ROLES[s]],
)
def test_transport_closed(state: State, role: str) -> None:
    m = reach(state, role)
    n = len(m.history)
    out = m.connection_lost()
    assert m.state is S.Sta1 and not m.artim_running
    if state is S.Sta1:
        assert out == [] and len(m.history) == n
        return
    want = {S.Sta2: "AA-5", S.Sta13: "AR-5"}.get(state, "AA-4")
    assert last(m) == (state, E.Evt17, want)
    if want == "AA-4":
        assert out == [ProviderAbort("transport connection closed by peer")]
        assert m.failure == "transport connection closed by peer"
    else:
        assert out == [StopARTIM()]


def test_pdata_in_sta2_is_aa1() -> None:
    m = reach(S.Sta2)
    out = m.receive_data(PDATA_BYTES)
    assert last(m) == (S.Sta2, E.Evt10, "AA-1")
    assert out[0] == Send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x02")
    assert m.state is S.Sta13


def test_associate_ac_in_sta6_is_aa8() -> None:
    m = reach(S.Sta6, "requestor")
    out = m.receive_data(AC_BYTES)
    assert last(m) == (S.Sta6, E.Evt3, "AA-8")
    check_outputs(out, [Send, ProviderAbort, StartARTIM])
    sent = out[0].data
    assert sent == abort_pdu(2, 2)
    assert (sent[8], sent[9]) == (2, int(AbortReason.UNEXPECTED_PDU))  # source, reason
    assert "AssociateAC" in out[1].reason and "Sta6" in out[1].reason
    assert m.state is S.Sta13 and m.artim_running
    # Sta13: whatever the peer still sends is ignored (AA-6) until it closes.
    assert m.receive_data(PDATA_BYTES + RELEASE_RQ_BYTES) == []
    assert [action_name(a) for _, _, a in m.history[-2:]] == ["AA-6", "AA-6"]
    assert m.connection_lost() == [StopARTIM()]


def test_associate_rq_in_sta13_is_aa7() -> None:
    m = reach(S.Sta13)
    assert m.receive_data(RQ_BYTES) == [Send(abort_pdu(2, 2))]
    assert last(m) == (S.Sta13, E.Evt6, "AA-7")
    assert m.state is S.Sta13 and m.artim_running


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        pytest.param(1, True, id="v1"),
        pytest.param(3, True, id="bit0-and-bit1"),
        pytest.param(0xFFFF, True, id="all-bits"),
        pytest.param(2, False, id="bit1-only"),
        pytest.param(0, False, id="none"),
        pytest.param(0x8000, False, id="bit15-only"),
    ],
)
def test_ae6_checks_protocol_version_bit0(version: int, accepted: bool) -> None:
    m = reach(S.Sta2)
    rq = make_rq(protocol_version=version)
    out = m.receive_data(rq.encode())
    assert last(m) == (S.Sta2, E.Evt6, "AE-6")
    if accepted:
        assert out == [StopARTIM(), AssociateIndication(rq)]
        assert m.state is S.Sta3 and not m.artim_running
    else:
        # rejected-permanent (1), service-provider ACSE (2), protocol-version-not-supported (2)
        rj = Send(raw_pdu(0x03, bytes((0, 1, 2, 2))))
        assert out == [StopARTIM(), rj, StartARTIM(), Refused(f"{m.failure}: A-ASSOCIATE-RJ sent")]
        assert m.state is S.Sta13 and m.artim_running
        assert m.failure is not None and "protocol version" in m.failure


def test_ae6_rejects_a_request_without_presentation_contexts() -> None:
    """PS3.8 §9.3.2: one or more presentation context items. Rejected-permanent,
    service-provider (ACSE), no-reason-given; the reason goes to the log."""
    m = reach(S.Sta2)
    rq = make_rq()
    rq.presentation_contexts = []
    out = m.receive_data(rq.encode())
    assert last(m) == (S.Sta2, E.Evt6, "AE-6")
    assert out[:3] == [StopARTIM(), Send(raw_pdu(0x03, bytes((0, 1, 2, 1)))), StartARTIM()]
    check_outputs(out[3:], [Refused])
    assert "no presentation context" in out[3].reason
    assert m.state is S.Sta13 and m.artim_running


@pytest.mark.parametrize("role", ["requestor", "acceptor"])
def test_ar8_next_state_depends_on_role(role: str) -> None:
    m = reach(S.Sta7, role)
    assert m.receive_data(RELEASE_RQ_BYTES) == [ReleaseIndication(collision=True)]
    assert m.state is (S.Sta9 if role == "requestor" else S.Sta10)


def test_aa3_distinguishes_user_and_provider_abort() -> None:
    user, provider = reach(S.Sta6), reach(S.Sta6)
    assert user.receive_data(abort_pdu(0, 0)) == [PeerAbort(0, 0), CloseTransport(discard=True)]
    out = provider.receive_data(abort_pdu(2, 2))
    assert [type(o) for o in out] == [ProviderAbort, CloseTransport]


@pytest.mark.parametrize("state", [s for s in State if std(s, E.Evt15) == "AA-1"], ids=lambda s: s.name)
def test_local_abort_sends_user_abort(state: State) -> None:
    m = reach(state)
    out = m.abort("user gave up")
    assert last(m) == (state, E.Evt15, "AA-1")
    assert out == [Send(abort_pdu(0, 0)), StartARTIM()]
    assert m.state is S.Sta13 and m.failure == "user gave up"


def test_local_abort_while_connecting_just_closes() -> None:
    m = reach(S.Sta4)
    assert m.abort() == [CloseTransport(discard=True)]
    assert last(m) == (S.Sta4, E.Evt15, "AA-2") and m.state is S.Sta1


# -- several PDUs in one receive_data call ---------------------------------------


def test_several_pdus_in_one_call_acceptor() -> None:
    m = reach(S.Sta6, "acceptor")
    out = m.receive_data(PDATA_BYTES + PDATA_BYTES + RELEASE_RQ_BYTES)
    assert out == [PDataIndication(PDATA), PDataIndication(PDATA), ReleaseIndication()]
    assert [(s, e, action_name(a)) for s, e, a in m.history[-3:]] == [
        (S.Sta6, E.Evt10, "DT-2"),
        (S.Sta6, E.Evt10, "DT-2"),
        (S.Sta6, E.Evt12, "AR-2"),
    ]
    assert m.state is S.Sta8


def test_several_pdus_in_one_call_requestor() -> None:
    m = reach(S.Sta5)
    out = m.receive_data(AC_BYTES + PDATA_BYTES + RELEASE_RQ_BYTES)
    assert out == [AssociateAccepted(make_ac()), PDataIndication(PDATA), ReleaseIndication()]
    assert [(s, e, action_name(a)) for s, e, a in m.history[-3:]] == [
        (S.Sta5, E.Evt3, "AE-3"),
        (S.Sta6, E.Evt10, "DT-2"),
        (S.Sta6, E.Evt12, "AR-2"),
    ]
    assert m.state is S.Sta8


def test_rq_and_pdata_together_is_aa8_in_sta3() -> None:
    """The peer may not send P-DATA before it has our A-ASSOCIATE-AC."""
    m = reach(S.Sta2)
    out = m.receive_data(RQ_BYTES + PDATA_BYTES)
    check_outputs(out, [StopARTIM(), AssociateIndication, Send(abort_pdu(2, 2)), ProviderAbort, StartARTIM()])
    assert [(s, e, action_name(a)) for s, e, a in m.history[-2:]] == [
        (S.Sta2, E.Evt6, "AE-6"),
        (S.Sta3, E.Evt10, "AA-8"),
    ]
    assert m.state is S.Sta13


def test_processing_stops_once_idle() -> None:
    """Bytes after the PDU that ends the association are not interpreted."""
    m = reach(S.Sta7, "requestor")
    n = len(m.history)
    out = m.receive_data(PDATA_BYTES + RELEASE_RP_BYTES + PDATA_BYTES + RQ_BYTES)
    assert out == [PDataIndication(PDATA), ReleaseConfirm(), CloseTransport()]
    assert [action_name(a) for _, _, a in m.history[n:]] == ["AR-6", "AR-3"]
    assert m.state is S.Sta1
    assert m.receive_data(PDATA_BYTES) == []


def test_abort_then_more_pdus() -> None:
    m = reach(S.Sta6)
    n = len(m.history)
    out = m.receive_data(ABORT_BYTES + PDATA_BYTES + RELEASE_RQ_BYTES)
    assert out == [PeerAbort(0, 0), CloseTransport(discard=True)]
    assert len(m.history) == n + 1 and m.state is S.Sta1


def test_aa8_then_more_pdus_are_ignored_in_sta13() -> None:
    m = reach(S.Sta6)
    out = m.receive_data(AC_BYTES + PDATA_BYTES + RELEASE_RQ_BYTES + ABORT_BYTES)
    check_outputs(out, [Send, ProviderAbort, StartARTIM, StopARTIM, CloseTransport])
    assert [(s, e, action_name(a)) for s, e, a in m.history[-4:]] == [
        (S.Sta6, E.Evt3, "AA-8"),
        (S.Sta13, E.Evt10, "AA-6"),
        (S.Sta13, E.Evt12, "AA-6"),
        (S.Sta13, E.Evt16, "AA-2"),
    ]
    assert m.state is S.Sta1


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_pdus_split_across_calls(chunk: int) -> None:
    m = reach(S.Sta2)
    data = RQ_BYTES + RELEASE_RQ_BYTES
    outs = []
    for i in range(0, len(data), chunk):
        outs.append(m.receive_data(data[i : i + chunk]))
    flat = [o for out in outs for o in out]
    check_outputs(flat, [StopARTIM(), AssociateIndication, Send(abort_pdu(2, 2)), ProviderAbort, StartARTIM()])
    # Nothing happened until the last byte of the A-ASSOCIATE-RQ arrived.
    first = next(i for i, out in enumerate(outs) if out)
    assert (first + 1) * chunk >= len(RQ_BYTES) > first * chunk
    assert m.state is S.Sta13


# -- invalid PDUs (Evt19) ----------------------------------------------------------


def _rq_with_unexpected_item() -> bytes:
    body = RQ_BYTES[6:] + bytes((0x99, 0, 0, 0))
    return raw_pdu(0x01, body)


EVT19_VARIANTS = {
    "unrecognized-type": (UNRECOGNIZED_BYTES, AbortReason.UNRECOGNIZED_PDU),
    "type-00": (raw_pdu(0x00, b""), AbortReason.UNRECOGNIZED_PDU),
    "type-FF-garbage": (b"\xff" * 16, AbortReason.UNRECOGNIZED_PDU),
    "release-rq-length-5": (raw_pdu(0x05, bytes(5)), AbortReason.INVALID_PDU_PARAMETER_VALUE),
    "abort-length-2": (raw_pdu(0x07, bytes(2)), AbortReason.INVALID_PDU_PARAMETER_VALUE),
    "pdata-without-pdv": (raw_pdu(0x04, b""), AbortReason.INVALID_PDU_PARAMETER_VALUE),
    "pdv-length-1": (raw_pdu(0x04, b"\x00\x00\x00\x01\x01"), AbortReason.INVALID_PDU_PARAMETER_VALUE),
    "rq-unexpected-item": (_rq_with_unexpected_item(), AbortReason.UNEXPECTED_PDU_PARAMETER),
    # Judged from the 6-byte header alone, before any of the claimed body arrives.
    "oversized-control-pdu": (
        b"\x02\x00" + struct.pack(">I", MAX_CONTROL_PDU + 1),
        AbortReason.INVALID_PDU_PARAMETER_VALUE,
    ),
    "oversized-pdata": (b"\x04\x00" + struct.pack(">I", MAX_PDU + 1), AbortReason.INVALID_PDU_PARAMETER_VALUE),
}


@pytest.mark.parametrize("variant", list(EVT19_VARIANTS))
@pytest.mark.parametrize("state", CONNECTED_STATES, ids=lambda s: s.name)
def test_invalid_pdu(state: State, variant: str) -> None:
    data, reason = EVT19_VARIANTS[variant]
    m = reach(state)
    out = m.receive_data(data)
    action = std(state, E.Evt19)
    assert last(m) == (state, E.Evt19, action)
    assert m.state is S.Sta13
    abort = Send(abort_pdu(2, int(reason)))
    if action == "AA-1":
        check_outputs(out, [abort, StopARTIM(), StartARTIM(), Refused])
        assert out[3].reason.startswith("invalid PDU")
    elif action == "AA-8":
        check_outputs(out, [abort, ProviderAbort, StartARTIM()])
        assert out[1].reason.startswith("invalid PDU")
    else:
        assert action == "AA-7"
        assert out == [abort]
    assert m.artim_running
    # The stream cannot be framed again: everything after is ignored, even a
    # well-formed A-ABORT.
    n = len(m.history)
    assert m.receive_data(ABORT_BYTES + RELEASE_RQ_BYTES) == []
    assert len(m.history) == n and m.state is S.Sta13
    # ARTIM still ends it.
    assert m.artim_expired() == [CloseTransport(discard=True)]
    assert m.state is S.Sta1


def test_invalid_pdu_discards_rest_of_same_call() -> None:
    m = reach(S.Sta6)
    out = m.receive_data(PDATA_BYTES + UNRECOGNIZED_BYTES + PDATA_BYTES + ABORT_BYTES)
    check_outputs(out, [PDataIndication(PDATA), Send(abort_pdu(2, 1)), ProviderAbort, StartARTIM()])
    assert [action_name(a) for _, _, a in m.history[-2:]] == ["DT-2", "AA-8"]
    assert m.state is S.Sta13


def test_truncated_pdu_waits_for_more() -> None:
    """An incomplete PDU is not invalid: no event until it is whole."""
    m = reach(S.Sta6)
    n = len(m.history)
    assert m.receive_data(PDATA_BYTES[:-1]) == []
    assert len(m.history) == n
    assert m.receive_data(PDATA_BYTES[-1:]) == [PDataIndication(PDATA)]


# -- provider_abort(): the Evt19 column for violations found above the PDU layer ---


@pytest.mark.parametrize("state", CONNECTED_STATES, ids=lambda s: s.name)
def test_provider_abort(state: State) -> None:
    m = reach(state)
    out = m.provider_abort("bad DIMSE framing", AbortReason.UNEXPECTED_PDU_PARAMETER)
    action = std(state, E.Evt19)
    assert last(m) == (state, E.Evt19, action)
    abort = Send(abort_pdu(2, 5))
    want = {
        "AA-1": [abort, StopARTIM(), StartARTIM(), Refused("bad DIMSE framing: A-ABORT sent")],
        "AA-7": [abort],
        "AA-8": [abort, ProviderAbort("bad DIMSE framing"), StartARTIM()],
    }[action]
    assert out == want
    assert m.state is S.Sta13


@pytest.mark.parametrize(("state", "role"), [(S.Sta1, "acceptor"), (S.Sta1, "requestor"), (S.Sta4, "requestor")])
def test_provider_abort_without_connection_is_invalid(state: State, role: str) -> None:
    m = reach(state, role)
    with pytest.raises(InvalidPrimitive):
        m.provider_abort("nothing to abort")
    assert m.state is state


# -- a whole association, both ends wired together -----------------------------------


def test_two_machines_talk() -> None:
    req, acc = new_machine("requestor"), new_machine("acceptor")
    assert req.associate(make_rq()) == [ConnectTransport()]
    assert acc.connection_made() == [StartARTIM()]
    (send_rq,) = req.connection_made()
    stop, indication = acc.receive_data(send_rq.data)
    assert stop == StopARTIM() and indication == AssociateIndication(make_rq())
    (send_ac,) = acc.accept(make_ac())
    assert req.receive_data(send_ac.data) == [AssociateAccepted(make_ac())]
    (send_pd,) = req.send_pdata(PDATA_BYTES)
    assert acc.receive_data(send_pd.data) == [PDataIndication(PDATA)]
    (send_back,) = acc.send_pdata(PDATA_BYTES)
    assert req.receive_data(send_back.data) == [PDataIndication(PDATA)]
    assert req.state is acc.state is S.Sta6
