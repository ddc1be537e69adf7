"""What the service classes see of an association, and what the AE hands down to it.

:class:`DIMSEProvider` is the small public interface the services are typed against
(send, request, request stream, context lookup, reading pause/resume); the asyncio
adapter (:mod:`dimse_async.association`) implements it. :class:`Settings` carries the
AE's configuration down: timeouts, the dispatch table (command field -> service
handler), the sink factories, the acceptor's judgement and the event hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from .acse import Negotiated, PresentationContext
from .budget import OutputBudget
from .dimse import Command, DatasetSink, DatasetSource, Message
from .lazy_dataclass import dataclass
from .pdu import AssociateAC, AssociateRJ, AssociateRQ
from .session import Operation

if TYPE_CHECKING:  # an association's writer is made on first use (messaging): a sender never loads it
    from .filewriter import FileWriter

__all__ = [
    "AssociationEvent",
    "DIMSEProvider",
    "RequestInvoker",
    "ResponseWaiter",
    "Hook",
    "Judge",
    "ResponseStream",
    "ServiceHandler",
    "Settings",
    "SinkFactory",
    "StoreHandler",
]

#: A data set to send: bytes, or a source read in pieces (a file being streamed).
Payload = bytes | memoryview | DatasetSource


class AssociationEvent(StrEnum):
    """Association life-cycle events for ``@ae.on_association`` hooks."""

    REQUESTED = "requested"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RELEASED = "released"
    ABORTED = "aborted"


class ResponseStream(Protocol):
    """The responses to one multi-response request (C-FIND, C-GET, C-MOVE).

    Iterate for every response up to and including the final one. ``aclose()``
    before the end sends C-CANCEL and waits for the final response (PS3.7 §9.3.2.3);
    ``final`` is the final response once it arrived.
    """

    final: Message | None

    def __aiter__(self) -> AsyncIterator[Message]: ...

    async def aclose(self) -> None: ...


class DIMSEProvider(Protocol):
    """An established association as the services use it."""

    log: Any
    peer_ae: str
    #: A C-STORE handler that takes precedence over the AE's (e.g. for a C-GET's sub-operations).
    store_handler: StoreHandler | None

    @property
    def is_established(self) -> bool: ...

    @property
    def peer_released(self) -> bool:
        """The peer asked to release (PS3.8 Sta8): our requests can no longer be
        answered, our answers to its requests still go out before A-RELEASE-RP."""

    @property
    def writer(self) -> FileWriter:
        """The association's file writer: file work in a thread, off the event loop."""

    @property
    def accepted_contexts(self) -> list[PresentationContext]: ...

    @property
    def negotiated(self) -> Negotiated | None:
        """What the association settled on (e.g. extended negotiation replies)."""

    def context_for(self, abstract_syntax: str, *, as_scp: bool = False) -> PresentationContext: ...

    def context(self, context_id: int) -> PresentationContext: ...

    async def send(
        self, context_id: int, command: Command, dataset: Payload | None = None, *, timeout: float | None = None
    ) -> None: ...

    def answer(
        self, op: Operation, command: Command, done: asyncio.Future[None], encoded: bytes | None = None
    ) -> None:
        """The final response of an operation a service's ``start`` took up (run as
        callbacks, no task): sent, then the operation is finished. ``encoded``: the
        command set's bytes when the service made them."""

    def fail_requests(self, exc: BaseException) -> None:
        """Stop waiting for the responses to our requests (each waiter raises ``exc``)."""

    def answer_encoded(self, op: Operation, done: asyncio.Future[None], encoded: bytes) -> bool:
        """:meth:`answer` of the final Success response already encoded, without its
        ``Command`` where none is needed; ``False``: not done, call :meth:`answer`."""

    async def request(
        self,
        context: PresentationContext,
        command: Command,
        dataset: Payload | None = None,
        timeout: float | None = None,
    ) -> Message: ...

    def request_stream(
        self,
        context: PresentationContext,
        command: Command,
        dataset: Payload | None = None,
        timeout: float | None = None,
    ) -> ResponseStream: ...

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...

    def abort(self, reason: str = ...) -> None: ...

    def note_error(self, kind: str) -> None:
        """Count a local failure of ``kind`` (e.g. "spool", "storage") for metrics."""


class ResponseWaiter(Protocol):
    """The responses to one request as they arrive (see :class:`~dimse_async.streams.ResponseQueue`)."""

    message_id: int
    #: Resolves when the final response (or a failure) has arrived.
    done: asyncio.Future[None]

    @property
    def drained(self) -> bool:
        """The final response arrived and has been taken."""

    async def get(self, timeout: float | None, progress: Callable[[], float] | None = None) -> Message: ...


class RequestInvoker(Protocol):
    """What a request stream needs of the adapter (:class:`~dimse_async.streams.MessageStream`):
    a slot in the negotiated asynchronous operations window (PS3.7 D.3.3.3), a message
    id with a waiter for the responses, and sending."""

    loop: asyncio.AbstractEventLoop

    @property
    def is_established(self) -> bool: ...

    @property
    def dimse_timeout(self) -> float | None:
        """Default seconds to wait for each response."""

    async def acquire_window(self) -> None:
        """Wait for a free slot in the window of operations we may invoke."""

    def release_window(self) -> None: ...

    def begin_request(self, context: PresentationContext, command: Command, *, multi: bool) -> ResponseWaiter:
        """Give ``command`` a message id and a waiter for its responses (not sent yet)."""

    def end_request(self, waiter: ResponseWaiter) -> None:
        """Forget the request: later responses to it are ignored."""

    async def send(
        self, context_id: int, command: Command, dataset: Payload | None = None, *, timeout: float | None = None
    ) -> None: ...

    def pause_reading(self, reason: str) -> None: ...

    def resume_reading(self, reason: str) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...

    def abort(self, reason: str = ...) -> None: ...

    def sub_operation_progress(self) -> float:
        """When the peer last got on with a request of its own on this association (a
        C-GET's C-STORE sub-operation), on the loop's clock."""


#: Performs one received request and sends its response(s).
ServiceHandler = Callable[[DIMSEProvider, Operation], Awaitable[None]]
#: Opens the sink for a streamed data set (a C-STORE spool).
SinkFactory = Callable[[DIMSEProvider, Message], DatasetSink]
#: A user's C-STORE handler (see :class:`~dimse_async.services.storage.StoreRequest`).
StoreHandler = Callable[[Any], Awaitable[Any]]
#: Acceptor: decide an A-ASSOCIATE-RQ (may await, e.g. user identity).
Judge = Callable[[Any, AssociateRQ], Awaitable[tuple[AssociateAC | AssociateRJ, Negotiated | None]]]
#: Acceptor: the same decision taken at once, or ``None`` when it must await (see ``Settings.judge_now``).
JudgeNow = Callable[[Any, AssociateRQ], tuple[AssociateAC | AssociateRJ, Negotiated | None] | None]
#: Called with an event and the association (the AE's hooks, a server's bookkeeping).
Hook = Callable[[AssociationEvent, Any], None]


@dataclass(slots=True)
class Settings:
    """What an association needs from its AE; built by the AE, read-only below it."""

    ae_title: str
    max_pdu: int = 262_144
    acse_timeout: float | None = 30.0
    dimse_timeout: float | None = 60.0
    network_timeout: float | None = 300.0
    artim_timeout: float = 30.0
    #: ARTIM after we sent an A-ABORT: only the peer's close is awaited (PS3.8 §9.1.5).
    abort_artim_timeout: float = 5.0
    dispatch: Mapping[int, ServiceHandler] = field(default_factory=dict)
    sinks: Mapping[int, SinkFactory] = field(default_factory=dict)
    judge: Judge | None = None
    #: Acceptor: decide without a task when nothing needs awaiting; ``None`` means
    #: "use ``judge``" (a paused server, a user identity for the authenticator).
    judge_now: JudgeNow | None = None
    hook: Hook | None = None
    #: The hooks registered, by event (the AE's own lists, so a hook registered while
    #: serving counts): ``hook`` is not called for an event that has none. ``None``:
    #: ``hook`` is called for every event.
    hooks: Mapping[AssociationEvent, Sequence[Any]] | None = None
    #: The server's bookkeeping: called when a connection is made and when it is gone.
    #: ``on_open`` returning ``False`` drops the connection (admission control).
    on_open: Callable[[Any], bool | None] | None = None
    on_close: Callable[[Any], None] | None = None
    #: Acceptor: whether to log a warning of a kind about a connection from an address
    #: that did not become an association (``False``: the server counts it instead).
    limit_warning: Callable[[str, str], bool] | None = None
    #: TCP keepalive (idle, interval, count) or ``None``.
    keepalive: tuple[float, float, int] | None = None
    #: Requestor: release after this many seconds without DIMSE traffic.
    idle_release: float | None = None
    #: A PDU that has started arriving must be complete within this many seconds.
    pdu_timeout: float | None = 60.0
    #: Largest data set of a request (an identifier) kept in memory; larger is refused.
    max_request_dataset: int = 1 << 20
    #: Server-wide bound on response bytes queued for peers (shared by the AE's associations).
    output_budget: OutputBudget | None = None
    #: Receives association and DIMSE events (e.g. :class:`dimse_async.metrics.Metrics`).
    observer: Any = None
    #: Log each successful DIMSE operation at INFO (else DEBUG).
    log_operations: bool = False
    #: Acceptor: decodes a received A-ASSOCIATE-RQ body (the server's
    #: ``NegotiationCache.decode_rq``, which remembers requests seen before); ``None``:
    #: the PDU reader decodes each itself.
    decode_rq: Callable[[memoryview], Any] | None = None
