"""PS3.8 Table 9-10 as data: the Upper Layer's states, events, actions and transitions.

States (Tables 9-1 … 9-5), events (Table 9-6) and actions (Tables 9-6 … 9-9) are named
exactly as in the standard, so :data:`TRANSITIONS` reads side by side with Table 9-10.
:class:`dimse_async.fsm.UpperLayer` runs it.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["TRANSITIONS", "Action", "Event", "State"]


class State(Enum):
    """PS3.8 Tables 9-1 … 9-5."""

    __hash__ = object.__hash__  # members are singletons: the identity hash, in C (dict lookups per PDU)

    Sta1 = "Idle"
    Sta2 = "Transport connection open (awaiting A-ASSOCIATE-RQ PDU)"
    Sta3 = "Awaiting local A-ASSOCIATE response primitive"
    Sta4 = "Awaiting transport connection opening to complete"
    Sta5 = "Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU"
    Sta6 = "Association established and ready for data transfer"
    Sta7 = "Awaiting A-RELEASE-RP PDU"
    Sta8 = "Awaiting local A-RELEASE response primitive"
    Sta9 = "Release collision requestor side; awaiting A-RELEASE response"
    Sta10 = "Release collision acceptor side; awaiting A-RELEASE-RP PDU"
    Sta11 = "Release collision requestor side; awaiting A-RELEASE-RP PDU"
    Sta12 = "Release collision acceptor side; awaiting A-RELEASE response primitive"
    Sta13 = "Awaiting transport connection close indication"


class Event(Enum):
    """PS3.8 Table 9-10, the event rows."""

    __hash__ = object.__hash__  # members are singletons: the identity hash, in C (dict lookups per PDU)

    Evt1 = "A-ASSOCIATE request (local user)"
    Evt2 = "Transport connect confirmation (local transport service)"
    Evt3 = "A-ASSOCIATE-AC PDU (received on transport connection)"
    Evt4 = "A-ASSOCIATE-RJ PDU (received on transport connection)"
    Evt5 = "Transport connection indication (local transport service)"
    Evt6 = "A-ASSOCIATE-RQ PDU (received on transport connection)"
    Evt7 = "A-ASSOCIATE response primitive (accept)"
    Evt8 = "A-ASSOCIATE response primitive (reject)"
    Evt9 = "P-DATA request primitive"
    Evt10 = "P-DATA-TF PDU"
    Evt11 = "A-RELEASE request primitive"
    Evt12 = "A-RELEASE-RQ PDU (received on open transport connection)"
    Evt13 = "A-RELEASE-RP PDU (received on transport connection)"
    Evt14 = "A-RELEASE response primitive"
    Evt15 = "A-ABORT request primitive"
    Evt16 = "A-ABORT PDU (received on open transport connection)"
    Evt17 = "Transport connection closed indication (local transport service)"
    Evt18 = "ARTIM timer expired (association reject/release timer)"
    Evt19 = "Unrecognized or invalid PDU received"


class Action(Enum):
    """PS3.8 Tables 9-6 … 9-9."""

    __hash__ = object.__hash__  # members are singletons: the identity hash, in C (dict lookups per PDU)

    AE_1 = "Issue TRANSPORT CONNECT request primitive to local transport service"
    AE_2 = "Send A-ASSOCIATE-RQ-PDU"
    AE_3 = "Issue A-ASSOCIATE confirmation (accept) primitive"
    AE_4 = "Issue A-ASSOCIATE confirmation (reject) primitive and close transport connection"
    AE_5 = "Issue Transport connection response primitive; start ARTIM timer"
    AE_6 = "Stop ARTIM timer; if A-ASSOCIATE-RQ acceptable issue A-ASSOCIATE indication, else send A-ASSOCIATE-RJ and start ARTIM"
    AE_7 = "Send A-ASSOCIATE-AC PDU"
    AE_8 = "Send A-ASSOCIATE-RJ PDU and start ARTIM timer"
    DT_1 = "Send P-DATA-TF PDU"
    DT_2 = "Send P-DATA indication primitive"
    AR_1 = "Send A-RELEASE-RQ PDU"
    AR_2 = "Issue A-RELEASE indication primitive"
    AR_3 = "Issue A-RELEASE confirmation primitive, and close transport connection"
    AR_4 = "Issue A-RELEASE-RP PDU and start ARTIM timer"
    AR_5 = "Stop ARTIM timer"
    AR_6 = "Issue P-DATA indication"
    AR_7 = "Issue P-DATA-TF PDU"
    AR_8 = "Issue A-RELEASE indication (release collision)"
    AR_9 = "Send A-RELEASE-RP PDU"
    AR_10 = "Issue A-RELEASE confirmation primitive"
    AA_1 = "Send A-ABORT PDU (service-user source) and start (or restart) ARTIM timer"
    AA_2 = "Stop ARTIM timer if running. Close transport connection"
    AA_3 = "Issue A-ABORT or A-P-ABORT indication and close transport connection"
    AA_4 = "Issue A-P-ABORT indication primitive"
    # The standard words AA-5 exactly like AR-5; Enum members with equal values are
    # aliases, so the value must differ or AA-5 would silently become AR-5.
    AA_5 = "Stop ARTIM timer (transport connection closed in Sta2)"
    AA_6 = "Ignore PDU"
    AA_7 = "Send A-ABORT PDU"
    AA_8 = "Send A-ABORT PDU (service-provider source), issue an A-P-ABORT indication, and start ARTIM timer"


S, E, A = State, Event, Action


def _row(event: Event, cells: dict[State, Action]) -> dict[tuple[State, Event], Action]:
    return {(state, event): action for state, action in cells.items()}


def _many(states: str, action: Action) -> dict[State, Action]:
    """``_many("6-12", A.AA_8)``: the same action in a run of states."""
    lo, hi = (int(x) for x in states.split("-"))
    return {State[f"Sta{n}"]: action for n in range(lo, hi + 1)}


# PS3.8 Table 9-10, one row per event. Cells left blank in the standard are absent.
TRANSITIONS: dict[tuple[State, Event], Action] = {
    **_row(E.Evt1, {S.Sta1: A.AE_1}),
    **_row(E.Evt2, {S.Sta4: A.AE_2}),
    **_row(E.Evt3, {S.Sta2: A.AA_1, S.Sta3: A.AA_8, S.Sta5: A.AE_3, **_many("6-12", A.AA_8), S.Sta13: A.AA_6}),
    **_row(E.Evt4, {S.Sta2: A.AA_1, S.Sta3: A.AA_8, S.Sta5: A.AE_4, **_many("6-12", A.AA_8), S.Sta13: A.AA_6}),
    **_row(E.Evt5, {S.Sta1: A.AE_5}),
    **_row(E.Evt6, {S.Sta2: A.AE_6, S.Sta3: A.AA_8, **_many("5-12", A.AA_8), S.Sta13: A.AA_7}),
    **_row(E.Evt7, {S.Sta3: A.AE_7}),
    **_row(E.Evt8, {S.Sta3: A.AE_8}),
    **_row(E.Evt9, {S.Sta6: A.DT_1, S.Sta8: A.AR_7}),
    **_row(
        E.Evt10,
        {
            S.Sta2: A.AA_1,
            S.Sta3: A.AA_8,
            S.Sta5: A.AA_8,
            S.Sta6: A.DT_2,
            S.Sta7: A.AR_6,
            **_many("8-12", A.AA_8),
            S.Sta13: A.AA_6,
        },
    ),
    **_row(E.Evt11, {S.Sta6: A.AR_1}),
    **_row(
        E.Evt12,
        {
            S.Sta2: A.AA_1,
            S.Sta3: A.AA_8,
            S.Sta5: A.AA_8,
            S.Sta6: A.AR_2,
            S.Sta7: A.AR_8,
            **_many("8-12", A.AA_8),
            S.Sta13: A.AA_6,
        },
    ),
    **_row(
        E.Evt13,
        {
            S.Sta2: A.AA_1,
            S.Sta3: A.AA_8,
            S.Sta5: A.AA_8,
            S.Sta6: A.AA_8,
            S.Sta7: A.AR_3,
            S.Sta8: A.AA_8,
            S.Sta9: A.AA_8,
            S.Sta10: A.AR_10,
            S.Sta11: A.AR_3,
            S.Sta12: A.AA_8,
            S.Sta13: A.AA_6,
        },
    ),
    **_row(E.Evt14, {S.Sta8: A.AR_4, S.Sta9: A.AR_9, S.Sta12: A.AR_4}),
    **_row(E.Evt15, {S.Sta3: A.AA_1, S.Sta4: A.AA_2, **_many("5-12", A.AA_1)}),
    **_row(E.Evt16, {S.Sta2: A.AA_2, S.Sta3: A.AA_3, **_many("5-12", A.AA_3), S.Sta13: A.AA_2}),
    **_row(E.Evt17, {S.Sta2: A.AA_5, **_many("3-12", A.AA_4), S.Sta13: A.AR_5}),
    **_row(E.Evt18, {S.Sta2: A.AA_2, S.Sta13: A.AA_2}),
    **_row(E.Evt19, {S.Sta2: A.AA_1, S.Sta3: A.AA_8, **_many("5-12", A.AA_8), S.Sta13: A.AA_7}),
}
