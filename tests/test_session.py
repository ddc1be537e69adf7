"""The sans-I/O DIMSE session: message ids, the window and held-back requests, C-CANCEL
routing, role checks and response matching, driven with PDVs only (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dimse_async.acse import PresentationContext
from dimse_async.dimse import NO_DATASET, Command, CommandField, DataFragment, DIMSEError, encode_command
from dimse_async.exceptions import NoAcceptedContext
from dimse_async.pdu import PDV
from dimse_async.services.qr import Responses
from dimse_async.session import (
    CancelRequested,
    PauseReading,
    Perform,
    Respond,
    ResponseArrived,
    ResumeReading,
    Session,
    StreamStarted,
)
from dimse_async.status import Code, StatusCategory, response_status

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
FIND = "1.2.840.10008.5.1.4.1.2.2.1"
LE = "1.2.840.10008.1.2.1"


def scp_session(max_performed: int = 1) -> Session:
    """The acceptor's view: SCP on every context, and SCU too on the CT one (C-GET)."""
    contexts = [
        PresentationContext(1, VERIFICATION, LE, 0, as_scu=False, as_scp=True),
        PresentationContext(3, FIND, LE, 0, as_scu=False, as_scp=True),
        PresentationContext(5, CT, LE, 0, as_scu=True, as_scp=False),
    ]
    return Session(contexts, max_performed=max_performed)


def command(ctx: int, cmd: Command) -> list[PDV]:
    return [PDV(ctx, True, True, encode_command(cmd))]


def find_rq(mid: int) -> list[PDV]:
    cmd = Command(CommandField.C_FIND_RQ, message_id=mid, affected_sop_class_uid=FIND, priority=0, data_set_type=0)
    return [*command(3, cmd), PDV(3, False, True, b"identifier")]


def cancel(mid: int) -> list[PDV]:
    return command(3, Command(CommandField.C_CANCEL_RQ, message_id_being_responded_to=mid))


def test_requests_beyond_the_window_are_held_back_and_started_in_order():
    session = scp_session(max_performed=1)
    [first] = session.receive(find_rq(1))
    assert isinstance(first, Perform) and first.operation.message.dataset == b"identifier"
    assert session.receive(find_rq(2)) == [PauseReading()]
    assert session.receive(find_rq(3)) == [PauseReading()]  # each: the adapter judges whether to read on
    assert session.held == 2 and not session.idle
    started = session.finished(first.operation)
    assert [type(e) for e in started] == [Perform]
    assert started[0].operation.message_id == 2
    started = session.finished(started[0].operation)
    assert [type(e) for e in started] == [Perform, ResumeReading]
    session.finished(started[0].operation)
    assert session.idle


def test_cancel_reaches_a_running_operation():
    session = scp_session()
    [perform] = session.receive(find_rq(7))
    [event] = session.receive(cancel(7))
    assert event == CancelRequested(perform.operation) and perform.operation.cancelled


def test_cancel_aimed_at_a_held_back_request_answers_it_with_cancel():
    session = scp_session(max_performed=1)
    session.receive(find_rq(1))
    session.receive(find_rq(2))
    events = session.receive(cancel(2))
    assert [type(e) for e in events] == [Respond, ResumeReading]
    rsp = events[0].command
    assert rsp.command_field == CommandField.C_FIND_RSP and rsp.message_id_being_responded_to == 2
    assert rsp.status == Code.CANCEL
    assert session.held == 0


def test_cancel_for_an_unknown_message_id_is_ignored():
    assert scp_session().receive(cancel(99)) == []


def test_request_on_a_context_without_the_scp_role_is_refused():
    """PS3.7 D.3.3.4: on context 5 we are only SCU, so a C-STORE-RQ there is refused."""
    session = scp_session()
    cmd = Command(
        CommandField.C_STORE_RQ,
        message_id=4,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2.3",
        data_set_type=0,
    )
    events = session.receive([*command(5, cmd), PDV(5, False, False, b"ab"), PDV(5, False, True, b"cd")])
    [refusal] = events  # no StreamStarted, the data set is dropped
    assert isinstance(refusal, Respond) and refusal.command.status == Code.SOP_CLASS_NOT_SUPPORTED
    assert refusal.command.affected_sop_instance_uid == "1.2.3"


def test_streamed_data_set_goes_out_as_fragments():
    contexts = [PresentationContext(1, CT, LE, 0, as_scu=False, as_scp=True)]
    session = Session(contexts, streamed={CommandField.C_STORE_RQ})
    cmd = Command(
        CommandField.C_STORE_RQ,
        message_id=1,
        affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2",
        data_set_type=0,
    )
    events = session.receive([*command(1, cmd), PDV(1, False, False, b"ab"), PDV(1, False, True, b"cd")])
    assert [type(e) for e in events] == [StreamStarted, DataFragment, DataFragment, Perform]
    assert events[3].operation.message.dataset is None and events[2].last


def test_middle_fragments_of_a_streamed_data_set_are_taken_without_events():
    """``stream_fragment`` takes a data PDV, not the last, of the data set being streamed
    (counted as :meth:`Session.receive` would); anything else is left to ``receive``,
    which still judges it: a command, the last fragment, a data set kept in memory, a
    fragment on another context or with no data set under way."""
    contexts = [
        PresentationContext(1, CT, LE, 0, as_scu=False, as_scp=True),
        PresentationContext(3, FIND, LE, 0, as_scu=False, as_scp=True),
    ]
    session = Session(contexts, streamed={CommandField.C_STORE_RQ})
    store = Command(
        CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid=CT, affected_sop_instance_uid="1.2", data_set_type=0
    )
    assert not session.stream_fragment(PDV(1, False, False, b"early"))  # no data set under way
    with pytest.raises(DIMSEError):
        session.receive([PDV(1, False, False, b"early")])
    session = Session(contexts, streamed={CommandField.C_STORE_RQ})
    assert [type(e) for e in session.receive(command(1, store))] == [StreamStarted]
    assert session.stream_fragment(PDV(1, False, False, b"ab"))
    assert session.stream_fragment(PDV(1, False, False, b"cde"))
    assert session.assembler.received == 5
    assert not session.stream_fragment(PDV(3, False, False, b"x"))  # another context
    assert not session.stream_fragment(PDV(1, True, False, b"x"))  # a command fragment
    assert not session.stream_fragment(PDV(1, False, True, b"fg"))  # the last one: receive() ends the message
    [last, perform] = session.receive([PDV(1, False, True, b"fg")])
    assert isinstance(last, DataFragment) and last.last and isinstance(perform, Perform)
    assert session.assembler.received == 7
    assert not session.stream_fragment(PDV(1, False, False, b"late"))  # the data set has ended
    session.finished(perform.operation)
    find = Command(CommandField.C_FIND_RQ, message_id=2, affected_sop_class_uid=FIND, priority=0, data_set_type=0)
    assert session.receive(command(3, find)) == []
    assert not session.stream_fragment(PDV(3, False, False, b"ident"))  # kept in memory, not streamed


def _plain(events: list[object] | str) -> object:
    """Events compared by value (an Operation compares by identity)."""
    if isinstance(events, str):
        return events
    return [(e.operation.context, e.operation.message) if isinstance(e, Perform) else e for e in events]


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    role_scp=st.booleans(),
    then=st.sampled_from(["store", "echo", "find", "stray"]),
)
def test_stream_takes_a_streamed_data_set_as_receive_does(sizes: list[int], role_scp: bool, then: str) -> None:
    """``stream`` (every fragment of a data set streamed to a sink, the last one too)
    leaves the session as ``receive`` does and returns the events ``receive`` returns
    after the fragment's :class:`DataFragment` (the request to perform); it takes
    nothing else: a data set dropped (refused) or in memory, a command, no data set."""
    contexts = [
        PresentationContext(1, CT, LE, 0, as_scu=not role_scp, as_scp=role_scp),
        PresentationContext(3, FIND, LE, 0, as_scu=False, as_scp=True),
    ]
    store = Command(CommandField.C_STORE_RQ, message_id=1, affected_sop_class_uid=CT,
                    affected_sop_instance_uid="1.2", data_set_type=0)  # fmt: skip
    fragments = [PDV(1, False, i == len(sizes) - 1, bytes(n)) for i, n in enumerate(sizes)]
    echo = Command(CommandField.C_ECHO_RQ, message_id=5, affected_sop_class_uid=CT)
    nxt = {"store": command(1, store), "echo": command(1, echo), "find": find_rq(2), "stray": [PDV(1, False, True, b"x")]}[then]
    a = Session(contexts, streamed={CommandField.C_STORE_RQ})
    b = Session(contexts, streamed={CommandField.C_STORE_RQ})
    assert a.receive(command(1, store)) == b.receive(command(1, store))
    for pdv in [*fragments, *nxt]:
        try:
            general: list[object] | str = a.receive([pdv])
        except DIMSEError as exc:
            general = str(exc)
        taken = b.stream(pdv)
        if taken is None:
            try:
                fast: list[object] | str = list(b.receive([pdv]))
            except DIMSEError as exc:
                fast = str(exc)
        else:
            assert role_scp and not pdv.is_command  # only a streamed (admitted) data set's fragments
            fast = [DataFragment(1, pdv.data, pdv.is_last), *taken]
        assert _plain(fast) == _plain(general)
        assert (a.assembler.received, a.assembler.current, a.assembler.messages, a.receiving, a.streaming) == (
            b.assembler.received, b.assembler.current, b.assembler.messages, b.receiving, b.streaming
        )
        if isinstance(general, str):
            break


def test_message_on_a_context_that_was_not_accepted_is_a_violation():
    with pytest.raises(DIMSEError):
        scp_session().receive(
            command(9, Command(CommandField.C_ECHO_RQ, message_id=1, affected_sop_class_uid=VERIFICATION))
        )


def test_responses_match_their_requests_single_and_multi():
    session = Session([PresentationContext(3, FIND, LE, 0)])  # requestor: SCU
    ctx = session.context(3)
    echo = Command(CommandField.C_FIND_RQ, affected_sop_class_uid=FIND)
    mid = session.start_request(ctx, echo, multi=True)
    assert echo.message_id == mid and session.outstanding == 1
    pending = Command(CommandField.C_FIND_RSP, message_id_being_responded_to=mid, status=Code.PENDING, data_set_type=0)
    [arrived] = session.receive([*command(3, pending), PDV(3, False, True, b"match")])
    assert isinstance(arrived, ResponseArrived) and not arrived.final and arrived.message.dataset == b"match"
    final = Command(CommandField.C_FIND_RSP, message_id_being_responded_to=mid, status=0, data_set_type=NO_DATASET)
    [arrived] = session.receive(command(3, final))
    assert arrived.final and session.outstanding == 0
    with pytest.raises(DIMSEError):  # nothing outstanding any more
        session.receive(command(3, final))


def test_a_final_response_without_status_is_a_failure():
    """A missing Status counts as 0xC000 everywhere, never as success."""
    session = Session([PresentationContext(3, FIND, LE, 0)])
    mid = session.start_request(
        session.context(3), Command(CommandField.C_FIND_RQ, affected_sop_class_uid=FIND), multi=True
    )
    [arrived] = session.receive(command(3, Command(CommandField.C_FIND_RSP, message_id_being_responded_to=mid)))
    assert arrived.final
    status = response_status(arrived.message.command.status, None)
    assert status == Code.CANNOT_UNDERSTAND and status.category is StatusCategory.FAILURE


def test_we_never_invoke_on_a_context_where_we_are_not_scu():
    session = scp_session()
    with pytest.raises(NoAcceptedContext):
        session.start_request(session.context(3), Command(CommandField.C_FIND_RQ, affected_sop_class_uid=FIND))
    with pytest.raises(NoAcceptedContext):
        session.context_for(FIND)  # as SCU


def test_message_ids_skip_those_still_outstanding():
    session = Session([PresentationContext(1, VERIFICATION, LE, 0)])
    ctx = session.context(1)
    ids = [session.start_request(ctx, Command(CommandField.C_ECHO_RQ)) for _ in range(3)]
    assert ids == [1, 2, 3]
    for expected in range(4, 0x10000):  # up to the last id, each answered at once
        assert session.start_request(ctx, Command(CommandField.C_ECHO_RQ)) == expected
        session.forget_request(expected)
    # Wrap around: 1..3 are still outstanding.
    assert session.start_request(ctx, Command(CommandField.C_ECHO_RQ)) == 4


async def test_responses_status_after_a_final_response_without_status():
    """The user-level Responses turns a status-less final response into 0xC000."""
    session = Session([PresentationContext(3, FIND, LE, 0)])
    mid = session.start_request(
        session.context(3), Command(CommandField.C_FIND_RQ, affected_sop_class_uid=FIND), multi=True
    )
    [arrived] = session.receive(command(3, Command(CommandField.C_FIND_RSP, message_id_being_responded_to=mid)))

    class Delivered:
        final = arrived.message

        def __aiter__(self):
            return self._gen()

        async def _gen(self):
            yield arrived.message

        async def aclose(self) -> None:
            return None

    responses = Responses(Delivered(), lambda msg: None)
    assert [r async for r in responses] == []
    assert responses.status == Code.CANNOT_UNDERSTAND


_PDV_STEPS = st.sampled_from(["store", "echo", "store-in-parts", "data", "last-data", "other-context", "big"])


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(_PDV_STEPS, min_size=1, max_size=8))
def test_a_lone_command_pdv_is_taken_as_the_assembler_receives_it(steps: list[str]) -> None:
    """``MessageAssembler.command`` (a command set in one PDV, between messages) returns
    the command ``receive`` would report and leaves the assembler as ``receive`` does;
    it declines (``None``) while a command or data set is under way, and raises what
    ``receive`` raises. Sequences of commands, data PDVs and command fragments, in and
    out of order."""
    from dimse_async.dimse import CommandReceived, MessageAssembler

    store = encode_command(Command(CommandField.C_STORE_RQ, message_id=7, affected_sop_class_uid=CT,
                                   affected_sop_instance_uid="1.2.3", priority=0, data_set_type=0))  # fmt: skip
    echo = encode_command(Command(CommandField.C_ECHO_RQ, message_id=8, affected_sop_class_uid=VERIFICATION))
    pdvs = {
        "store": [PDV(1, True, True, store)],
        "echo": [PDV(1, True, True, echo)],
        "store-in-parts": [PDV(1, True, False, store[:10]), PDV(1, True, True, store[10:])],
        "data": [PDV(1, False, False, b"ab")],
        "last-data": [PDV(1, False, True, b"cd")],
        "other-context": [PDV(3, True, True, echo)],
        "big": [PDV(1, True, True, bytes((1 << 20) + 2))],
    }
    a, b = MessageAssembler(), MessageAssembler()
    for step in steps:
        for pdv in pdvs[step]:
            try:
                general: list[object] | str = list(a.receive([pdv]))
            except DIMSEError as exc:
                general = str(exc)
            try:
                cmd = b.command(pdv) if pdv.is_command and pdv.is_last else None
                fast: list[object] | str = list(b.receive([pdv])) if cmd is None else [CommandReceived(pdv.context_id, cmd)]
            except DIMSEError as exc:
                fast = str(exc)
            assert fast == general
            assert (a.received, a.current, a.messages, a.in_dataset, a.incomplete) == (
                b.received, b.current, b.messages, b.in_dataset, b.incomplete
            )
            if isinstance(general, str):
                return


def test_objects_of_a_streamed_request_have_every_field_of_their_dataclass():
    """The request's Message, StreamStarted, Operation and Perform are made without their
    __init__ (see session._new): each field set, to what the dataclass would give it."""
    import dataclasses

    from dimse_async.dimse import Message
    from dimse_async.session import Operation

    session = Session([PresentationContext(5, CT, LE, 0, as_scu=False, as_scp=True)])
    rq = Command(
        CommandField.C_STORE_RQ, message_id=3, affected_sop_class_uid=CT,
        affected_sop_instance_uid="1.2.3.4", priority=0, data_set_type=0,
    )  # fmt: skip
    [started] = session.receive(command(5, rq))
    [_fragment, perform] = session.receive([PDV(5, False, True, b"data")])
    msg = started.message
    op = perform.operation
    for obj, made in (
        (msg, Message(5, msg.command)),
        (started, StreamStarted(msg)),
        (op, Operation(session.contexts[5], msg)),
        (perform, Perform(op)),
    ):
        assert type(obj) is type(made)
        for field in dataclasses.fields(made):
            assert getattr(obj, field.name) is getattr(made, field.name), field.name
    assert msg.command == rq and op.message is msg and op.context is session.contexts[5]


COMMITMENT = "1.2.840.10008.1.20.1"


@pytest.mark.parametrize(
    ("sop_class", "role_selection", "performed"),
    [(COMMITMENT, False, True), (COMMITMENT, True, False), (FIND, False, False)],
    ids=["commitment-default-roles", "commitment-selected-scu-only", "other-class-default-roles"],
)
def test_a_report_on_a_context_with_the_acceptors_default_roles(sop_class: str, role_selection: bool, performed: bool):
    """An N-EVENT-REPORT from the requestor on a context where we (acceptor) are SCP by
    default: the Storage Commitment report the SCP opens an association for (PS3.4
    J.3.3.1.3) is performed even without the role selection J.2.1 asks for; with a role
    selection that left us without the SCU role, or for another class, it is refused
    0x0122 (PS3.7 D.3.3.4)."""
    ctx = PresentationContext(1, sop_class, LE, 0, as_scu=False, as_scp=True, role_selection=role_selection)
    session = Session([ctx])
    cmd = Command(
        CommandField.N_EVENT_REPORT_RQ,
        message_id=1,
        affected_sop_class_uid=sop_class,
        affected_sop_instance_uid=f"{sop_class}.1",
        event_type_id=1,
        data_set_type=0,
    )
    [event] = session.receive([*command(1, cmd), PDV(1, False, True, b"information")])
    if performed:
        assert isinstance(event, Perform) and event.operation.message.dataset == b"information"
    else:
        assert isinstance(event, Respond) and event.command.status == Code.SOP_CLASS_NOT_SUPPORTED
