"""The DIMSE session of one association, sans I/O (PS3.7 §9.3, §10.3, D.3.3.3, D.3.3.4).

:class:`Session` sits between the reassembler (:mod:`dimse_async.dimse`) and the
asyncio adapter. It owns everything about DIMSE messages that is bookkeeping rather
than I/O:

- message ids and the requests we invoked, matched with their responses (one for
  C-ECHO/C-STORE, pending ones then a final one for C-FIND/C-GET/C-MOVE);
- the requests the peer invoked: performed within the negotiated asynchronous
  operations window, the rest held back in arrival order;
- C-CANCEL routing, also to a request still held back (answered Cancel at once);
- context and role checks: a message on a context that was not accepted is a protocol
  violation; a request on a context where we did not agree to be SCP is refused.

``receive(pdvs)`` returns :data:`SessionEvent` objects for the adapter to act on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Final

from .acse import PresentationContext
from .dimse import (
    NO_DATASET,
    Command,
    CommandField,
    CommandReceived,
    DataFragment,
    DIMSEError,
    Message,
    MessageAssembler,
    response_to,
)
from .exceptions import NoAcceptedContext
from .lazy_dataclass import dataclass
from .pdu import PDV
from .status import PENDING_CODES, Code
from .uids import StorageCommitmentPushModel, uid_name

__all__ = [
    "CancelRequested",
    "Operation",
    "PauseReading",
    "Perform",
    "Respond",
    "ResponseArrived",
    "ResumeReading",
    "Session",
    "SessionEvent",
    "StreamStarted",
]


# Requests that never carry a data set (PS3.7 §9.3.5, §9.3.2.3, §10.3.6).
_NO_DATASET_REQUESTS = frozenset({CommandField.C_ECHO_RQ, CommandField.C_CANCEL_RQ, CommandField.N_DELETE_RQ})
# Responses that never carry one (Data Set Type 0101H: PS3.7 §9.3.1.2, §9.3.5.2, §10.3.6.2).
_NO_DATASET_RESPONSES = frozenset(int(f) for f in (CommandField.C_STORE_RSP, CommandField.C_ECHO_RSP, CommandField.N_DELETE_RSP))
_C_FIND_RSP = int(CommandField.C_FIND_RSP)
#: Largest data set collected of a response that has no use for one (a final C-FIND-RSP:
#: only pending ones carry an identifier, PS3.7 §9.1.2.1); larger is an A-ABORT.
MAX_STRAY_DATASET = 64 << 10
# DIMSE-C requests: the receiver performs them as SCP of the context's SOP class (PS3.7 D.3.3.4).
_C_REQUESTS = frozenset(
    {
        CommandField.C_ECHO_RQ,
        CommandField.C_STORE_RQ,
        CommandField.C_FIND_RQ,
        CommandField.C_GET_RQ,
        CommandField.C_MOVE_RQ,
    }
)
# DIMSE-N requests: N-EVENT-REPORT is invoked by the SCP of the SOP class and performed
# by its SCU, the others the other way round (PS3.7 §10.1, D.3.3.4).
_N_REQUESTS = frozenset(
    {
        CommandField.N_GET_RQ,
        CommandField.N_SET_RQ,
        CommandField.N_ACTION_RQ,
        CommandField.N_CREATE_RQ,
        CommandField.N_DELETE_RQ,
    }
)
# Requests the receiver performs as SCP of the context's SOP class (made once: checked per request).
_SCP_REQUESTS = _C_REQUESTS | _N_REQUESTS
_C_CANCEL_RQ = int(CommandField.C_CANCEL_RQ)  # per request: not read from the enum class each time (slow on 3.11)
_N_EVENT_REPORT_RQ = int(CommandField.N_EVENT_REPORT_RQ)
# Requests a C-CANCEL can reach (PS3.7 §9.3.2.3, §9.3.3.3, §9.3.4.3).
_CANCELLABLE = frozenset({CommandField.C_FIND_RQ, CommandField.C_GET_RQ, CommandField.C_MOVE_RQ})


@dataclass(slots=True, eq=False)
class Operation:
    """A request the peer invoked, performed by us (or held back until a slot frees)."""

    context: PresentationContext
    message: Message
    #: Set when the peer sent C-CANCEL for it; the handler stops at its next step.
    cancelled: bool = False
    #: Called (by the adapter) when the C-CANCEL arrives: wakes a handler waiting on
    #: something other than its next step (a C-MOVE sub-association being set up).
    on_cancel: Callable[[], None] | None = None
    #: Set by a handler that can end at once with a final response (a C-GET / C-MOVE);
    #: awaited by a server shutting down before it aborts the association.
    on_stop: Callable[[], Awaitable[None]] | None = None
    #: Data set bytes received with the request, counted when it is held back (in
    #: memory, or a spool's: the adapter bounds what the requests held back hold).
    size: int = 0

    @property
    def command(self) -> Command:
        return self.message.command

    @property
    def message_id(self) -> int | None:
        return self.message.command.message_id


# Read-only by type, not frozen (cheaper to make; see dimse.CommandReceived).
@dataclass(slots=True, unsafe_hash=True)
class StreamStarted:
    """A request whose data set streams to a sink: the adapter opens one now; the
    :class:`~dimse_async.dimse.DataFragment` events that follow go to it."""

    message: Final[Message]


@dataclass(slots=True, unsafe_hash=True)
class Perform:
    """Run the handler for this operation now (a slot in the window is reserved)."""

    operation: Final[Operation]


@dataclass(slots=True, unsafe_hash=True)
class Respond:
    """Send this response, decided by the session (a refusal, or Cancel for a held-back request)."""

    context_id: Final[int]
    command: Final[Command]
    #: The request answered, when its data set may have streamed to a sink (to drop).
    request: Final[Message | None] = None


@dataclass(slots=True, unsafe_hash=True)
class ResponseArrived:
    """A response to a request we invoked; ``final`` unless its status is pending."""

    message_id: Final[int]
    message: Final[Message]
    final: Final[bool]


@dataclass(slots=True, unsafe_hash=True)
class CancelRequested:
    """The peer cancelled a running operation (``operation.cancelled`` is now set)."""

    operation: Final[Operation]


@dataclass(slots=True, frozen=True)
class PauseReading:
    """The peer exceeded the window (one more request held back): stop reading until
    :class:`ResumeReading`, unless the adapter must read on (responses it awaits)."""


@dataclass(slots=True, frozen=True)
class ResumeReading:
    """Every held-back request has started: read again."""


_PAUSE = PauseReading()

# The objects of one received request made without a call of their dataclass __init__
# (a type call runs it as a frame of its own: ~0.6k instructions each; typed Any below
# because the events' fields are Final): see receive, _on_command and _complete.
_new = object.__new__

SessionEvent = (
    StreamStarted | DataFragment | Perform | Respond | ResponseArrived | CancelRequested | PauseReading | ResumeReading
)


class Session:
    """DIMSE bookkeeping for one association (see the module docstring).

    ``contexts``: the accepted presentation contexts; ``max_performed``: how many
    requests we perform at once (0 = unlimited); ``streamed``: request command fields
    whose data sets go to a sink as they arrive instead of being collected in memory.
    """

    def __init__(
        self,
        contexts: Collection[PresentationContext],
        *,
        max_performed: int = 1,
        streamed: Collection[int] = (CommandField.C_STORE_RQ,),
        max_in_memory: int = 64 << 20,
        max_request_dataset: int = 1 << 20,
    ) -> None:
        self.contexts = {c.id: c for c in contexts if c.accepted}
        self.max_performed = max_performed or 1 << 16
        self.streamed = frozenset(streamed)
        #: Largest data set of a response collected in memory.
        self.max_in_memory = max_in_memory
        #: Largest data set of a request collected in memory (an identifier); a larger
        #: one is dropped as it arrives and the request refused (out of resources).
        self.max_request_dataset = max_request_dataset
        self.assembler = MessageAssembler()
        self._next_id = 0
        # message id -> (expects several responses, the response's command field, context id)
        self._invoked: dict[int, tuple[bool, int, int]] = {}
        self._performing: dict[int, Operation] = {}  # by id() of the operation
        self._held: deque[Operation] = deque()
        # The message whose data set is arriving: collected in memory, streamed, or dropped.
        self._current: Message | None = None
        self._chunks: list[bytes | memoryview] = []
        self._size = 0
        self._mode = "memory"  # "memory" | "stream" | "drop"
        self._limit = max_in_memory  # of the data set arriving in memory
        self._refusal: Respond | None = None

    @property
    def receiving(self) -> Message | None:
        """The message whose data set is arriving (``None`` between messages)."""
        return self._current

    @property
    def streaming(self) -> bool:
        """The data set arriving goes to a sink (a C-STORE of any size), not to memory."""
        return self._current is not None and self._mode == "stream"

    # ----------------------------------------------------------- contexts

    def context(self, context_id: int) -> PresentationContext:
        try:
            return self.contexts[context_id]
        except KeyError:
            raise NoAcceptedContext(f"presentation context {context_id} was not accepted") from None

    def context_for(self, abstract_syntax: str, *, as_scp: bool = False) -> PresentationContext:
        """The first accepted context for ``abstract_syntax`` where we may take the role."""
        for ctx in self.contexts.values():
            if ctx.abstract_syntax == abstract_syntax and (ctx.as_scp if as_scp else ctx.as_scu):
                return ctx
        raise NoAcceptedContext(
            f"no accepted presentation context for {uid_name(abstract_syntax)} with us as {'SCP' if as_scp else 'SCU'}"
        )

    # ----------------------------------------------------------- requests we invoke

    @property
    def outstanding(self) -> int:
        """Requests we invoked that have not had their final response."""
        return len(self._invoked)

    def start_request(self, context: PresentationContext, command: Command, *, multi: bool = False) -> int:
        """Give ``command`` a free message id and expect its response(s) (PS3.7 §9.3.1.1)."""
        if command.command_field in _SCP_REQUESTS and not context.as_scu:
            raise NoAcceptedContext(f"{command.name}: we are not SCU on presentation context {context.id}")
        if command.command_field == CommandField.N_EVENT_REPORT_RQ and not context.as_scp:
            raise NoAcceptedContext(f"{command.name}: we are not SCP on presentation context {context.id}")
        for _ in range(0x10000):
            self._next_id = (self._next_id % 0xFFFF) + 1
            if self._next_id not in self._invoked:
                break
        else:  # pragma: no cover - 65535 requests outstanding
            raise DIMSEError("no free message id")
        command.message_id = self._next_id
        self._invoked[self._next_id] = (multi, command.command_field | 0x8000, context.id)
        return self._next_id

    def forget_request(self, message_id: int) -> None:
        """Stop expecting responses to ``message_id`` (timed out, or the association ended)."""
        self._invoked.pop(message_id, None)

    # ----------------------------------------------------------- requests we perform

    @property
    def held(self) -> int:
        """Requests of the peer's held back until a slot in the window frees."""
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        """Data set bytes received with the requests held back."""
        return sum(op.size for op in self._held)

    def operations(self) -> list[Operation]:
        """The peer's requests being performed or held back."""
        return [*self._performing.values(), *self._held]

    @property
    def idle(self) -> bool:
        """No request of the peer's is being performed or held back."""
        return not self._performing and not self._held

    def finished(self, operation: Operation) -> list[SessionEvent]:
        """``operation`` has answered: start held-back requests as slots free."""
        self._performing.pop(id(operation), None)
        events: list[SessionEvent] = []
        while self._held and len(self._performing) < self.max_performed:
            op = self._held.popleft()
            self._performing[id(op)] = op
            events.append(Perform(op))
            if not self._held:
                events.append(ResumeReading())
        return events

    # ----------------------------------------------------------- receiving

    def stream_fragment(self, pdv: PDV) -> bool:
        """Whether ``pdv`` is a fragment, not the last, of the data set being streamed to a
        sink: then it is counted and the caller hands ``pdv.data`` to that sink, as the
        :class:`DataFragment` :meth:`receive` would return for it (the bulk of a large
        data set: no event objects). ``False``: :meth:`receive` takes it."""
        if pdv.is_command or pdv.is_last or self._mode != "stream":
            return False
        return self.assembler.stream_fragment(pdv)

    def stream(self, pdv: PDV) -> list[SessionEvent] | None:
        """:meth:`stream_fragment` for any fragment of the data set being streamed to a
        sink, the last one too: the events that follow it (for the last, what
        :meth:`receive` returns after its :class:`DataFragment`: the request to perform),
        and the caller hands ``pdv.data`` to that sink first. ``None``: :meth:`receive`
        takes it."""
        if pdv.is_command or self._mode != "stream" or not self.assembler.stream_fragment(pdv):
            return None
        out: list[SessionEvent] = []
        if pdv.is_last:  # (what _on_fragment does for it)
            msg = self._current
            assert msg is not None  # the assembler had its data set under way
            self._current = None
            self._complete(msg, out, checked=True)
        return out

    def receive(self, pdvs: list[PDV]) -> list[SessionEvent]:
        """Events for one P-DATA-TF's PDVs; raises :class:`DIMSEError` on a violation."""
        out: list[SessionEvent] = []
        if len(pdvs) == 1 and (pdv := pdvs[0]).is_command and pdv.is_last:
            # The usual command set, one PDV: without the assembler's event (MessageAssembler.command).
            cmd = self.assembler.command(pdv)
            if cmd is not None:
                if pdv.context_id not in self.contexts:
                    raise DIMSEError(f"message on presentation context {pdv.context_id}, which was not accepted")
                msg = _new(Message)  # Message(pdv.context_id, cmd)
                msg.context_id, msg.command, msg.dataset, msg.sink = pdv.context_id, cmd, None, None
                self._on_command(msg, out)
                return out
        for event in self.assembler.receive(pdvs):
            if event.context_id not in self.contexts:
                raise DIMSEError(f"message on presentation context {event.context_id}, which was not accepted")
            if type(event) is CommandReceived:
                self._on_command(Message(event.context_id, event.command), out)
            else:
                self._on_fragment(event, out)  # type: ignore[arg-type]
        return out

    def _on_command(self, msg: Message, out: list[SessionEvent]) -> None:
        cmd = msg.command
        if cmd.data_set_type == NO_DATASET:  # (not has_dataset, without the property call)
            self._complete(msg, out)
            return
        request = not cmd.command_field & 0x8000
        if request and cmd.command_field in _NO_DATASET_REQUESTS:
            raise DIMSEError(f"{cmd.name} must not carry a data set")
        self._current, self._chunks, self._size, self._mode = msg, [], 0, "memory"
        self._limit = self.max_in_memory
        if request:
            # (the usual request, on a context where we are its SCP, judged without the call)
            ok = cmd.command_field in _SCP_REQUESTS and self.contexts[msg.context_id].as_scp
            self._refusal = None if ok else self._refuse(msg)
            if self._refusal is not None:
                self._mode = "drop"
            elif cmd.command_field in self.streamed:
                self._mode = "stream"
                started: Any = _new(StreamStarted)  # StreamStarted(msg)
                started.message = msg
                out.append(started)
        else:
            self._expected(msg)
            if cmd.command_field in _NO_DATASET_RESPONSES:
                raise DIMSEError(f"{cmd.name} must not carry a data set")
            if cmd.command_field == _C_FIND_RSP and cmd.status not in PENDING_CODES:
                self._limit = MAX_STRAY_DATASET

    def _on_fragment(self, event: DataFragment, out: list[SessionEvent]) -> None:
        msg = self._current
        assert msg is not None  # the assembler checked the order
        if self._mode == "stream":
            out.append(event)
        elif self._mode == "memory":
            self._chunks.append(event.data)
            self._size += len(event.data)
            if not msg.command.is_response and self._size > self.max_request_dataset:
                self._mode, self._chunks = "drop", []
                self._refusal = Respond(msg.context_id, _too_large(msg.command, self.max_request_dataset))
            elif self._size > self._limit:
                raise DIMSEError(f"{msg.command.name} data set larger than {self._limit} bytes")
        if not event.last:
            return
        self._current = None
        if self._mode == "memory":
            msg.dataset = b"".join(self._chunks)
        self._chunks = []
        if self._mode == "drop":
            assert self._refusal is not None
            out.append(self._refusal)
            self._refusal = None
            return
        self._complete(msg, out, checked=True)

    def _complete(self, msg: Message, out: list[SessionEvent], *, checked: bool = False) -> None:
        """``checked``: a request whose role was judged as its command set arrived."""
        cmd = msg.command
        if cmd.command_field & 0x8000:
            mid, multi = self._expected(msg)
            final = not (multi and cmd.status in PENDING_CODES)
            if final:
                del self._invoked[mid]
            out.append(ResponseArrived(mid, msg, final))
        elif cmd.command_field == _C_CANCEL_RQ:
            self._cancel(cmd.message_id_being_responded_to, out)  # no response (PS3.7 §9.3.2.3)
        else:
            refusal = None if checked else self._refuse(msg)
            if refusal is not None:
                out.append(refusal)
                return
            op = _new(Operation)  # Operation(self.contexts[msg.context_id], msg)
            op.context, op.message, op.cancelled, op.on_cancel, op.on_stop = self.contexts[msg.context_id], msg, False, None, None
            op.size = 0
            if len(self._performing) < self.max_performed:
                self._performing[id(op)] = op
                perform: Any = _new(Perform)  # Perform(op)
                perform.operation = op
                out.append(perform)
            else:  # the peer exceeded the negotiated window: hold it (the adapter judges reading)
                if cmd.data_set_type != NO_DATASET:
                    op.size = self.assembler.received
                self._held.append(op)
                out.append(_PAUSE)

    def _expected(self, msg: Message) -> tuple[int, bool]:
        """(message id, several responses expected) of the request the response ``msg``
        answers; :class:`DIMSEError` unless it answers one we sent, with that request's
        own response command field (PS3.7 §9.3, §10.3, E.1: C-STORE-RQ 0001H is answered
        by C-STORE-RSP 8001H, and so on), on the request's presentation context (which
        names its abstract syntax and the encoding of the reply, PS3.8 §7.1.1.13)."""
        cmd = msg.command
        mid = cmd.message_id_being_responded_to
        if mid is None or (expected := self._invoked.get(mid)) is None:
            raise DIMSEError(f"{cmd.name} answers message id {mid}, never sent")
        multi, field, context_id = expected
        if cmd.command_field != field:
            raise DIMSEError(f"{cmd.name} answers message id {mid}, a {Command(field & 0x7FFF).name}")
        if msg.context_id != context_id:
            raise DIMSEError(
                f"{cmd.name} for message id {mid} on presentation context {msg.context_id}, the request was sent on {context_id}"
            )
        return mid, multi

    def _refuse(self, msg: Message) -> Respond | None:
        """A request on a context where we did not agree to be SCP is refused (PS3.7 D.3.3.4)."""
        cmd = msg.command
        ctx = self.contexts[msg.context_id]
        if cmd.command_field in _SCP_REQUESTS and not ctx.as_scp:
            comment = f"SCP role not negotiated for {ctx.abstract_syntax}"[:64]
        elif cmd.command_field == _N_EVENT_REPORT_RQ and not ctx.as_scu and not _report_by_default(ctx):
            # The report comes from the SCP; we must be the SCU of the class on this context.
            comment = f"SCU role not negotiated for {ctx.abstract_syntax}"[:64]
        else:
            return None
        rsp = response_to(cmd, Code.SOP_CLASS_NOT_SUPPORTED, comment)
        if cmd.command_field in (CommandField.C_STORE_RQ, CommandField.N_CREATE_RQ, CommandField.N_EVENT_REPORT_RQ):
            rsp.affected_sop_instance_uid = cmd.affected_sop_instance_uid
        elif cmd.command_field in _N_REQUESTS:
            rsp.affected_sop_class_uid = cmd.requested_sop_class_uid
            rsp.affected_sop_instance_uid = cmd.requested_sop_instance_uid
        return Respond(msg.context_id, rsp, msg)

    def _cancel(self, target: int | None, out: list[SessionEvent]) -> None:
        for op in self._performing.values():
            if op.message_id == target and op.command.command_field in _CANCELLABLE:
                op.cancelled = True
                out.append(CancelRequested(op))
                return
        for op in self._held:
            if op.message_id == target and op.command.command_field in _CANCELLABLE:
                # Never started: its only response is the final one, Cancel (PS3.4 C.4.1.3.1).
                self._held.remove(op)
                out.append(Respond(op.context.id, response_to(op.command, Code.CANCEL), op.message))
                if not self._held:
                    out.append(ResumeReading())
                return


def _report_by_default(ctx: PresentationContext) -> bool:
    """A Storage Commitment report (N-EVENT-REPORT) from a peer that opened the
    association without an SCP/SCU Role Selection item for the class: the roles are then
    the default ones (it SCU, we SCP), but PS3.4 J.3.3.1.3 has the SCP open an
    association to the SCU to report, and archives in the field do so without the item
    (PS3.4 J.2.1 makes it mandatory); pynetdicom and DCMTK take their reports all the
    same. Taken (the service logs a warning naming the peer); with a role selection
    that left us without the SCU role it is refused."""
    return ctx.abstract_syntax == StorageCommitmentPushModel and not ctx.role_selection


def _too_large(cmd: Command, limit: int) -> Command:
    """The refusal of a request whose data set passed ``limit`` bytes: out of resources
    (0xA700, PS3.4 C.4.1.1.4) for Q/R, resource limitation (0x0213, PS3.7 C.5.x) otherwise."""
    qr = cmd.command_field in _CANCELLABLE
    code = Code.OUT_OF_RESOURCES if qr else 0x0213
    return response_to(cmd, code, f"Out of resources: data set larger than {limit} bytes"[:64])
